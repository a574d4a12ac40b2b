"""ONNX Runtime backend: CPU by default, CUDA or TensorRT execution providers when asked for.

Decode steps run through an IOBinding made once per cache (OrtCache): the past inputs are bound
to the pre-allocated cache buffers themselves and every output to a buffer owned by the cache, so
a step feeds ONNX Runtime no new arrays, allocates nothing and copies only the new position's
keys and values into the cache. Prefill and all-logits calls, a few per generation, use run().
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendUnavailable, GptExportError, ModelDirError, UsageError
from ..modeldir import ModelDir
from .base import HostCache, Runner

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime "
                                 "(or onnxruntime-gpu for the CUDA/TensorRT providers)") from None
    return onnxruntime


ORT_TRT_MAX_BATCH = 8  # the TensorRT provider's profile admits batches 1..8, tuned for 1


def provider_options(provider: str, model_dir: ModelDir) -> dict:
    """Per-provider options; the TensorRT provider caches its engines beside the model.

    TensorRT provider (onnxruntime.ai TensorRT-ExecutionProvider, "Configurations"):
    - trt_fp16_enable stays off whatever the dtype: with it ONNX Runtime builds a weakly typed
      network and TensorRT may run the graph's fp32 LayerNorm, softmax and logits in fp16; without
      it the network is strongly typed and precision is the graph's (convert --dtype), as in
      `gptexport build`. TensorRT 11 has no FP16 builder flag at all.
    - trt_profile_{min,opt,max}_shapes: without explicit profiles the provider sizes its profile
      from the shapes seen so far and rebuilds the engine when one falls outside. The provider
      runs on its first profile only, so this is one profile spanning prefill and decode.
    CUDA provider: it compiles nothing per model, so there is no engine cache to configure.
    """
    if provider == "tensorrt":
        from ..engine import ort_profile_options, profile_shapes, union_profile

        cache = model_dir.path / "ort_trt_cache"
        c, spec = model_dir.config, model_dir.spec
        decode_b1 = profile_shapes(c, spec, 1)[-1]  # tuned for what generate runs: one sequence, decoding
        profile = union_profile(profile_shapes(c, spec, ORT_TRT_MAX_BATCH), opt_from=decode_b1)
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                "trt_fp16_enable": False, **ort_profile_options(profile)}
    return {}


class OrtRunner(Runner):
    """Runs OUTDIR/model.onnx in an onnxruntime.InferenceSession."""

    def __init__(self, model_dir: ModelDir, provider: str = "cpu", threads: int | None = None):
        if provider not in PROVIDERS:
            raise UsageError(f"unknown ONNX Runtime provider {provider!r}; valid: {', '.join(PROVIDERS)}")
        self.model_dir, self.provider, self.threads = model_dir, provider, threads
        self.config, self.spec = model_dir.config, model_dir.spec
        self.name = f"onnxruntime-{provider}"
        self.session = None

    def activate(self) -> None:
        if self.session is not None:
            return
        ort = _import_ort()
        wanted = PROVIDERS[self.provider]
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendUnavailable(f"ONNX Runtime provider {wanted} is not available here; "
                                     f"available: {', '.join(available)}")
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [(wanted, provider_options(self.provider, self.model_dir))]
        if wanted != "CPUExecutionProvider":
            providers.append(("CPUExecutionProvider", {}))
        try:
            self.session = ort.InferenceSession(str(self.model_dir.onnx_path), sess_options=opts,
                                                providers=providers)
        except Exception as e:  # onnxruntime raises its own types for unreadable or invalid models
            raise ModelDirError(f"{self.model_dir.onnx_path}: ONNX Runtime cannot load it "
                                f"({type(e).__name__}: {_first_line(e)})") from e

    def deactivate(self) -> None:
        self.session = None

    def cache_dtype(self) -> np.dtype:
        return _numpy_dtype(self.spec.cache_dtype)

    def new_cache(self, batch: int, capacity: int) -> "OrtCache":
        self.activate()
        return OrtCache(self, batch, capacity)

    def forward(self, input_ids: np.ndarray, cache: HostCache, all_logits: bool = False) -> np.ndarray:
        """As Runner.forward; a one-token step on an OrtCache returns a view of the cache's logits
        buffer, valid until the next forward on that cache."""
        if input_ids.shape[1] != 1 or all_logits or not isinstance(cache, OrtCache):
            return super().forward(input_ids, cache, all_logits)
        return cache.decode_step(input_ids)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.activate()
        try:
            outputs = self.session.run(self.spec.output_names, feeds)
        except Exception as e:  # e.g. a graph that does not match its manifest's config
            raise self.run_error(e) from e
        return dict(zip(self.spec.output_names, outputs))

    def run_error(self, e: Exception) -> GptExportError:
        return GptExportError(f"{self.model_dir.onnx_path}: ONNX Runtime failed to run it "
                              f"({type(e).__name__}: {_first_line(e)})")


class OrtCache(HostCache):
    """A HostCache plus the IOBinding of its one-token decode step, bound to its own buffers.

    Per-generation state, like the buffers, so one runner can serve several caches from threads.
    """

    def __init__(self, runner: OrtRunner, batch: int, capacity: int):
        super().__init__(runner.spec, runner.config, batch, capacity, runner.cache_dtype())
        self.runner = runner
        self.session = None  # the session the binding belongs to; bound on the first decode step

    def _bind(self) -> None:
        ort, c, spec, B = _import_ort(), self.runner.config, self.runner.spec, self.batch
        self.input_ids = np.zeros((B, 1), np.int64)
        self.past_length = np.zeros(1, np.int64)
        self.logits = np.zeros((B, 1, c.vocab_size), np.float32)
        dtype = self.runner.cache_dtype()
        self.new = {name: np.zeros((B, c.n_head, 1, c.head_dim), dtype) for name in spec.new_names}
        inputs = {"input_ids": self.input_ids, "past_length": self.past_length,
                  "logit_positions": np.zeros(1, np.int64), **self.buffers}
        outputs = {"logits": self.logits, **self.new}
        # ortvalue_from_numpy shares a CPU array's memory, so writing into the arrays is enough;
        # the OrtValues are kept with the arrays for as long as the binding lives
        self.values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in {**inputs, **outputs}.items()}
        self.session = self.runner.session
        self.binding = self.session.io_binding()
        for name in inputs:
            self.binding.bind_ortvalue_input(name, self.values[name])
        for name in outputs:
            self.binding.bind_ortvalue_output(name, self.values[name])

    def decode_step(self, input_ids: np.ndarray) -> np.ndarray:
        """Run one token per sequence after the cached ones; (B, V) logits, a view reused next step."""
        if self.length >= self.capacity:
            raise GptExportError(f"KV cache overflow: {self.length + 1} positions, capacity {self.capacity}")
        if self.session is None or self.session is not self.runner.session:  # first step, or re-activated
            self.runner.activate()
            self._bind()
        self.input_ids[...] = input_ids
        self.past_length[0] = self.length  # the buffers are read whole; slots from here on are masked
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as e:
            raise self.runner.run_error(e) from e
        self.append(self.new, 1)
        return self.logits[:, 0]


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16; onnxruntime ships with ml_dtypes-compatible arrays

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
