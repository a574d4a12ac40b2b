"""OrtRunner's two decode bindings against plain session.run: logits, cache contents and tokens.

binding "pointer" is the code ort-cuda runs (device pointers into a memory core, here the host one,
bound as device "cpu" on the CPU provider); "ortvalue" is the CPU provider's default (OrtValues
sharing numpy arrays). Both must give session.run's numbers, step for step.
"""

import gc

import numpy as np
import pytest

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.errors import GptExportError
from gptexport.runtime.backends.base import HostCache, Runner
from gptexport.runtime.backends.kvcache import DeviceCache, SlotPool, graph_capacity
from gptexport.runtime.backends.ort import OrtCache, OrtRunner
from gptexport.runtime.loop import generate
from gptexport.runtime.sampling import SamplingParams


@pytest.fixture(scope="module", params=["pointer", "ortvalue"])
def runner(tiny_model_dir, request):
    with OrtRunner(load_model_dir(tiny_model_dir), binding=request.param) as r:
        yield r


def past_buffer(cache, name: str) -> np.ndarray:
    return cache.read(name) if isinstance(cache, DeviceCache) else cache.buffers[name]


class SessionRun(Runner):
    """The same session through Runner.forward: numpy feeds to session.run, the cache in HostCache."""

    def __init__(self, ort_runner: OrtRunner):
        self.inner, self.config, self.spec, self.name = ort_runner, ort_runner.config, ort_runner.spec, "session.run"

    def infer(self, feeds):
        return self.inner.infer(feeds)


class PooledRunner(OrtRunner):
    """The CPU runner on the pointer path with its cache slots pooled by (batch, capacity), as ort-cuda
    pools them for its CUDA graphs: a slot (and the addresses a graph was captured with) serves
    generation after generation."""

    def __init__(self, md):
        super().__init__(md, binding="pointer")

    def activate(self):
        if self.session is None:
            super().activate()
            self._pool = SlotPool()


def test_bound_decode_matches_session_run(runner):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, runner.config.vocab_size, (2, 5))
    bound, plain = runner.new_cache(2, 12), HostCache(runner.spec, runner.config, 2, 12)
    assert isinstance(bound, DeviceCache if runner.binding == "pointer" else OrtCache)
    np.testing.assert_array_equal(runner.forward(prompt, bound), SessionRun(runner).forward(prompt, plain))
    for _ in range(7):
        token = rng.integers(0, runner.config.vocab_size, (2, 1))
        np.testing.assert_array_equal(runner.forward(token, bound), SessionRun(runner).forward(token, plain))
    assert bound.length == plain.length == 12
    for name in plain.buffers:  # the cache the strided copies built is the one HostCache built
        np.testing.assert_array_equal(past_buffer(bound, name), plain.buffers[name], err_msg=name)


def test_cache_room_grows_with_the_context(runner):
    """The buffers grow in room_step positions as the context does (the graph attends over the
    whole room), the cached keys/values kept: the logits are those of a cache of the full capacity
    from the start, across each growth, in both bindings."""
    if runner.binding == "pointer":
        pytest.skip("the memory core's caches are sized once (CUDA graphs need fixed addresses)")
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, runner.config.vocab_size, (2, 3))
    grown, full = runner.new_cache(2, 15), HostCache(runner.spec, runner.config, 2, 15)
    grown.room_step, full.room_step = 4, 15
    rooms = []
    np.testing.assert_allclose(runner.forward(prompt, grown), SessionRun(runner).forward(prompt, full), rtol=0, atol=1e-6)
    for _ in range(12):
        rooms.append(grown.room)
        token = rng.integers(0, runner.config.vocab_size, (2, 1))
        np.testing.assert_allclose(runner.forward(token, grown), SessionRun(runner).forward(token, full),
                                   rtol=0, atol=1e-6)
    assert rooms == [4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 15, 15] and grown.room == 15 and full.room == 15
    for name in full.buffers:
        np.testing.assert_allclose(grown.buffers[name], full.buffers[name], rtol=0, atol=1e-6, err_msg=name)
    with pytest.raises(GptExportError, match="overflow"):
        runner.forward(token, grown)


@pytest.mark.parametrize("params", [SamplingParams(0.0), SamplingParams(0.8, top_k=20), SamplingParams(1.3, top_p=0.9)],
                         ids=["greedy", "top-k", "top-p"])
def test_generation_is_token_for_token_session_run(runner, params):
    """Batch 3, a 5-token prompt and 30 new tokens: past block_size 16 the window slides and the
    cache is rebuilt by a prefill every step; seeded sampling draws the same numbers on both sides."""
    prompt = np.random.default_rng(1).integers(0, runner.config.vocab_size, (3, 5))
    got = generate(runner, prompt, 30, params, np.random.default_rng(7))
    want = generate(SessionRun(runner), prompt, 30, params, np.random.default_rng(7))
    np.testing.assert_array_equal(got, want)
    assert prompt.shape[1] + got.shape[1] > runner.config.block_size


