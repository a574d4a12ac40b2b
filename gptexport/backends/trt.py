"""TensorRT backend: runs OUTDIR/model.engine with device memory from cuda-python, no PyTorch.

The KV cache lives on the device for a whole generation: one buffer per past input, allocated at
its capacity. Each step binds the buffers as the past inputs, writes the engine's new_key/new_value
outputs into the next slots with one strided device-to-device copy per layer tensor
(cudaMemcpy2DAsync), and brings back only the logits of the last position. The layout and copy
arithmetic are plain code in engine.py (KVLayout), tested on a CPU; this module is the thin part
that calls TensorRT and CUDA, written to the TensorRT 10.x/11.x Python API.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from ..engine import (
    KVLayout, check_compatible, cuda_call, current_device, describe_profiles, engine_io_problems, import_cudart,
    import_tensorrt, load_record, numpy_dtype, output_shapes, select_profile, step_shapes,
)
from ..errors import GptExportError, ModelDirError, UsageError
from ..modeldir import ModelDir
from .base import Runner


class Cuda:
    """The few CUDA runtime calls used here, each checked."""

    def __init__(self, cudart):
        self.rt = cudart
        self.stream = self.call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self.stream)  # what TensorRT's stream_handle parameters take

    def call(self, result, what: str):
        return cuda_call(self.rt, result, what)

    def malloc(self, nbytes: int) -> int:
        return int(self.call(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self.call(self.rt.cudaFree(ptr), "cudaFree")

    def upload(self, dst: int, array: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call(self.rt.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def download(self, array: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call(self.rt.cudaMemcpyAsync(array.ctypes.data, src, array.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def copy2d(self, dst: int, src: int, plan) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.call(self.rt.cudaMemcpy2DAsync(dst + plan.dst_offset, plan.dpitch, src, plan.spitch, plan.width,
                                            plan.height, kind, self.stream), "cudaMemcpy2DAsync")

    def synchronize(self) -> None:
        self.call(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        self.call(self.rt.cudaStreamDestroy(self.stream), "cudaStreamDestroy")


class DeviceBuffers:
    """Named device allocations that grow on demand and are freed together."""

    def __init__(self, cuda: Cuda):
        self.cuda, self.ptrs, self.sizes = cuda, {}, {}

    def get(self, name: str, nbytes: int) -> int:
        if self.sizes.get(name, -1) < nbytes:
            if name in self.ptrs:
                self.cuda.synchronize()  # the old buffer may still be read by queued work
                self.cuda.free(self.ptrs.pop(name))
            self.ptrs[name], self.sizes[name] = self.cuda.malloc(nbytes), nbytes
        return self.ptrs[name]

    def free(self) -> None:
        for ptr in self.ptrs.values():
            self.cuda.free(ptr)
        self.ptrs, self.sizes = {}, {}


class DeviceCache:
    """The KV cache of one generation on the device, with the same bookkeeping as base.HostCache."""

    def __init__(self, runner: "TrtRunner", batch: int, capacity: int):
        c = runner.config
        self.layout = KVLayout(batch, c.n_head, c.head_dim, capacity, runner.cache_dtype().itemsize)
        self.batch, self.capacity, self.length = batch, capacity, 0
        self.buffers = DeviceBuffers(runner.cuda)  # past_*: the cache; new_*, logits, inputs: scratch
        for name in runner.spec.past_names:
            self.buffers.get(name, self.layout.nbytes)

    def reset(self) -> None:
        self.length = 0

    def close(self) -> None:
        """Free the device memory (also done when the cache is garbage-collected, or the runner closes)."""
        self.buffers.free()

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit CUDA may already be gone; nothing left to free then
            pass


class TrtRunner(Runner):
    """Runs a model directory's TensorRT engine (see `gptexport build`)."""

    name = "tensorrt"

    def __init__(self, model_dir: ModelDir):
        self.model_dir, self.config, self.spec = model_dir, model_dir.config, model_dir.spec
        self.record = load_record(model_dir)  # before any import: "no engine built" needs no TensorRT
        self.engine = self.cuda = None
        self.contexts: list = []
        self._lock = threading.Lock()  # one execution context per profile, shared by callers
        self._caches: weakref.WeakSet[DeviceCache] = weakref.WeakSet()  # freed on deactivate if still alive

    # ---- loading ----

    def activate(self) -> None:
        if self.engine is not None:
            return
        trt, cudart = import_tensorrt(), import_cudart()
        check_compatible(self.record, self.model_dir, trt.__version__, current_device(cudart))
        self.trt, self.cuda = trt, Cuda(cudart)
        plan = (self.model_dir.path / self.record.engine).read_bytes()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise ModelDirError(f"{self.model_dir.path / self.record.engine}: TensorRT cannot deserialize it")
        self._check_io(engine)
        self.contexts = [self._context(engine, i) for i in range(engine.num_optimization_profiles)]
        self.engine = engine

    def _check_io(self, engine) -> None:
        trt = self.trt
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "INPUT" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "OUTPUT"
            io[name] = (mode, engine.get_tensor_dtype(name).name)
            if getattr(engine, "is_shape_inference_io", lambda n: False)(name):  # host memory; none in our graph
                raise ModelDirError(f"{self.record.engine}: {name} is a shape tensor, which this runner does not bind")
        problems = engine_io_problems(self.spec, io)
        if problems:
            raise ModelDirError(f"{self.model_dir.path / self.record.engine}: engine I/O differs from the "
                                f"manifest's I/O spec: {'; '.join(problems)}")

    def _context(self, engine, profile: int):
        """An execution context bound to one profile, with memory for that profile only."""
        strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
        context = (engine.create_execution_context(strategy.ON_PROFILE_CHANGE) if strategy is not None
                   else engine.create_execution_context())
        if context is None:
            raise GptExportError("TensorRT could not create an execution context (out of device memory?)")
        if not context.set_optimization_profile_async(profile, self.cuda.handle):
            raise GptExportError(f"TensorRT refused optimization profile {profile}")
        return context

    def deactivate(self) -> None:
        for cache in list(self._caches):
            cache.close()
        if self.cuda is not None:
            self.cuda.synchronize()
            self.cuda.close()
        self.contexts, self.engine, self.cuda = [], None, None

    # ---- running ----

    def cache_dtype(self) -> np.dtype:
        return numpy_dtype(self.spec.cache_dtype)

    def new_cache(self, batch: int, capacity: int) -> DeviceCache:
        self.activate()
        cache = DeviceCache(self, batch, capacity)
        self._caches.add(cache)
        return cache

    def forward(self, input_ids: np.ndarray, cache: DeviceCache, all_logits: bool = False) -> np.ndarray:
        """(B, T) new tokens after the cached ones; the cache stays on the device, only logits return."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        B, T = ids.shape
        if B != cache.batch or cache.length + T > cache.capacity:
            raise GptExportError(f"KV cache overflow or batch mismatch: {cache.length} + {T} positions of "
                                 f"{cache.capacity}, batch {B} vs {cache.batch}")
        positions = np.arange(T, dtype=np.int64) if all_logits else np.array([T - 1], dtype=np.int64)
        past = cache.capacity if cache.length else 0  # as HostCache.past_feeds: a zero-length past in prefill
        shapes = step_shapes(self.spec, B, T, past, len(positions))
        host = {"input_ids": ids, "past_length": np.array([cache.length], dtype=np.int64),
                "logit_positions": positions}
        buffers = cache.buffers
        with self._lock:
            addresses = {name: buffers.get(name, a.nbytes) for name, a in host.items()}
            for name, array in host.items():
                self.cuda.upload(addresses[name], array)
            addresses.update({name: buffers.ptrs[name] for name in self.spec.past_names})
            outputs = output_shapes(self.spec, B, T, len(positions))
            for t in self.spec.outputs:
                addresses[t.name] = buffers.get(t.name, _nbytes(outputs[t.name], numpy_dtype(t.dtype)))
            self._execute(shapes, addresses)
            for name in self.spec.past_names:  # new keys/values into the next slots, on the device
                plan = cache.layout.append(cache.length, T)
                self.cuda.copy2d(buffers.ptrs[name], addresses[name.replace("past_", "new_", 1)], plan)
            logits = np.empty(outputs["logits"], dtype=np.float32)
            self.cuda.download(logits, addresses["logits"])
            self.cuda.synchronize()
        cache.length += T
        return logits if all_logits else logits[:, -1, :]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward from host arrays to host arrays, every output (for parity)."""
        self.activate()
        host = {t.name: np.ascontiguousarray(feeds[t.name], dtype=numpy_dtype(t.dtype)) for t in self.spec.inputs}
        B, T = host["input_ids"].shape
        outputs = output_shapes(self.spec, B, T, host["logit_positions"].shape[0])
        result = {t.name: np.empty(outputs[t.name], dtype=numpy_dtype(t.dtype)) for t in self.spec.outputs}
        scratch = DeviceBuffers(self.cuda)
        try:
            with self._lock:
                addresses = {name: scratch.get(name, a.nbytes) for name, a in {**host, **result}.items()}
                for name, array in host.items():
                    self.cuda.upload(addresses[name], array)
                self._execute({name: a.shape for name, a in host.items()}, addresses)
                for name, array in result.items():
                    self.cuda.download(array, addresses[name])
                self.cuda.synchronize()
        finally:
            scratch.free()
        return result

    def _execute(self, shapes: dict[str, tuple], addresses: dict[str, int]) -> None:
        """Pick the profile holding these shapes, set shapes and addresses, enqueue on the stream."""
        profile = select_profile(self.record.profiles, shapes)
        if profile is None:
            raise UsageError(f"input shapes {_describe(shapes)} are in no profile of {self.record.engine}: "
                             f"{describe_profiles(self.record.profiles)}; rebuild with other --max-batch")
        context = self.contexts[profile]
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise GptExportError(f"TensorRT refused shape {shape} for {name}")
        for name, ptr in addresses.items():
            context.set_tensor_address(name, ptr)
        if not context.execute_async_v3(self.cuda.handle):
            raise GptExportError("TensorRT execute_async_v3 failed (its log above says why)")


def _nbytes(shape: tuple, dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _describe(shapes: dict[str, tuple]) -> str:
    ids = shapes.get("input_ids", ())
    past = next((s for n, s in shapes.items() if n.startswith("past_")), None)
    text = f"batch {ids[0]}, sequence {ids[1]}" if len(ids) == 2 else str(shapes)
    return text + (f", past_sequence {past[2]}" if past else "")
