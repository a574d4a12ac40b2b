"""TensorRT backend: runs OUTDIR/model.engine on the CUDA memory core (device.py), no PyTorch.

The KV cache, the step buffers and every copy are the memory core's and batchcache.py's, the same code
the ONNX Runtime backend runs (and the test suite runs on host memory); this module is the thin part
that calls TensorRT, written to the TensorRT 10.x/11.x Python API: deserialize the engine, one
execution context per optimization profile, `set_input_shape` / `set_tensor_address` /
`execute_async_v3(stream)` on the core's stream.

Decode steps are captured in a CUDA graph, as trtexec's --useCudaGraph does it: the step is first
enqueued plainly (TensorRT does its shape-dependent set-up on that first enqueue, outside the
capture), then the next step's `execute_async_v3` is recorded between cudaStreamBeginCapture and
cudaStreamEndCapture, instantiated, and launched; later steps only launch it. A graph replays the
addresses and shapes it was recorded with, and the state of the execution context it was recorded
on. So each decode bucket of the scheduler's batch cache has an execution context of its own
(buckets.GraphArena keeps the buckets, their addresses and these contexts across caches): it is
set up once, captured on its second step and launched from then on, whatever the other buckets do.
If TensorRT or CUDA refuses the capture, a notice says so and decode continues with plain enqueues
(without graphs every step sets up the profile's shared context and enqueues).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...artifacts.engine_record import check_compatible, engine_io_problems, import_tensorrt, load_record
from ...artifacts.modeldir import ModelDir
from ...config import numpy_dtype
from ...errors import GptExportError, ModelDirError, UsageError
from ...profiles import describe_profiles, output_shapes, select_profile, step_shapes
from .base import Runner, notice
from .batchcache import BatchCache
from .buckets import Bucket, GraphArenas, ScratchBuffers
from .device import CudaMemory, current_device


class TrtRunner(Runner):
    """Runs a model directory's TensorRT engine (see `gptexport build`)."""

    name = "tensorrt"

    def __init__(self, model_dir: ModelDir, cuda_graphs: bool | None = None):
        self.model_dir, self.config, self.spec = model_dir, model_dir.config, model_dir.spec
        self.record = load_record(model_dir)  # before any import: "no engine built" needs no TensorRT
        self.max_batch = self.record.max_batch  # the engine's profiles end there (the scheduler's limit)
        self.cuda_graphs = cuda_graphs is not False
        self.engine = self.memory = None
        self.contexts: list = []
        self.graph_arenas: GraphArenas | None = None  # the batch caches' buckets, each with its own context

    @property
    def chunked_prefill(self) -> bool:
        """Whether a profile takes a prompt's chunk after a past (gptexport build's prefill profile has
        past 0, so the scheduler prefills prompts whole on its engines)."""
        return select_profile(self.record.profiles, step_shapes(self.spec, 1, 2, 2, 1)) is not None

    # ---- loading ----

    def activate(self) -> None:
        if self.engine is not None:
            return
        trt = import_tensorrt()
        memory = CudaMemory()
        try:
            check_compatible(self.record, self.model_dir, trt.__version__, current_device(memory.rt))
            self.trt, self.memory = trt, memory
            plan = (self.model_dir.path / self.record.engine).read_bytes()
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise ModelDirError(f"{self.model_dir.path / self.record.engine}: TensorRT cannot deserialize it")
            self._check_io(engine)
            self.contexts = [self._context(engine, i) for i in range(engine.num_optimization_profiles)]
        except BaseException:
            self.contexts, self.memory = [], None
            memory.close()
            raise
        self.engine = engine
        self.graph_arenas = GraphArenas() if self.cuda_graphs else None

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
        if not context.set_optimization_profile_async(profile, self.memory.stream_handle):
            raise GptExportError(f"TensorRT refused optimization profile {profile}")
        return context

    def deactivate(self) -> None:
        if self.graph_arenas is not None:
            self.graph_arenas.close()  # destroys the captured graphs before their memory goes
        if self.memory is not None:
            self.memory.close()
        self.contexts, self.engine, self.memory = [], None, None
        self.graph_arenas = None

    # ---- running ----

    def new_batch_cache(self, rows: int, capacity: int) -> BatchCache:
        """The scheduler's cache on the device; with CUDA graphs decode runs at power-of-two buckets of
        rows (at most `rows`), each on its own execution context and captured once."""
        self.activate()
        if rows > self.max_batch:  # the scheduler checks this first; no profile would take the steps
            raise UsageError(f"{rows} rows: {self.record.engine} takes batches up to {self.max_batch}")
        return BatchCache(self.memory, self.spec, self.config, rows, capacity, self._execute,
                          self._decode_bucket if self.cuda_graphs else self._decode, graphs=self.graph_arenas)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward from host arrays to host arrays, every output (for parity)."""
        self.activate()
        host = {t.name: np.ascontiguousarray(feeds[t.name], dtype=numpy_dtype(t.dtype)) for t in self.spec.inputs}
        B, T = host["input_ids"].shape
        outputs = output_shapes(self.spec, B, T, host["logit_positions"].shape[0])
        result = {t.name: np.empty(outputs[t.name], dtype=numpy_dtype(t.dtype)) for t in self.spec.outputs}
        scratch = ScratchBuffers(self.memory)
        try:
            with self.memory.lock:
                addresses = {name: scratch.get(name, a.nbytes) for name, a in {**host, **result}.items()}
                for name, array in host.items():
                    self.memory.upload(addresses[name], array)
                self._enqueue({name: a.shape for name, a in host.items()}, addresses)
                for name, array in result.items():
                    self.memory.download(array, addresses[name])
                self.memory.synchronize()
        finally:
            scratch.free()
        return result

    def _execute(self, bucket, ins: dict, outs: dict, addresses: dict) -> None:
        self._check_extents(ins, outs, addresses)
        self._enqueue(ins, addresses)

    def _check_extents(self, ins: dict, outs: dict, addresses: dict) -> None:
        """Every tensor the step reads or writes lies in its buffer (TensorRT trusts the shapes)."""
        for tensors, shapes in ((self.spec.inputs, ins), (self.spec.outputs, outs)):
            for t in tensors:
                self.memory.check_tensor(addresses[t.name], shapes[t.name], numpy_dtype(t.dtype))

    def _decode_bucket(self, bucket: Bucket) -> None:
        """A batch-cache bucket's decode step on the bucket's own execution context: set up and
        enqueued plainly on its first step, captured on its second, launched from then on."""
        context = bucket.backend_state
        if context is None:
            d = bucket.decode_buffers()
            self._check_extents(d.input_shapes, d.output_shapes, d.addresses)
            context = bucket.backend_state = BucketContext(self._context(self.engine, self._profile(d.input_shapes)))
            bucket.release_state = self._release_context
            self._set_up(context.context, d.input_shapes, d.addresses)
        elif context.graph is not None:
            self.memory.launch(context.graph)
            return
        elif self.cuda_graphs:  # its one plain step ran: TensorRT's set-up is done, record the next
            context.graph = self._capture(context.context)
            if context.graph is not None:
                self.memory.launch(context.graph)  # capturing recorded the step without running it
                return
        if not context.context.execute_async_v3(self.memory.stream_handle):
            raise GptExportError("TensorRT execute_async_v3 failed (its log above says why)")

    def _release_context(self, context: "BucketContext") -> None:
        if context.graph is not None:
            self.memory.destroy_graph(context.graph)
        context.graph = context.context = None

    def _decode(self, bucket: Bucket) -> None:
        """A decode step without CUDA graphs: the decode profile's shared context, set up and enqueued."""
        d = bucket.decode_buffers()
        self._check_extents(d.input_shapes, d.output_shapes, d.addresses)
        self._enqueue(d.input_shapes, d.addresses)

    def _capture(self, context):
        """The context's next enqueue recorded as an executable CUDA graph, or None (with a notice)."""
        self.memory.begin_capture()
        recorded = False
        try:
            recorded = bool(context.execute_async_v3(self.memory.stream_handle))
        finally:
            graph = self.memory.end_capture(recorded)
        if graph is None:
            notice("TensorRT's decode step could not be captured in a CUDA graph; it runs with plain launches")
            self.cuda_graphs = False
        return graph

    def _profile(self, shapes: dict[str, tuple]) -> int:
        profile = select_profile(self.record.profiles, shapes)
        if profile is None:
            raise UsageError(f"input shapes {_describe(shapes)} are in no profile of {self.record.engine}: "
                             f"{describe_profiles(self.record.profiles)}; rebuild with other --max-batch")
        return profile

    def _enqueue(self, shapes: dict[str, tuple], addresses: dict[str, int]) -> None:
        """Pick the profile holding these shapes, set shapes and addresses, enqueue on the stream."""
        profile = self._profile(shapes)
        context = self.contexts[profile]
        self._set_up(context, shapes, addresses)
        if not context.execute_async_v3(self.memory.stream_handle):
            raise GptExportError("TensorRT execute_async_v3 failed (its log above says why)")

    @staticmethod
    def _set_up(context, shapes: dict[str, tuple], addresses: dict[str, int]) -> None:
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise GptExportError(f"TensorRT refused shape {shape} for {name}")
        for name, ptr in addresses.items():
            context.set_tensor_address(name, ptr)


@dataclass
class BucketContext:
    """A batch-cache bucket's own execution context, set up for its addresses, and its graph once captured."""

    context: object
    graph: object = None


def _describe(shapes: dict[str, tuple]) -> str:
    ids = shapes.get("input_ids", ())
    past = next((s for n, s in shapes.items() if n.startswith("past_") and len(s) == 4), None)  # not past_length
    text = f"batch {ids[0]}, sequence {ids[1]}" if len(ids) == 2 else str(shapes)
    return text + (f", past_sequence {past[2]}" if past else "")