def test_decode_reuses_its_buffers_and_stops_at_capacity(runner):
    cache = runner.new_cache(1, 3)
    runner.forward(np.array([[1]]), cache)  # a 1-token prompt from an empty cache goes through the decode binding
    first = runner.forward(np.array([[2]]), cache)
    addresses = dict(cache.slot.decode.addresses) if runner.binding == "pointer" else None
    second = runner.forward(np.array([[3]]), cache)
    assert np.shares_memory(first, second) and cache.length == 3  # written in place: no per-step arrays
    if addresses is not None:
        assert cache.slot.decode.addresses == addresses  # fixed addresses, as a CUDA graph replays them
    with pytest.raises(GptExportError, match="overflow"):
        runner.forward(np.array([[4]]), cache)


def test_one_copy_appends_to_every_layer_when_the_tensors_are_back_to_back(tiny_model_dir):
    """The past buffers share one allocation at 256-byte aligned offsets. At batch 2 a new key of
    the tiny model is 256 bytes, so buffers and outputs are back to back and one strided copy
    appends a step to all of them; at batch 3 (384 bytes, padded) it is one copy per tensor."""
    runner = OrtRunner(load_model_dir(tiny_model_dir), binding="pointer")
    n = len(runner.spec.past_names)
    rng = np.random.default_rng(5)
    for batch, copies in ((2, [n]), (3, [1] * n)):
        cache, plain = runner.new_cache(batch, 8), HostCache(runner.spec, runner.config, batch, 8)
        for ids in (rng.integers(0, 60, (batch, 3)), rng.integers(0, 60, (batch, 1)), rng.integers(0, 60, (batch, 1))):
            np.testing.assert_array_equal(runner.forward(ids, cache), SessionRun(runner).forward(ids, plain))
        assert [tensors for *_, tensors in cache.slot.decode.appends] == copies
        for name in plain.buffers:
            np.testing.assert_array_equal(cache.read(name), plain.buffers[name], err_msg=f"batch {batch} {name}")


def test_caches_are_independent(runner):
    """Two generations on one runner (as from two threads) do not share binding state."""
    a, b = runner.new_cache(1, 6), runner.new_cache(1, 6)
    runner.forward(np.array([[1, 2]]), a)
    runner.forward(np.array([[5, 6, 7]]), b)
    la = runner.forward(np.array([[3]]), a).copy()
    runner.forward(np.array([[8]]), b)
    fresh = runner.new_cache(1, 6)
    runner.forward(np.array([[1, 2]]), fresh)
    np.testing.assert_array_equal(runner.forward(np.array([[3]]), fresh), la)


def test_pooled_slots_serve_the_next_generation_at_the_same_addresses(tiny_model_dir):
    """A pooled slot comes back (when its cache is dropped) with the previous generation's keys and
    values still in it; they are masked, so the next generation's tokens equal a fresh runner's."""
    md = load_model_dir(tiny_model_dir)
    pooled, plain = PooledRunner(md), OrtRunner(md)
    prompts = np.random.default_rng(2).integers(0, md.config.vocab_size, (2, 2, 4))
    greedy = SamplingParams(0.0)
    generate(pooled, prompts[0], 9, greedy, np.random.default_rng(0))
    cache = pooled.new_cache(2, 13)
    slot, addresses = cache.slot, dict(cache.slot.decode.addresses)
    assert slot.capacity == graph_capacity(13, md.config.block_size) == 16  # min(64, block_size)
    assert slot.graph_id >= 1  # ONNX Runtime's gpu_graph_id 0 is its default: never a slot's
    del cache
    gc.collect()
    got = generate(pooled, prompts[1], 9, greedy, np.random.default_rng(0))
    again = pooled.new_cache(2, 13)
    assert again.slot is slot and again.slot.decode.addresses == addresses
    np.testing.assert_array_equal(got, generate(plain, prompts[1], 9, greedy, np.random.default_rng(0)))
    pooled.deactivate()  # frees every slot; the live handle's buffers are gone with them
    assert not slot.past and not pooled.memory.sizes.keys() & set(addresses.values())


def test_slot_pool_hands_out_one_slot_per_cache():
    made = []
    pool = SlotPool()

    class Fake:  # a slot stand-in: the pool only reads batch and capacity
        def __init__(self, gid):
            self.batch, self.capacity, self.graph_id = 1, 8, gid
            made.append(self)

        def free(self):
            self.freed = True

    a, b = pool.take((1, 8), Fake), pool.take((1, 8), Fake)
    assert a is not b and (a.graph_id, b.graph_id) == (1, 2)
    pool.give(a)
    assert pool.take((1, 8), Fake) is a and len(made) == 2
    pool.close()
    assert all(s.freed for s in made)
    pool.give(b)  # after close, a returned slot is not kept
    assert pool.take((1, 8), Fake) is not b


@pytest.mark.parametrize("binding", ["pointer", "ortvalue"])
def test_decode_steps_allocate_no_arrays(tmp_path_factory, binding):
    """Once the first step has bound the cache, a step allocates nothing near the size of its logits.
    tracemalloc sees numpy's allocations (not ONNX Runtime's own): a per-step copy would show."""
    import tracemalloc

    from conftest import write_tiny_checkpoint

    from gptexport.convert.export import convert

    d = tmp_path_factory.mktemp("wide")
    out = convert(write_tiny_checkpoint(d / "ckpt.pt", meta=False, vocab_size=8192), d / "m", progress=lambda m: None)
    runner = OrtRunner(load_model_dir(out), binding=binding)
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


