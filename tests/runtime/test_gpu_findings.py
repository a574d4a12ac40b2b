"""The GPU findings of issue 26, each caught on the CPU: the code a GPU runs, run on the host twin.

- a decode bucket never exceeds the cache's rows nor the engine's profiles (max-batch 3, 5, 6), and
  a tensor bound past the end of its buffer is refused rather than read;
- ONNX Runtime's refusal to capture CUDA graphs, in both of its wordings, falls back to plain
  launches with one notice, while a provider that cannot start still stops with its one line;
- the graph ids a batch cache hands out are bounded: growth and later caches reuse them;
- TensorRT: each decode bucket has its own execution context, captured once however the number of
  rows changes;
- onnxruntime >= 1.20 (bind_input/bind_output with an integer element type), explicit int64 arrays.

ONNX Runtime's CUDA provider and TensorRT cannot run here. Where they are needed, a stand-in plays
only their part (the session's creation error, an execution context's enqueue and its capture), and
the graph itself runs on ONNX Runtime's CPU provider over the host twin's buffers, so a capture that
replays stale addresses or shapes gives wrong logits.
"""

from __future__ import annotations

import ast
import os
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.config import numpy_dtype
from gptexport.errors import BackendUnavailable, GptExportError
from gptexport.profiles import profile_shapes, select_profile, step_shapes
from gptexport.runtime.backends import buckets
from gptexport.runtime.backends.batchcache import BatchCache
from gptexport.runtime.backends.buckets import GraphArenas, graph_bucket
from gptexport.runtime.backends.device import HostMemory
from gptexport.runtime.backends.ort import OrtRunner
from gptexport.runtime.backends.ort_session import SessionLoader, _is_provider_failure, is_graph_capture_refusal
from gptexport.runtime.backends.trt import TrtRunner
from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.scheduler import Scheduler, Sequence

ROOT = Path(__file__).resolve().parents[2]

# What onnxruntime raises and logs, word for word (inference_session.cc and transformer_memcpy.cc;
# the newer wording is in the onnxruntime-gpu 1.31.1 binaries, the older in its earlier sources)
REFUSAL_OLD = ("This session cannot use the CUDA Graph feature as requested by the user  as all compute graph "
               "nodes have not been partitioned to the CUDA EP.")
REFUSAL_NEW = ("This session cannot use the graph capture feature as requested by the user  as all compute graph "
               "nodes have not been partitioned to the CUDAExecutionProvider")
MEMCPY_WARNING = ("2026-12-06 20:00:00.000000000 [W:onnxruntime:, transformer_memcpy.cc:83 ApplyImpl] 4 Memcpy "
                  "nodes are added to the graph main_graph for CUDAExecutionProvider. It might have negative impact "
                  "on performance (including unable to run CUDA graph). Set session_options.log_severity_level=1 to "
                  "see the detail logs before this message.\n")
LOAD_FAILURE = ("/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1862 onnxruntime::Provider& "
                "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
                "libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: cannot open shared object file: "
                "No such file or directory")


def ort_error(message: str) -> Fail:
    """The exception onnxruntime's Python binding raises for a FAIL status."""
    return Fail(f"[ONNXRuntimeError] : 1 : FAIL : {message}")


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory) -> Path:
    """A tiny model with block_size 160: caches under CUDA graphs grow 64 -> 128 -> 160."""
    from conftest import write_tiny_checkpoint

    from gptexport.convert.export import convert

    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("long") / "ckpt.pt", block_size=160)
    return convert(ckpt, tmp_path_factory.mktemp("export") / "long", progress=lambda msg: None)


def pointer_runner(model_dir) -> OrtRunner:
    return OrtRunner(load_model_dir(model_dir), threads=1)


class GraphLayoutRunner(OrtRunner):
    """The CPU provider with its batch caches laid out as under CUDA graphs (buckets, an arena kept
    across caches): what ort-cuda and tensorrt run, minus the capture."""

    def __init__(self, model_dir):
        super().__init__(load_model_dir(model_dir), threads=1)
        self.arenas = GraphArenas()

    def new_batch_cache(self, rows: int, capacity: int) -> BatchCache:
        self.activate()
        return BatchCache(self.memory, self.spec, self.config, rows, capacity, self._execute, self._decode,
                          graphs=self.arenas)


