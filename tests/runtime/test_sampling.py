import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gptexport.errors import UsageError
from gptexport.runtime.sampling import SamplingParams, logits_to_probs, next_token, sample


def nanogpt_probs(logits: np.ndarray, temperature: float, top_k: int | None) -> np.ndarray:
    """The lines of nanoGPT's generate that turn logits into probabilities, verbatim in torch."""
    logits = torch.from_numpy(logits).float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("Inf")
    return torch.softmax(logits, dim=-1).numpy()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [None, 1, 5, 64, 1000])
def test_probs_match_nanogpt(temperature, top_k):
    logits = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32) * 4
    np.testing.assert_allclose(logits_to_probs(logits, temperature, top_k), nanogpt_probs(logits, temperature, top_k),
                               atol=1e-6)


def test_top_k_keeps_ties():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0]], dtype=np.float32)
    probs = logits_to_probs(logits, 1.0, top_k=3)  # the 3rd largest is 2.0, held by two tokens
    assert (probs > 0).sum() == 4
    np.testing.assert_allclose(probs, nanogpt_probs(logits, 1.0, 3), atol=1e-6)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = logits_to_probs(np.log(np.array([[0.5, 0.3, 0.15, 0.05]])), 1.0, None, top_p=0.7)
    np.testing.assert_allclose(probs, [[0.625, 0.375, 0, 0]], atol=1e-12)
    assert (logits_to_probs(np.zeros((1, 4)), 1.0, None, top_p=0.01) > 0).sum() == 1


def test_greedy_and_seeded_draws():
    logits = np.random.default_rng(1).standard_normal((4, 50))
    assert (next_token(logits, SamplingParams(0.0), np.random.default_rng(0)) == logits.argmax(-1)).all()
    params = SamplingParams(1.0, 10)
    a = [next_token(logits, params, np.random.default_rng(7)) for _ in range(2)]
    assert (a[0] == a[1]).all()


def test_sample_follows_distribution():
    probs = np.array([[0.1, 0.0, 0.6, 0.3]])
    rng = np.random.default_rng(0)
    draws = np.array([sample(probs, rng)[0] for _ in range(20000)])
    assert (draws != 1).all()
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), probs[0], atol=0.015)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-1),
                                    dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_params(kwargs):
    with pytest.raises(UsageError):
        SamplingParams(**kwargs)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 40)), elements=st.floats(-10, 10, width=32)),
       st.floats(0.1, 5), st.one_of(st.none(), st.integers(1, 50)), st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_probs_properties(logits, temperature, top_k, top_p):
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-9)
    assert (probs >= 0).all()
    if top_k is not None and top_p is None:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[1])]
        np.testing.assert_array_equal((probs > 0).sum(-1), (logits >= kth[:, None]).sum(-1))
    tokens = sample(probs, np.random.default_rng(3))
    assert (probs[np.arange(len(tokens)), tokens] > 0).all()
    assert (tokens == sample(probs, np.random.default_rng(3))).all()


def test_top_k_zero_means_no_top_k():
    assert SamplingParams(1.0, 0) == SamplingParams(1.0, None)
    logits = np.random.default_rng(1).standard_normal((3, 50))
    np.testing.assert_array_equal(logits_to_probs(logits, 1.0, SamplingParams(1.0, 0).top_k), logits_to_probs(logits))


def test_top_k_kept_is_every_value_at_or_above_the_kth_largest():
    """The grouped selection keeps exactly the values >= the k-th largest, ties and -inf included,
    whatever the row's length against the group size."""
    from gptexport.runtime.sampling import top_k_kept

    rng = np.random.default_rng(0)
    rows = [(rng.standard_normal(50257) * 3).astype(np.float32), np.round(rng.standard_normal(4099)),
            np.zeros(300, np.float32), np.full(1000, -np.inf), rng.standard_normal(65)]
    big = rng.standard_normal(8192)
    big[:8000] = -np.inf  # bad words, say: fewer finite values than the groups
    rows.append(big)
    ascending = np.arange(5000, dtype=np.float32)  # every group's maximum in the last slice
    rows += [ascending, ascending[::-1].copy()]
    for row in rows:
        for k in (1, 2, 7, 40, 200, len(row) // 8, len(row)):
            k = max(1, min(k, len(row)))
            want = np.flatnonzero(row >= np.partition(row, len(row) - k)[len(row) - k])
            np.testing.assert_array_equal(top_k_kept(row, k), want, err_msg=f"{len(row)} values, k {k}")


def test_the_sparse_top_k_draw_is_the_dense_one():
    """next_token's fast path (sampling among the top-k only) picks what logits_to_probs + sample pick."""
    from gptexport.runtime.sampling import SPARSE_TOP_K

    draws = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        logits = (rng.standard_normal((3, 4096)) * 3).astype(np.float32)
        if seed % 3 == 0:
            logits = np.round(logits)  # many ties at the k-th largest
        for params in (SamplingParams(0.8, 200), SamplingParams(1.3, 40, 0.9),
                       SamplingParams(0.5, 4096 // SPARSE_TOP_K, 0.5)):
            fast = next_token(logits, params, np.random.default_rng(seed + 1))
            dense = sample(logits_to_probs(logits, params.temperature, params.top_k, params.top_p),
                           np.random.default_rng(seed + 1))
            assert (fast == dense).all(), (seed, params)
            draws += 3
    assert draws == 540
