import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from transformers import RepetitionPenaltyLogitsProcessor

from gptexport.errors import ParameterError
from gptexport.runtime.sampling import (
    SamplingParams,
    apply_penalties,
    banned_tokens,
    logits_to_probs,
    next_token,
    token_logprob,
)

V = 50
finite_logits = arrays(np.float64, V, elements=st.floats(-30, 30, allow_nan=False))
histories = st.lists(st.integers(0, V - 1), max_size=40).map(lambda h: np.array(h, dtype=np.int64))


def hf_repetition(logits: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    """Hugging Face's processor, on one row, in float64 so the comparison can be exact."""
    if history.size == 0:
        return logits.copy()
    proc = RepetitionPenaltyLogitsProcessor(penalty=float(penalty))
    out = proc(torch.from_numpy(history)[None, :], torch.from_numpy(logits.copy())[None, :])
    return out[0].numpy()


def openai_formula(logits: np.ndarray, history: np.ndarray, presence: float, frequency: float) -> np.ndarray:
    """mu[j] - c[j] * frequency - (c[j] > 0) * presence, token by token."""
    out = logits.astype(np.float64).copy()
    for j in range(len(out)):
        c = int((history == j).sum())
        out[j] = out[j] - c * frequency - (1.0 if c > 0 else 0.0) * presence
    return out


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.2, 2.0, 7.5])
@pytest.mark.parametrize("seed", range(5))
def test_repetition_matches_hugging_face(penalty, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(V) * 5  # about half negative
    history = rng.integers(0, V, size=rng.integers(1, 60))
    history = np.concatenate([history, history[:3]])  # repeats count once
    np.testing.assert_array_equal(apply_penalties(logits, history, repetition=penalty),
                                  hf_repetition(logits, history, penalty))


@settings(max_examples=200, deadline=None)
@given(finite_logits, histories, st.floats(0.05, 10))
def test_repetition_matches_hugging_face_property(logits, history, penalty):
    np.testing.assert_array_equal(apply_penalties(logits, history, repetition=penalty),
                                  hf_repetition(logits, history, penalty))


@settings(max_examples=200, deadline=None)
@given(finite_logits, histories, st.floats(-2, 2), st.floats(-2, 2))
def test_presence_frequency_match_openai(logits, history, presence, frequency):
    np.testing.assert_allclose(apply_penalties(logits, history, presence=presence, frequency=frequency),
                               openai_formula(logits, history, presence, frequency), rtol=0, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(finite_logits, histories, st.floats(0.1, 5), st.floats(-2, 2), st.floats(-2, 2))
def test_order_is_repetition_then_presence_then_frequency(logits, history, rep, presence, frequency):
    expected = openai_formula(hf_repetition(logits, history, rep), history, presence, frequency)
    np.testing.assert_allclose(apply_penalties(logits, history, rep, presence, frequency), expected,
                               rtol=0, atol=1e-12)


def test_worked_example():
    out = apply_penalties(np.array([1.0, -2.0, 3.0]), np.array([0, 0, 1]), 1.5, 0.5, 0.25)
    np.testing.assert_allclose(out, [1 / 1.5 - 0.5 - 0.5, -3.0 - 0.5 - 0.25, 3.0])


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, V, elements=st.floats(-2.0**100, 2.0**100, width=32) | st.just(-np.inf) | st.just(-0.0)),
       histories)
def test_defaults_are_identity(logits, history):
    out = apply_penalties(logits, history)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, logits.astype(np.float64))
    assert (np.signbit(out) == np.signbit(logits)).all()  # not even -0.0 -> 0.0


def test_returns_a_new_array():
    logits = np.array([1.0, 2.0, 3.0])
    out = apply_penalties(logits, np.array([0, 1]), 2.0, 1.0, 1.0)
    assert out is not logits and (logits == [1.0, 2.0, 3.0]).all()