# ---- 1. buckets within the rows and the profiles; bound extents checked ----

def test_a_tensor_bound_past_the_end_of_its_buffer_is_refused(tiny_model_dir):
    """A decode of 4 rows bound over a 3-row cache's past buffers: the last layer's rows lie past the
    allocation. ONNX Runtime would read them; the runner refuses to bind them."""
    with pointer_runner(tiny_model_dir) as r:
        cache = r.new_batch_cache(3, 12)
        d = buckets.Bucket(r.memory, r.spec, r.config, 4, cache.capacity, cache.past).decode_buffers()
        with pytest.raises(GptExportError, match="outside a buffer"):
            r._execute(None, d.input_shapes, d.output_shapes, d.addresses)
        cache.close()


@pytest.mark.parametrize("rows", [3, 5, 6])
def test_decode_buckets_never_exceed_the_rows(tiny_model_dir, rows):
    """Non-power-of-two max batch: every n decodes at a bucket <= rows, with the exact run's logits."""
    with pointer_runner(tiny_model_dir) as r:
        exact = r.new_batch_cache(rows, 12)
        graphs = BatchCache(r.memory, r.spec, r.config, rows, 12, r._execute, r._decode, graphs=GraphArenas())
        for cache in (exact, graphs):
            for row in range(rows):
                cache.prefill(row, np.arange(1, row + 3))
        for n in range(rows, 0, -1):
            np.testing.assert_allclose(exact.decode(np.arange(n) + 1), graphs.decode(np.arange(n) + 1), atol=1e-5)
        sizes = sorted(size for size, _ in graphs.arena.buckets)
        assert max(sizes) == rows and sizes == sorted({graph_bucket(n, rows) for n in range(1, rows + 1)})
        exact.close()
        graphs.close()


@pytest.mark.parametrize("max_batch", [1, 2, 3, 5, 6, 8, 12])
def test_every_decode_bucket_is_in_a_profile_of_the_engine(tiny_model_dir, max_batch):
    """An engine built with --max-batch B: its decode profile takes every bucket a cache of B rows runs."""
    d = load_model_dir(tiny_model_dir)
    profiles = profile_shapes(d.config, d.spec, max_batch)
    for n in range(1, max_batch + 1):
        for capacity in (1, d.config.block_size):
            shapes = step_shapes(d.spec, graph_bucket(n, max_batch), 1, capacity, 1)
            assert select_profile(profiles, shapes) is not None, (n, shapes["input_ids"])


# ---- 2. the CUDA-graph refusal, in both wordings ----

@pytest.mark.parametrize("refusal", [REFUSAL_OLD, REFUSAL_NEW])
def test_the_graph_capture_refusal_is_not_a_provider_failure(refusal):
    error = ort_error(refusal)
    assert is_graph_capture_refusal(error)
    assert not _is_provider_failure(error, MEMCPY_WARNING, "CUDAExecutionProvider")
    assert _is_provider_failure(RuntimeError(LOAD_FAILURE), "", "CUDAExecutionProvider")
    assert not is_graph_capture_refusal(RuntimeError(LOAD_FAILURE))


class CudaProviderStandIn:
    """onnxruntime as the GPU wheel where the CUDA provider fails as given: it logs `log` on fd 2
    and raises `error` (with enable_cuda_graph=1 only, or always); otherwise the real CPU provider
    runs the session, which reports itself as the CUDA provider's."""

    def __init__(self, error: Exception, log: str, only_with_graphs: bool = True):
        self.error, self.log, self.only_with_graphs = error, log, only_with_graphs
        self.__version__ = onnxruntime.__version__
        self.SessionOptions = onnxruntime.SessionOptions
        self.GraphOptimizationLevel = onnxruntime.GraphOptimizationLevel
        self.created: list[dict] = []

    def get_available_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, path, sess_options, providers, enable_fallback):  # noqa: N802 (onnxruntime's name)
        options = providers[0][1]
        self.created.append(options)
        if options.get("enable_cuda_graph") == "1" or not self.only_with_graphs:
            os.write(2, self.log.encode())
            raise self.error
        session = onnxruntime.InferenceSession(path, sess_options, providers=["CPUExecutionProvider"])
        return SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
                               run=session.run)


