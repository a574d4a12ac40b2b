"""ONNX Runtime backend: CPU by default, the CUDA or TensorRT execution providers when asked for.

On the GPU providers every cached forward runs through an IOBinding of raw device pointers into the
CUDA memory core (device.py): the KV cache lives there for the whole generation (batchcache.py);
before each step the few small inputs (input_ids, past_length) are written into their buffers, the
graph's new keys/values are appended to the cache by the core, and only the logits that are sampled
are downloaded. All of it is queued on the core's stream, which ONNX Runtime runs on too
(`user_compute_stream`), so no step needs more than its one final synchronize.

Why pointers: ONNX Runtime copies a CPU-resident input to the device when it is *bound*
(IOBinding::BindInput), so binding OrtValues of numpy arrays once and writing into the arrays
before later steps feeds a GPU provider stale inputs; that made every decode step wrong on an H200
(issue 9). Device pointers are read when the graph runs.

The same code runs on the CPU provider: "cpu" pointers into the host memory core, which the CPU
provider uses in place (its logits are read from the output buffer itself, no copy).

Decode steps (one token per sequence) bind fixed addresses once per batch-cache bucket. With CUDA
graphs (ort-cuda, on by default) ONNX Runtime captures that step on the first run
with its `gpu_graph_id` and replays it afterwards; every other run passes gpu_graph_id -1. What this
relies on (onnxruntime/core/providers/cuda/cuda_graph.cc, inference_session.cc): a run with a
captured id replays the capture, at its addresses and shapes, whatever is bound; an id cannot be
captured again; no graph is freed before the session closes. So the addresses of an id never
change: the batch cache's buckets live in arenas this runner keeps across caches
(buckets.GraphArena), a bounded number of ids in all.

Building the session (providers, options, the CUDA-graph fallback) is ort_session.SessionLoader's;
this runner runs what it returns, as Polygraphy splits its loaders from its runners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...artifacts.modeldir import ModelDir
from ...config import numpy_dtype
from ...errors import BackendUnavailable, GptExportError, UsageError
from ..kernels.attention_pattern import POSITION_IDS, SEGMENTS, present_name
from .base import Runner, notice
from .batchcache import BatchCache, positions
from .buckets import GraphArenas
from .device import DeviceMemory, HostMemory, open_memory
from .ort_session import ELEMENT_TYPES, ORT_TRT_MAX_BATCH, PROVIDERS, SessionLoader, first_line, run_options


@dataclass
class DecodeBinding:
    """A bucket's decode step bound in one session: its IOBinding and the run options it runs with."""

    session: object
    binding: object
    options: object  # RunOptions with the bucket's gpu_graph_id (or -1), None without CUDA graphs
    captured: bool = False  # a run with the bucket's graph id succeeded: the graph exists