def test_empty_history_changes_nothing():
    logits = np.array([1.0, -2.0, 3.0])
    np.testing.assert_array_equal(apply_penalties(logits, np.array([], dtype=np.int64), 3.0, 1.0, 1.0), logits)
    np.testing.assert_array_equal(apply_penalties(logits, [], 3.0, 1.0, 1.0), logits)


def test_masked_logits_stay_masked():
    out = apply_penalties(np.array([-np.inf, 1.0]), np.array([0, 0]), 2.0, 1.0, 1.0)
    assert out[0] == -np.inf


@pytest.mark.parametrize("kwargs, param", [
    ({"repetition": 0.0}, "repetition"), ({"repetition": -1.0}, "repetition"),
    ({"repetition": math.nan}, "repetition"), ({"presence": math.inf}, "presence"),
    ({"frequency": True}, "frequency"),
])
def test_bad_penalties_are_refused(kwargs, param):
    with pytest.raises(ParameterError) as e:
        apply_penalties(np.zeros(4), np.array([1]), **kwargs)
    assert e.value.param == param


@pytest.mark.parametrize("history", [np.array([4]), np.array([-1]), np.array([0.0, 1.0])])
def test_bad_history_is_refused(history):
    with pytest.raises(ParameterError):
        apply_penalties(np.zeros(4), history, repetition=1.1)


def test_batched_logits_are_refused():
    with pytest.raises(ParameterError):
        apply_penalties(np.zeros((2, 4)), np.array([1]))


def test_banned_tokens_follow_tensorrt_llm():
    words = [[7], [3, 5], [1, 2, 9], []]
    assert banned_tokens([], words).tolist() == [7]  # one-token words: always
    assert banned_tokens([0, 3], words).tolist() == [5, 7]  # prefix [3] just seen: ban its last token
    assert banned_tokens([3, 0], words).tolist() == [7]  # prefix seen earlier, not at the end
    assert banned_tokens([1, 2], words).tolist() == [7, 9]
    assert banned_tokens([2], words).tolist() == [7]  # only part of the prefix
    assert banned_tokens(np.array([4, 1, 2]), [[1, 2, 9]]).tolist() == [9]
    assert banned_tokens([1], []).tolist() == []


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_k=5), SamplingParams(1.3, top_p=0.8),
                                    SamplingParams(0.9, top_k=10, top_p=0.5)])
def test_token_logprob_matches_logits_to_probs(params):
    logits = np.random.default_rng(1).standard_normal(V).astype(np.float32) * 3
    probs = logits_to_probs(logits[None, :], params.temperature, params.top_k, params.top_p)[0]
    for token in range(V):
        lp = token_logprob(logits, params, token)
        if probs[token] == 0:
            assert lp == -math.inf
        else:
            assert math.isclose(lp, math.log(probs[token]), rel_tol=1e-12)
    kept = [math.exp(token_logprob(logits, params, t)) for t in range(V)]
    assert math.isclose(sum(kept), 1.0, rel_tol=1e-9)


@settings(max_examples=100, deadline=None)
@given(finite_logits, st.integers(0, V - 1))
def test_greedy_logprob_is_a_point_mass_on_next_token(logits, token):
    params = SamplingParams(0.0)
    chosen = int(next_token(logits[None, :], params, np.random.default_rng(0))[0])
    assert token_logprob(logits, params, chosen) == 0.0
    if token != chosen:
        assert token_logprob(logits, params, token) == -math.inf


@settings(max_examples=100, deadline=None)
@given(finite_logits, st.floats(0.1, 3), st.integers(0, V - 1))
def test_token_logprob_is_a_log_probability(logits, temperature, token):
    lp = token_logprob(logits, SamplingParams(temperature), token)
    assert lp <= 0.0
    log_softmax = torch.log_softmax(torch.from_numpy(logits / temperature), dim=-1)[token].item()
    assert math.isclose(lp, log_softmax, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("token", [-1, V, 1.0, True])
def test_bad_token_is_refused(token):
    with pytest.raises(ParameterError):
        token_logprob(np.zeros(V), SamplingParams(1.0), token)