@pytest.mark.parametrize("refusal", [REFUSAL_OLD, REFUSAL_NEW])
def test_a_refused_capture_runs_without_graphs_after_one_notice(tiny_model_dir, capsys, refusal):
    ort = CudaProviderStandIn(ort_error(refusal), MEMCPY_WARNING)
    loaded = SessionLoader(load_model_dir(tiny_model_dir), "cuda", 1, cuda_graphs=True)(0, ort)
    assert loaded.cuda_graphs is False and [o["enable_cuda_graph"] for o in ort.created] == ["1", "0"]
    notices = capsys.readouterr().err.splitlines()
    assert len(notices) == 1 and notices[0].startswith("notice: ONNX Runtime cannot use CUDA graphs"), notices
    assert "4 Memcpy nodes are added to the graph main_graph for CUDAExecutionProvider" in notices[0]
    ids = np.array([[1, 2, 3]], np.int64)
    logits = loaded.session.run(["logits"], {"input_ids": ids, "past_length": np.zeros(1, np.int64),
                                             "logit_positions": np.array([2], np.int64),
                                             **{n: np.zeros((1, 2, 0, 16), np.float32)
                                                for n in load_model_dir(tiny_model_dir).spec.past_names}})[0]
    assert np.isfinite(logits).all()


def test_a_provider_that_cannot_start_still_stops_with_one_line(tiny_model_dir, capsys):
    ort = CudaProviderStandIn(RuntimeError(LOAD_FAILURE), "", only_with_graphs=False)
    with pytest.raises(BackendUnavailable) as e:
        SessionLoader(load_model_dir(tiny_model_dir), "cuda", 1, cuda_graphs=True)(0, ort)
    assert len(ort.created) == 1 and capsys.readouterr().err == ""
    assert "could not start CUDAExecutionProvider" in str(e.value) and "\n" not in str(e.value)
    assert "libcublasLt.so.12: cannot open shared object file" in str(e.value)


# ---- 3. graphs cannot pile up ----

def workload(scheduler: Scheduler, rows: int) -> list:
    """Waves of sequences whose reach grows past 64 and 128 positions while others decode."""
    seqs = []
    for wave, new in enumerate((8, 50, 90, 140)):
        for i in range(rows + 1):
            params = GenerationParams(new + 3 * i, SamplingParams(0.0), 0)
            seqs.append(scheduler.submit(Sequence([1 + i, 2 + wave], params)))
        scheduler.step()
    scheduler.run()
    return [s.tokens for s in seqs]


def test_graph_ids_are_reused_across_growth_and_caches(long_model_dir):
    """A server's rounds: the cache grows 64 -> 128 -> 160 and is closed when idle; the second round
    hands out no new graph id, and the tokens are those of the exact (no-graph) layout."""
    exact = pointer_runner(long_model_dir)
    with exact, GraphLayoutRunner(long_model_dir) as graphs:
        want = workload(Scheduler(exact, 3), 3)
        first = next(buckets._GRAPH_IDS)
        assert workload(Scheduler(graphs, 3), 3) == want
        second = next(buckets._GRAPH_IDS)
        assert workload(Scheduler(graphs, 3), 3) == want
        assert next(buckets._GRAPH_IDS) == second + 1  # only the probe's own id: nothing new
        # buckets 1, 2, 3 at capacities 64, 128, 160: at most nine graphs
        assert second - first - 1 == graphs.arenas.graph_ids() <= 9
        assert sorted({c for _, c in graphs.arenas.all[0].buckets}) == [64, 128, 160]


