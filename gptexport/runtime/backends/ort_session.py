"""ONNX Runtime sessions: provider options, and a session on exactly the provider asked for, or an error.

ONNX Runtime does not fail when a listed GPU provider cannot start (its CUDA or TensorRT libraries
missing, no driver): the CUDA provider logs an error and the session runs on the CPU, and for the
TensorRT provider the Python API prints to stdout and retries on the CPU. So after creating a
session we compare `session.get_providers()[0]` with the provider asked for, and stop with one line
naming it, what ONNX Runtime reported, and how to fix it. What ONNX Runtime prints while it tries
(its native log on file descriptor 2, the Python fallback's and preload_dlls' prints on stdout) is
captured during that one call, so the user sees our one line and nothing on stdout.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, field

from ...artifacts.modeldir import ModelDir
from ...errors import BackendUnavailable, GptExportError, ModelDirError, first_line
from .base import notice
from .kernels import session_model

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# IOBinding element types as ONNX TensorProto numbers (bind_input/bind_output take a numpy type or
# this integer; the integer also covers bfloat16, which numpy has not)
ELEMENT_TYPES = {"float32": 1, "int64": 7, "float16": 10, "bfloat16": 16}
ORT_TRT_MAX_BATCH = 8  # the TensorRT provider's profile admits batches 1..8, tuned for 1
GPU_INSTALL = "pip install 'onnxruntime-gpu[cuda,cudnn]' brings them as NVIDIA wheels; see docs/tensorrt.md"


def import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime "
                                 "(or onnxruntime-gpu for the CUDA/TensorRT providers)") from None
    return onnxruntime


def provider_options(provider: str, model_dir: ModelDir, stream: int = 0, tf32: bool = False,
                     cuda_graphs: bool = False) -> dict:
    """Per-provider options (onnxruntime.ai, CUDA- and TensorRT-ExecutionProvider, "Configurations").

    CUDA provider:
    - user_compute_stream: the memory core's stream (as a decimal string). ONNX Runtime then runs
      every kernel on it (and sets has_user_compute_stream itself, onnxruntime#19229), so our
      uploads, its kernels, our cache appends and downloads are ordered by that one stream.
    - use_tf32: "0" unless asked: fp32 means fp32, as in the PyTorch reference (TF32 gave the
      shipped model a max logit error of 1.2e-3 on an H200, 1.0e-5 without).
    - enable_cuda_graph: decode steps are captured once per (batch, capacity) at fixed addresses and
      replayed; every other run passes gpu_graph_id -1 (no capture).
    TensorRT provider:
    - user_compute_stream, as above.
    - trt_fp16_enable stays off whatever the dtype: with it ONNX Runtime builds a weakly typed
      network and TensorRT may run the graph's fp32 LayerNorm, softmax and logits in fp16; without
      it the network is strongly typed and precision is the graph's, as in `gptexport build`.
      There is no TF32 option: TensorRT's own default (TF32 allowed) applies to fp32 graphs.
    - trt_profile_{min,opt,max}_shapes: one explicit profile spanning prefill and decode (the
      provider runs on its first profile only); trt_engine_cache_*/trt_timing_cache_* beside the model.
    """
    if provider == "cuda":
        opts = {"device_id": "0", "use_tf32": "1" if tf32 else "0", "enable_cuda_graph": "1" if cuda_graphs else "0"}
        return {**opts, "user_compute_stream": str(stream)} if stream else opts
    if provider == "tensorrt":
        from ...profiles import ort_profile_options, profile_shapes, union_profile

        cache = model_dir.path / "ort_trt_cache"
        c, spec = model_dir.config, model_dir.spec
        decode_b1 = profile_shapes(c, spec, 1)[-1]  # tuned for what generate runs: one sequence, decoding
        profile = union_profile(profile_shapes(c, spec, ORT_TRT_MAX_BATCH), opt_from=decode_b1)
        opts = {"device_id": "0", "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                "trt_fp16_enable": False, **ort_profile_options(profile)}
        return {**opts, "user_compute_stream": str(stream)} if stream else opts
    return {}


def session_options(ort, threads: int | None):
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def run_options(ort, graph_id: int | None):
    """RunOptions with gpu_graph_id: a graph's id for a captured decode step, -1 for no capture."""
    if graph_id is None:
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


def create_session(ort, model_dir: ModelDir, provider: str, threads: int | None, options: dict,
                   kernels: str = "auto"):
    """An InferenceSession whose first provider is the one asked for, and how many nodes of each of
    our ops its graph holds; BackendUnavailable otherwise, GraphCaptureRefused where ONNX Runtime will
    not capture this model in CUDA graphs.

    On the CPU provider, `kernels` (off|auto|on) swaps our ops in for MatMulNBits, the int8 patterns
    and the attention in the graph the session loads (backends/kernels.py); the model directory is
    left as it is."""
    wanted = PROVIDERS[provider]
    model = session_model(model_dir.onnx_path, kernels if wanted == "CPUExecutionProvider" else "off")
    providers = [(wanted, options)]
    if wanted != "CPUExecutionProvider":
        providers.append(("CPUExecutionProvider", {}))  # for the shape nodes ONNX Runtime keeps on the CPU
    error, session = None, None
    with captured_output(enabled=wanted != "CPUExecutionProvider") as log:
        if wanted != "CPUExecutionProvider" and hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):  # what it could not load, it prints; that is in `log`
                ort.preload_dlls()
        try:
            # enable_fallback=0: no silent retry on the CPU provider (the retry is printed to stdout)
            opts = session_options(ort, threads)
            model.configure(opts)
            session = ort.InferenceSession(model.model, sess_options=opts, providers=providers, enable_fallback=0)
        except Exception as e:  # onnxruntime raises its own types for unreadable or invalid models
            error = e
    if error is not None:
        if is_graph_capture_refusal(error):  # the provider started; it only will not capture this graph
            raise GraphCaptureRefused(f"{_error_gist(error)}{memcpy_warning(log.text)}") from error
        if wanted != "CPUExecutionProvider" and _is_provider_failure(error, log.text, wanted):
            raise BackendUnavailable(not_started(ort, wanted, None, log.text, error)) from error
        raise ModelDirError(f"{model_dir.onnx_path}: ONNX Runtime cannot load it "
                            f"({type(error).__name__}: {first_line(error)})") from error
    got = session.get_providers()[0]
    if got != wanted:
        raise BackendUnavailable(not_started(ort, wanted, got, log.text, None))
    return session, model.ops


