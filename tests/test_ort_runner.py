"""OrtRunner's decode step through an IOBinding bound to the cache: same numbers as session.run."""

import numpy as np
import pytest

from gptexport.backends.base import HostCache, Runner
from gptexport.backends.ort import OrtCache, OrtRunner
from gptexport.errors import GptExportError
from gptexport.modeldir import load_model_dir


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    with OrtRunner(load_model_dir(tiny_model_dir)) as r:
        yield r


def _plain_forward(runner, ids, cache):
    return Runner.forward(runner, ids, cache)  # session.run with numpy feeds, no binding


def test_bound_decode_matches_session_run(runner):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, runner.config.vocab_size, (2, 5))
    bound, plain = runner.new_cache(2, 12), HostCache(runner.spec, runner.config, 2, 12)
    assert isinstance(bound, OrtCache)
    np.testing.assert_array_equal(runner.forward(prompt, bound), _plain_forward(runner, prompt, plain))
    for _ in range(7):
        token = rng.integers(0, runner.config.vocab_size, (2, 1))
        np.testing.assert_allclose(runner.forward(token, bound), _plain_forward(runner, token, plain), atol=1e-6)
    assert bound.length == plain.length == 12
    for name in plain.buffers:
        np.testing.assert_allclose(bound.buffers[name], plain.buffers[name], atol=1e-6, err_msg=name)


def test_decode_reuses_its_buffers_and_stops_at_capacity(runner):
    cache = runner.new_cache(1, 3)
    runner.forward(np.array([[1]]), cache)  # a 1-token prompt from an empty cache goes through the binding
    first = runner.forward(np.array([[2]]), cache)
    second = runner.forward(np.array([[3]]), cache)
    assert np.shares_memory(first, second) and cache.length == 3  # written in place: no per-step arrays
    with pytest.raises(GptExportError, match="overflow"):
        runner.forward(np.array([[4]]), cache)


def test_caches_are_independent(runner):
    """Two generations on one runner (as from two threads) do not share binding state."""
    a, b = runner.new_cache(1, 6), runner.new_cache(1, 6)
    runner.forward(np.array([[1, 2]]), a)
    runner.forward(np.array([[5, 6, 7]]), b)
    la = runner.forward(np.array([[3]]), a).copy()
    runner.forward(np.array([[8]]), b)
    fresh = runner.new_cache(1, 6)
    runner.forward(np.array([[1, 2]]), fresh)
    np.testing.assert_allclose(runner.forward(np.array([[3]]), fresh), la, atol=1e-6)


def test_decode_steps_allocate_no_arrays(tmp_path_factory):
    """Once the first step has bound the cache, a step allocates nothing near the size of its logits.
    tracemalloc sees numpy's allocations (not ONNX Runtime's own): a per-step copy would show."""
    import tracemalloc

    from conftest import write_tiny_checkpoint
    from gptexport.export import convert

    d = tmp_path_factory.mktemp("wide")
    out = convert(write_tiny_checkpoint(d / "ckpt.pt", meta=False, vocab_size=8192), d / "m", progress=lambda m: None)
    runner = OrtRunner(load_model_dir(out))
    logits_bytes = 2 * runner.config.vocab_size * 4

    def peak_of_steps(forward) -> int:
        cache = runner.new_cache(2, 16)
        forward(np.array([[1, 2], [3, 4]]), cache)
        forward(np.array([[5], [6]]), cache)  # the first step binds
        tracemalloc.start()
        try:
            for t in range(8):
                forward(np.array([[t], [t + 1]]), cache)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak_of_steps(lambda ids, c: runner.forward(ids, c).copy()) >= logits_bytes
    assert peak_of_steps(runner.forward) < logits_bytes / 4


def test_a_cache_survives_the_runner_being_reactivated(tiny_model_dir):
    runner = OrtRunner(load_model_dir(tiny_model_dir))
    cache = runner.new_cache(1, 4)
    runner.forward(np.array([[1, 2]]), cache)
    before = runner.forward(np.array([[3]]), cache).copy()
    runner.deactivate()  # a new session on the next call: the cache binds to it
    again = runner.new_cache(1, 4)
    runner.forward(np.array([[1, 2]]), again)
    np.testing.assert_allclose(runner.forward(np.array([[3]]), again), before, atol=1e-6)
    runner.deactivate()
    assert runner.forward(np.array([[4]]), cache).shape == (1, runner.config.vocab_size)
