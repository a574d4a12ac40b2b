"""OrtRunner's batch cache against plain session.run: logits, cache contents and tokens.

The decode step binds device pointers into a memory core (here the host one, bound as device
"cpu" on the CPU provider), the code ort-cuda runs; it must give session.run's numbers, step for step.
"""

import numpy as np
import pytest
from conftest import full_forward

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.errors import GptExportError
from gptexport.runtime.backends.ort import OrtRunner
from gptexport.runtime.sampling import SamplingParams
from gptexport.verify.measure import generate_recorded, teacher_forced


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    with OrtRunner(load_model_dir(tiny_model_dir)) as r:
        yield r


def test_bound_decode_matches_session_run(runner):
    """Rows at different lengths decoded together: each step's logits are session.run's over the row's
    whole context, and the cache holds the keys and values session.run computes."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, runner.config.vocab_size, n) for n in (5, 2, 7)]
    cache = runner.new_batch_cache(3, 12)
    for row, prompt in enumerate(prompts):
        cache.prefill(row, prompt)
    contexts = [list(p) for p in prompts]
    for step in range(4):
        ids = rng.integers(0, runner.config.vocab_size, 3)
        got = np.array(cache.decode(ids))
        for row, token in enumerate(ids):
            contexts[row].append(int(token))
            want = full_forward(runner, np.array([contexts[row]]))["logits"][0, -1]
            np.testing.assert_allclose(got[row], want, atol=1e-5, err_msg=f"row {row} step {step}")
    for row, context in enumerate(contexts):
        want = full_forward(runner, np.array([context]))["new_value.1"][0]  # (nh, T, hd)
        past = cache.memory.view(cache.past["past_value.1"], (3, runner.config.n_head, cache.capacity,
                                                              runner.config.head_dim), np.float32)
        np.testing.assert_allclose(past[row, :, :len(context)], want, atol=1e-5)
    cache.close()


def test_decode_refuses_a_row_past_its_capacity(runner):
    cache = runner.new_batch_cache(1, 3)
    cache.prefill(0, np.array([1, 2]))
    cache.lengths[0] = cache.capacity
    with pytest.raises(GptExportError, match="internal error: decode"):
        cache.decode(np.array([4]))
    cache.close()


def test_decode_steps_allocate_no_arrays(tmp_path_factory):
    """Once the first step has bound the bucket, a step allocates nothing near the size of its logits.
    tracemalloc sees numpy's allocations (not ONNX Runtime's own): a per-step copy would show."""
    import tracemalloc

    from conftest import write_tiny_checkpoint

    from gptexport.convert.export import convert

    d = tmp_path_factory.mktemp("wide")
    out = convert(write_tiny_checkpoint(d / "ckpt.pt", meta=False, vocab_size=8192), d / "m", progress=lambda m: None)
    runner = OrtRunner(load_model_dir(out))
    runner.activate()
    logits_bytes = 2 * runner.config.vocab_size * 4

    def peak_of_steps(step) -> int:
        cache = runner.new_batch_cache(2, 16)
        cache.prefill(0, np.array([1, 2]))
        cache.prefill(1, np.array([3, 4]))
        step(cache, np.array([5, 6]))  # the first step binds
        tracemalloc.start()
        try:
            for t in range(8):
                step(cache, np.array([t, t + 1]))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            cache.close()

    assert peak_of_steps(lambda c, ids: c.decode(ids).copy()) >= logits_bytes
    assert peak_of_steps(lambda c, ids: c.decode(ids)) < logits_bytes / 4


def test_a_runner_reactivated_gives_the_same_tokens(tiny_model_dir):
    """A new session after deactivate: a new cache binds to it and computes the same."""
    runner = OrtRunner(load_model_dir(tiny_model_dir))
    before = generate_recorded(runner.__enter__(), np.array([1, 2]), 6, SamplingParams(0.0), 0)
    runner.deactivate()
    runner.activate()
    after = generate_recorded(runner, np.array([1, 2]), 6, SamplingParams(0.0), 0)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    runner.deactivate()


def test_host_memory_refuses_what_device_memory_would_corrupt():
    """The host twin checks every access against its allocations, as a GPU cannot."""
    from gptexport.runtime.backends.buckets import Copy3D
    from gptexport.runtime.backends.device import HostMemory

    memory = HostMemory()
    a, b = memory.allocate(64), memory.allocate(64)
    assert a % 256 == 0 and b % 256 == 0  # aligned as cudaMalloc's
    memory.upload(a, np.arange(16, dtype=np.float32))
    # 2 rows of 16 bytes, 16 apart in a, 32 apart in b
    memory.copy3d(b, a, Copy3D(16, 32, 64, 0, 16, 32, 16, 2, 1))
    got = np.empty(16, np.float32)
    memory.download(got, b)
    assert got[4:8].tolist() == [0, 1, 2, 3] and got[12:16].tolist() == [4, 5, 6, 7]
    with pytest.raises(GptExportError, match="outside a buffer"):
        memory.upload(a, np.zeros(17, np.float32))
    with pytest.raises(GptExportError, match="outside a buffer"):
        memory.copy3d(b, a, Copy3D(40, 32, 64, 0, 16, 32, 16, 2, 1))
    memory.upload(a + 48, np.full(4, 9, np.float32))  # a pointer inside a buffer is fine (a cache's tensors)
    memory.download(got[:4], a + 48)
    assert got[:4].tolist() == [9] * 4
    with pytest.raises(GptExportError, match="outside a buffer"):
        memory.download(got, a + 4)
    with pytest.raises(GptExportError, match="not in a buffer"):
        memory.download(got[:1], a + 64)
    with pytest.raises(GptExportError, match="C-contiguous"):
        memory.upload(a, np.zeros((4, 4), np.float32)[:, :2])
    memory.free(a)
    with pytest.raises(GptExportError, match="not in a buffer"):
        memory.zero(a, 4)

# ---- on a GPU: the same path on the CUDA provider (run by scripts/gpu_check.py) -------------------

def _ort_cuda_starts() -> bool:
    try:
        import onnxruntime

        from gptexport.runtime.backends.device import CudaMemory

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return False
        CudaMemory().close()
        return True
    except Exception:
        return False


def cuda_test(f):
    """Marked `gpu`, and skipped unless onnxruntime-gpu, cuda-python and a CUDA device are here."""
    reason = "needs onnxruntime-gpu, cuda-python and an NVIDIA GPU"
    return pytest.mark.gpu(pytest.mark.skipif(not _ort_cuda_starts(), reason=reason)(f))


@cuda_test
@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graphs", "plain-launches"])
def test_cuda_provider_matches_the_cpu_step_for_step(tiny_model_dir, graphs):
    """fp32 with TF32 off: the device cache, the strided appends and the decode graph give the CPU's
    logits through the engine, across the block_size crop, twice on one runner."""
    md = load_model_dir(tiny_model_dir)
    rng = np.random.default_rng(3)
    cpu = OrtRunner(md)
    with OrtRunner(md, "cuda", cuda_graphs=graphs) as gpu:
        assert gpu.memory.ort_device == "cuda" and gpu.session.get_providers()[0] == "CUDAExecutionProvider"
        for _ in range(2):
            prompt = rng.integers(0, md.config.vocab_size, 6)
            tokens = rng.integers(0, md.config.vocab_size, 20)
            np.testing.assert_allclose(teacher_forced(gpu, prompt, tokens), teacher_forced(cpu, prompt, tokens),
                                       atol=1e-4, rtol=1e-4)
            got, want = (generate_recorded(r, prompt, 20, SamplingParams(0.0), 0) for r in (gpu, cpu))
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], atol=1e-4, rtol=1e-4)