class GraphCaptureRefused(GptExportError):
    """ONNX Runtime will not capture this model in CUDA graphs (the session can run without them)."""


# ONNX Runtime refuses CUDA graphs while creating the session when a compute node of the model runs
# outside the CUDA provider (inference_session.cc). Older releases say "This session cannot use the
# CUDA Graph feature as requested by the user  as all compute graph nodes have not been partitioned
# to the CUDA EP.", newer ones "This session cannot use the graph capture feature as requested by the
# user as all compute graph nodes have not been partitioned to the CUDAExecutionProvider"; both name
# the provider, as does the WARNING that gives the cause ("N Memcpy nodes are added to the graph
# main_graph for CUDAExecutionProvider. It might have negative impact on performance (including unable
# to run CUDA graph)..."), so neither may be read as the provider failing to start.
GRAPH_CAPTURE_REFUSALS = ("cannot use the cuda graph feature", "cannot use the graph capture feature")


def is_graph_capture_refusal(error: Exception) -> bool:
    """Whether ONNX Runtime's error is its refusal to capture CUDA graphs (either wording)."""
    text = str(error).lower()
    return any(s in text for s in GRAPH_CAPTURE_REFUSALS)


def memcpy_warning(log: str) -> str:
    """'; <N> Memcpy nodes ...' where ONNX Runtime's log says why it refused graphs, else ''."""
    found = re.search(r"\d+ Memcpy nodes are added to the graph \S+ for \S+?\.", _strip_ansi(log))
    return f"; {found.group(0)}" if found else ""


def _is_provider_failure(error: Exception, log: str, wanted: str) -> bool:
    if is_graph_capture_refusal(error):
        return False  # it names the provider, which did start
    text = f"{error}\n{log}"
    return any(s in text for s in ("Failed to load library", "Failed to create", "install TensorRT",
                                   "GPU requirements", wanted, "CUDA failure", "cudaError"))


@dataclass
class LoadedSession:
    """What a SessionLoader built: the session, the onnxruntime module, whether decode steps may
    be captured in CUDA graphs (False where asked for but refused), and our ops in its graph."""

    ort: object
    session: object
    cuda_graphs: bool
    ops: dict[str, int] = field(default_factory=dict)  # e.g. {"CachedAttention": 12}