@pytest.mark.parametrize("binding", ["pointer", "ortvalue"])
def test_a_cache_survives_the_runner_being_reactivated(tiny_model_dir, binding):
    """Host buffers outlive a session: a cache rebinds to the new one (device buffers do not: see
    test_pooled_slots...)."""
    runner = OrtRunner(load_model_dir(tiny_model_dir), binding=binding)
    cache = runner.new_cache(1, 4)
    runner.forward(np.array([[1, 2]]), cache)
    before = runner.forward(np.array([[3]]), cache).copy()
    runner.deactivate()  # a new session on the next call: the cache binds to it
    again = runner.new_cache(1, 4)
    runner.forward(np.array([[1, 2]]), again)
    np.testing.assert_array_equal(runner.forward(np.array([[3]]), again), before)
    runner.deactivate()
    assert runner.forward(np.array([[4]]), cache).shape == (1, runner.config.vocab_size)


def test_a_gpu_provider_never_takes_the_ortvalue_binding(tiny_model_dir):
    from gptexport.errors import UsageError

    with pytest.raises(UsageError, match="copies a CPU OrtValue to the device when it is bound"):
        OrtRunner(load_model_dir(tiny_model_dir), "cuda", binding="ortvalue")
    assert OrtRunner(load_model_dir(tiny_model_dir), "cuda").binding == "pointer"


def test_host_memory_refuses_what_device_memory_would_corrupt():
    """The host twin checks every access against its allocations, as a GPU cannot."""
    from gptexport.runtime.backends.device import HostMemory
    from gptexport.runtime.backends.kvcache import Copy2D

    memory = HostMemory()
    a, b = memory.allocate(64), memory.allocate(64)
    assert a % 256 == 0 and b % 256 == 0  # aligned as cudaMalloc's
    memory.upload(a, np.arange(16, dtype=np.float32))
    memory.copy2d(b, a, Copy2D(dst_offset=16, dpitch=32, spitch=16, width=16, height=2))
    got = np.empty(16, np.float32)
    memory.download(got, b)
    assert got[4:8].tolist() == [0, 1, 2, 3] and got[12:16].tolist() == [4, 5, 6, 7]
    with pytest.raises(GptExportError, match="outside a buffer"):
        memory.upload(a, np.zeros(17, np.float32))
    with pytest.raises(GptExportError, match="outside a buffer"):
        memory.copy2d(b, a, Copy2D(dst_offset=40, dpitch=32, spitch=16, width=16, height=2))
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


def teacher_forced(runner, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Every step's logits when `tokens` are fed as generate() would feed them: prefill, decode
    steps, and past block_size a recomputed window each step."""
    block_size = runner.config.block_size
    context = list(prompt.T[-block_size:])
    cache = runner.new_cache(prompt.shape[0], min(block_size, len(context) + tokens.shape[1]))
    out = [runner.forward(np.stack(context, axis=1), cache).copy()]
    for token in tokens.T[:-1]:
        context.append(token)
        if len(context) <= block_size:
            out.append(runner.forward(token[:, None], cache).copy())
        else:
            del context[0]
            cache.reset()
            out.append(runner.forward(np.stack(context, axis=1), cache).copy())
    return np.stack(out)


@cuda_test
@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graphs", "plain-launches"])
def test_cuda_provider_matches_the_cpu_step_for_step(tiny_model_dir, graphs):
    """fp32 with TF32 off: the device cache, the strided appends and the decode graph give the CPU's
    logits, across the block_size crop, twice (the second generation on the pooled slot)."""
    md = load_model_dir(tiny_model_dir)
    rng = np.random.default_rng(3)
    cpu = OrtRunner(md)
    with OrtRunner(md, "cuda", cuda_graphs=graphs) as gpu:
        assert gpu.memory.ort_device == "cuda" and gpu.session.get_providers()[0] == "CUDAExecutionProvider"
        for _ in range(2):
            prompt = rng.integers(0, md.config.vocab_size, (2, 6))
            tokens = rng.integers(0, md.config.vocab_size, (2, 20))
            np.testing.assert_allclose(teacher_forced(gpu, prompt, tokens), teacher_forced(cpu, prompt, tokens),
                                       atol=1e-4, rtol=1e-4)
        cache = gpu.new_cache(1, 8)
        gpu.forward(np.array([[1, 2, 3]]), cache)
        for t in range(4):
            gpu.forward(np.array([[t]]), cache)
        state = cache.slot.backend_state
        assert state.captured and (state.options is gpu._plain) != graphs  # a graph id only with graphs
        want = HostCache(md.spec, md.config, 1, cache.capacity)
        SessionRun(cpu).forward(np.array([[1, 2, 3, 0, 1, 2, 3]]), want)
        np.testing.assert_allclose(cache.read("past_value.1")[:, :, :7], want.buffers["past_value.1"][:, :, :7],
                                   atol=1e-5)