class OrtRunner(Runner):
    """Runs OUTDIR/model.onnx in an onnxruntime.InferenceSession."""

    def __init__(self, model_dir: ModelDir, provider: str = "cpu", threads: int | None = None,
                 tf32: bool = False, cuda_graphs: bool | None = None, kernels: str = "auto"):
        if provider not in PROVIDERS:
            raise UsageError(f"unknown ONNX Runtime provider {provider!r}; valid: {', '.join(PROVIDERS)}")
        self.kernels = kernels  # our CPU kernels for MatMulNBits: off, auto or on (backends/kernels.py)
        self.model_dir, self.provider, self.threads, self.tf32 = model_dir, provider, threads, tf32
        self.config, self.spec = model_dir.config, model_dir.spec
        self.name = f"onnxruntime-{provider}"
        # the TensorRT provider's one profile ends at ORT_TRT_MAX_BATCH rows (the scheduler's limit)
        self.max_batch = ORT_TRT_MAX_BATCH if provider == "tensorrt" else None
        # CUDA graphs on the CUDA provider only, on unless turned off (the TensorRT provider's own
        # graph mode is a different mechanism that we have never run)
        self.cuda_graphs = provider == "cuda" and cuda_graphs is not False
        self.loader = SessionLoader(model_dir, provider, threads, tf32, self.cuda_graphs, kernels)  # builds; this runs
        self.session = self.ort = None
        self.memory: DeviceMemory | None = HostMemory() if provider == "cpu" else None
        self.graph_arenas: GraphArenas | None = None  # the batch caches' buckets under CUDA graphs
        self._plain = None  # run options of every run that must not be captured
        # every layer's attention is our CachedAttention, which reads only each row's own length
        self.live_attention = False
        # past input -> the present output our CachedAttention appends its new keys to: bound to the
        # past's own buffer in every run, so the forward appends to the cache in place
        self.presents: dict[str, str] = {}
        # the graph takes a flat batch (attention_pattern.py): positions from `position_ids`, and
        # `segments` of rows in one forward of batch 1 (BatchCache.mixed)
        self.flat = False

    # ---- loading ----

    def activate(self) -> None:
        if self.session is not None:
            return
        memory, memory_error = self.memory, None
        if memory is None:
            try:
                memory = open_memory("cuda")
            except BackendUnavailable as e:
                # ask ONNX Runtime anyway: without CUDA its provider will not start either, and
                # what it says about that is the more useful error
                memory_error = e
        try:
            loaded = self.loader(memory.stream_handle if memory else 0)
            if memory_error is not None:
                raise memory_error
        except BaseException:
            if memory is not None and memory is not self.memory:
                memory.close()
            raise
        self.ort, self.session, self.memory, self.cuda_graphs = loaded.ort, loaded.session, memory, loaded.cuda_graphs
        self.graph_arenas = GraphArenas() if self.cuda_graphs else None
        self.live_attention = loaded.ops.get("CachedAttention", 0) == self.config.n_layer
        outputs = {o.name for o in self.session.get_outputs()}
        self.presents = {p: present_name(p) for p in self.spec.past_names if present_name(p) in outputs}
        self.flat = POSITION_IDS in {i.name for i in self.session.get_inputs()}
        self._plain = run_options(self.ort, -1) if self.cuda_graphs else None

    def deactivate(self) -> None:
        if self.graph_arenas is not None:
            self.graph_arenas.close()  # the session's graphs go with it
        self.session, self.graph_arenas = None, None
        if self.memory is not None and not isinstance(self.memory, HostMemory):
            self.memory.close()  # device buffers die with the session; host buffers may outlive it
            self.memory = None

    # ---- caches and forwards ----

    def new_batch_cache(self, rows: int, capacity: int) -> BatchCache:
        """The scheduler's cache in this runner's memory core, run through the pointer binding (the
        CPU provider's too); with CUDA graphs decode runs at power-of-two buckets of rows, in an
        arena this runner keeps, so each bucket's graph is captured once (buckets.GraphArena). With
        our attention on the host, rows are laid out at block_size once (batchcache.py)."""
        self.activate()
        on_host = isinstance(self.memory, HostMemory)
        return BatchCache(self.memory, self.spec, self.config, rows, capacity, self._execute, self._decode,
                          graphs=self.graph_arenas, at_block_size=self.live_attention and on_host,
                          forward_appends=len(self.presents) == len(self.spec.past_names) and on_host,
                          flat=self.flat)


    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.activate()
        if self.flat:  # row b's tokens at past_length[b] + 0..T-1, every row a segment of its own
            feeds = {POSITION_IDS: positions(feeds["past_length"], feeds["input_ids"].shape[1]),
                     SEGMENTS: np.zeros((0, 2), np.int64), **feeds}
        try:
            with self.memory.lock:  # on CUDA: never while another thread's step is being captured
                outputs = self.session.run(self.spec.output_names, feeds, self._plain)
        except Exception as e:  # e.g. a graph that does not match its manifest's config
            raise self.run_error(e) from e
        return dict(zip(self.spec.output_names, outputs))

    def _bind(self, ins: dict, outs: dict, addresses: dict):
        """An IOBinding of every input and output to its buffer's address, with its shape."""
        binding, device = self.session.io_binding(), self.memory.ort_device
        for tensors, shapes, bind in ((self.spec.inputs, ins, binding.bind_input),
                                      (self.spec.outputs, outs, binding.bind_output)):
            for t in tensors:
                # ONNX Runtime reads and writes whatever the shape spans: it must lie in the buffer
                self.memory.check_tensor(addresses[t.name], shapes[t.name], numpy_dtype(t.dtype))
                bind(t.name, device, 0, ELEMENT_TYPES[t.dtype], shapes[t.name], addresses[t.name])
        for past, present in self.presents.items():  # the past's own buffer: the op writes the new positions
            binding.bind_output(present, device, 0, ELEMENT_TYPES[self.spec.cache_dtype], ins[past], addresses[past])
        if self.flat:
            B, T = ins["input_ids"]
            if POSITION_IDS not in addresses and T != 1:
                raise GptExportError(f"internal error: a forward of {T} tokens a row without their positions")
            # a one-token step's positions are its rows' lengths: past_length's own buffer, as (B, 1)
            flat = {POSITION_IDS: (addresses.get(POSITION_IDS, addresses["past_length"]), (B, T)),
                    # none given: every row is a segment of its own (any address holds 0 bytes)
                    SEGMENTS: (addresses.get(SEGMENTS, addresses["past_length"]), ins.get(SEGMENTS, (0, 2)))}
            for name, (address, shape) in flat.items():
                self.memory.check_tensor(address, shape, np.int64)
                binding.bind_input(name, device, 0, ELEMENT_TYPES["int64"], shape, address)
        return binding

    def _execute(self, bucket, ins: dict, outs: dict, addresses: dict) -> None:
        """Any forward's run: bound afresh (its shapes vary), never captured."""
        self._run(self._bind(ins, outs, addresses), self._plain)

    def _decode(self, bucket) -> None:
        """The decode step's run, bound once per bucket and session; captured and replayed with graphs."""
        state = bucket.backend_state
        if state is None or state.session is not self.session:
            d = bucket.decode_buffers()
            options = run_options(self.ort, bucket.graph_id) if self.cuda_graphs else self._plain
            state = bucket.backend_state = DecodeBinding(self.session, self._bind(d.input_shapes, d.output_shapes,
                                                                                d.addresses), options)
        if not self.cuda_graphs:
            state.options = self._plain  # graphs were turned off after a capture failed elsewhere
        try:
            self._run(state.binding, state.options)
        except GptExportError as e:
            if state.captured or state.options is self._plain:
                raise
            # the first run with a new gpu_graph_id captures: if that failed, run uncaptured from now on
            notice(f"CUDA graph capture failed ({e}); decode runs with plain launches")
            self.cuda_graphs = False
            state.options = self._plain
            self._run(state.binding, state.options)
        state.captured = True

    def _run(self, binding, options) -> None:
        try:
            self.session.run_with_iobinding(binding, options)
        except Exception as e:
            raise self.run_error(e) from e

    def run_error(self, e: Exception) -> GptExportError:
        return GptExportError(f"{self.model_dir.onnx_path}: ONNX Runtime failed to run it "
                              f"({type(e).__name__}: {first_line(e)})")