@dataclass
class SessionLoader:
    """Builds a model directory's InferenceSession on one provider, as Polygraphy's loaders build
    what its runners run: the provider's options, the session's, the check that the provider asked
    for is the one running, and the CUDA-graph fallback (a refusal is one notice and a session
    without graphs). OrtRunner only runs what this returns."""

    model_dir: ModelDir
    provider: str = "cpu"
    threads: int | None = None
    tf32: bool = False
    cuda_graphs: bool = False
    kernels: str = "auto"  # our CPU kernels for MatMulNBits: off, auto, on (backends/kernels.py)

    def __call__(self, stream: int = 0, ort=None) -> LoadedSession:
        """The session, its kernels on `stream` (a CUDA stream handle; 0: the provider's own)."""
        ort = ort or import_ort()
        wanted, available = PROVIDERS[self.provider], ort.get_available_providers()
        if wanted not in available:
            raise BackendUnavailable(f"ONNX Runtime provider {wanted} is not available here; "
                                     f"available: {', '.join(available)}")
        opts = provider_options(self.provider, self.model_dir, stream, self.tf32, self.cuda_graphs)
        try:
            session, ops = create_session(ort, self.model_dir, self.provider, self.threads, opts, self.kernels)
            return LoadedSession(ort, session, self.cuda_graphs, ops)
        except GraphCaptureRefused as e:
            if not self.cuda_graphs:
                raise
            notice(f"ONNX Runtime cannot use CUDA graphs for this model ({e}); decode runs with plain launches")
            opts = {**opts, "enable_cuda_graph": "0"}
            session, ops = create_session(ort, self.model_dir, self.provider, self.threads, opts, self.kernels)
            return LoadedSession(ort, session, False, ops)


def not_started(ort, wanted: str, got: str | None, log: str, error: Exception | None) -> str:
    """One line: which provider did not start, what ONNX Runtime said, how to fix it."""
    said = reported(log, error)
    fell = f" and fell back to {got}" if got else ""
    if wanted == "TensorrtExecutionProvider":
        fix = ("install the CUDA libraries and TensorRT 10 (libnvinfer.so.10) it was built for, on the library "
               "path, or use --backend ort-cuda or onnxruntime")
    else:
        fix = f"install the CUDA and cuDNN libraries it was built for ({GPU_INSTALL}), or use --backend onnxruntime"
    return (f"ONNX Runtime {ort.__version__} could not start {wanted}{fell}: {said}; {fix}")


def reported(log: str, error: Exception | None) -> str:
    """The gist of what ONNX Runtime logged or raised: a library it failed to load and why, and the
    CUDA/cuDNN versions it requires, else its first error line."""
    text = _strip_ansi(log)
    parts = []
    loads = re.findall(r"Failed to load library (\S+) with error: ([^\n]+)", text)
    if loads:
        lib, why = loads[-1]
        parts.append(f"{os.path.basename(lib)}: {why.strip()}")
    requires = re.search(r"Require (cuDNN \S+ and CUDA \S+)", text)
    if requires:
        parts.append(f"it requires {requires.group(1).rstrip('.')}")
    if not parts and error is not None:
        parts.append(_error_gist(error))
    if not parts:
        errors = [ln for ln in text.splitlines() if "[E:" in ln or "rror" in ln]
        parts.append(_squash(errors[-1]) if errors else "no reason given in its log")
    return "; ".join(parts)


def _error_gist(error: Exception) -> str:
    line = first_line(error)
    # drop the "/onnxruntime_src/...cc:729 void onnxruntime::...(...)" prefix of ORT_THROW messages
    return re.sub(r"^/\S+:\d+ [^)]*\)\s*", "", line) or line


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _squash(line: str) -> str:
    return " ".join(line.split())


_CAPTURE_LOCK = threading.Lock()


class _Captured:
    text = ""


@contextlib.contextmanager
def captured_output(enabled: bool = True):
    """Capture file descriptor 2 (ONNX Runtime's native log) and sys.stdout (its Python prints).

    File descriptors are process-wide: the capture is serialized and lasts only for the session's
    creation. What is captured is handed to the caller, not replayed.
    """
    captured = _Captured()
    if not enabled:
        yield captured
        return
    with _CAPTURE_LOCK, tempfile.TemporaryFile() as tmp, contextlib.redirect_stdout(io.StringIO()) as out:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.text = tmp.read().decode(errors="replace") + out.getvalue()