def test_a_cache_in_an_arena_starts_from_zeros(tiny_model_dir):
    """What an earlier cache left in the arena (a NaN from a broken row, here) is not read by the
    next one: masked positions are multiplied by 0, and 0 * NaN is NaN."""
    with GraphLayoutRunner(tiny_model_dir) as r:
        first = r.new_batch_cache(2, 12)
        block, size = first.block, len(r.spec.past_names) * first.stride
        first.close()
        r.memory.view(block, (size // 4,), np.float32)[...] = np.nan
        cache = r.new_batch_cache(2, 12)
        assert cache.block == block  # the same arena, the same addresses
        cache.prefill(0, np.array([1, 2, 3]))
        cache.prefill(1, np.array([4, 5]))
        assert np.isfinite(cache.decode(np.array([6, 7]))).all()
        cache.close()


# ---- 4. TensorRT: a decode context per bucket ----

class HostGraphMemory(HostMemory):
    """The host twin with the CUDA memory core's graph calls: while capturing, what an execution
    context enqueues is recorded (with the shapes and addresses it was set up with), not run."""

    stream_handle = 0

    def __init__(self):
        super().__init__()
        self.recording, self.captures, self.launches, self.destroyed = None, 0, 0, 0

    def begin_capture(self) -> None:
        self.recording = []

    def end_capture(self, recorded_ok: bool):
        graph, self.recording = self.recording, None
        self.captures += 1
        return graph if recorded_ok else None

    def launch(self, graph) -> None:
        self.launches += 1
        for step in graph:
            step()

    def destroy_graph(self, graph) -> None:
        self.destroyed += 1


class HostContext:
    """A TensorRT execution context's contract (shapes, addresses, enqueue), the graph run by ONNX
    Runtime's CPU provider over the host twin's buffers."""

    def __init__(self, inner: OrtRunner, memory: HostGraphMemory):
        self.inner, self.memory, self.shapes, self.addresses, self.enqueues = inner, memory, {}, {}, 0

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr

    def execute_async_v3(self, stream: int) -> bool:
        shapes, addresses, spec, m = dict(self.shapes), dict(self.addresses), self.inner.spec, self.memory

        def step():
            feeds = {t.name: m.view(addresses[t.name], shapes[t.name], numpy_dtype(t.dtype)) for t in spec.inputs}
            outputs = self.inner.infer(feeds)
            for t in spec.outputs:
                m.view(addresses[t.name], outputs[t.name].shape, numpy_dtype(t.dtype))[...] = outputs[t.name]

        if self.memory.recording is not None:
            self.memory.recording.append(step)
        else:
            self.enqueues += 1
            step()
        return True


def host_trt_runner(model_dir, inner: OrtRunner, max_batch: int) -> TrtRunner:
    """A TrtRunner as activate() leaves it, with an engine of two profiles (prefill, decode) for
    batches 1..max_batch whose contexts are HostContexts."""
    d = load_model_dir(model_dir)
    r = TrtRunner.__new__(TrtRunner)
    r.model_dir, r.config, r.spec, r.max_batch, r.cuda_graphs = d, d.config, d.spec, max_batch, True
    r.record = SimpleNamespace(engine="model.engine", max_batch=max_batch,
                               profiles=profile_shapes(d.config, d.spec, max_batch))
    r.memory, r.trt = HostGraphMemory(), SimpleNamespace()
    r.engine = SimpleNamespace(num_optimization_profiles=2,
                               create_execution_context=lambda *a: HostContext(inner, r.memory))
    r.contexts = [HostContext(inner, r.memory) for _ in range(2)]
    r.graph_arenas = GraphArenas()
    return r


def test_tensorrt_captures_each_bucket_once_whatever_the_rows_do(tiny_model_dir):
    """Rows 4, 1, 4, 2, 1, 4...: each bucket (1, 2, 4) captured once, then only launched; logits as
    the exact run's, so no launch replays another bucket's set-up."""
    with pointer_runner(tiny_model_dir) as inner:
        trt = host_trt_runner(tiny_model_dir, inner, 4)
        exact, cache = inner.new_batch_cache(4, 12), trt.new_batch_cache(4, 12)
        for c in (exact, cache):
            for row in range(4):
                c.prefill(row, np.arange(1, row + 3))
        for step, n in enumerate([4, 1, 4, 2, 1, 4, 2, 4]):
            ids = (np.arange(n) + step) % 5 + 1
            np.testing.assert_allclose(exact.decode(ids), cache.decode(ids), atol=1e-5)
        # 8 steps: each bucket's first plain (3), its second captured and launched (3), then launched (2)
        assert trt.memory.captures == 3 and trt.memory.launches == 5 and trt.memory.destroyed == 0
        cache.close()
        exact.close()


def test_tensorrt_runs_a_non_power_of_two_max_batch(tiny_model_dir):
    """An engine built with --max-batch 3 and the scheduler at 3: three rows decode at bucket 3."""
    with pointer_runner(tiny_model_dir) as inner:
        trt = host_trt_runner(tiny_model_dir, inner, 3)
        params = [GenerationParams(6, SamplingParams(0.0), 0) for _ in range(3)]
        want = Scheduler(inner, 3)
        got = Scheduler(trt, 3)
        expected = [want.submit(Sequence([1 + i, 2], p)) for i, p in enumerate(params)]
        seqs = [got.submit(Sequence([1 + i, 2], p)) for i, p in enumerate(params)]
        want.run()
        got.run()
        assert [s.tokens for s in seqs] == [s.tokens for s in expected]
        assert all(s.finish == "length" for s in seqs)


def test_tensorrt_engines_prefill_prompts_whole(tiny_model_dir):
    """gptexport build's prefill profile has past 0: no chunk after a past would find a profile, so
    the scheduler prefills whole prompts there, whatever its prefill_chunk."""
    with pointer_runner(tiny_model_dir) as inner:
        trt = host_trt_runner(tiny_model_dir, inner, 2)
        assert not trt.chunked_prefill and inner.chunked_prefill
        params = GenerationParams(5, SamplingParams(0.0), 0)
        want, got = Scheduler(inner, 2, prefill_chunk=2), Scheduler(trt, 2, prefill_chunk=2)
        expected = [want.submit(Sequence(list(range(1, 8 + i)), params)) for i in range(2)]
        seqs = [got.submit(Sequence(list(range(1, 8 + i)), params)) for i in range(2)]
        want.run()
        got.run()
        assert [s.finish for s in seqs] == ["length", "length"], [s.error for s in seqs]
        assert [s.tokens for s in seqs] == [s.tokens for s in expected]


# ---- 5, 6. onnxruntime >= 1.20; explicit int64 ----

def test_onnxruntime_is_required_at_1_20_or_later():
    """bind_input/bind_output with an integer element type (what the pointer binding passes) came
    in onnxruntime 1.20."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"onnxruntime\b", d))
    low = re.search(r">=\s*(\d+)\.(\d+)", spec)
    assert low and (int(low.group(1)), int(low.group(2))) >= (1, 20), spec


ARRAY_MAKERS = {"array", "zeros", "empty", "full", "ones", "arange", "asarray", "frombuffer"}


@pytest.mark.parametrize("module", ["batchcache.py", "buckets.py", "ort.py", "trt.py", "device.py"])
def test_arrays_uploaded_to_device_memory_name_their_dtype(module):
    """An array built without a dtype takes the platform's default int (int32 on Windows with numpy
    1.x) while its buffer is bound as int64: every numpy array these modules build names its dtype."""
    tree = ast.parse((ROOT / "gptexport" / "runtime" / "backends" / module).read_text())
    missing = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ARRAY_MAKERS
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "np"):
            positional = 3 if node.func.attr in ("arange", "full") else 2
            if len(node.args) < positional and not any(k.arg == "dtype" for k in node.keywords):
                missing.append(f"{module}:{node.lineno} np.{node.func.attr}")
    assert not missing, missing
