"""ONNX Runtime backend: CPU by default, the CUDA or TensorRT execution providers when asked for.

On the GPU providers every cached forward runs through an IOBinding of raw device pointers into the
CUDA memory core (device.py): the KV cache lives there for the whole generation (kvcache.py);
before each step the few small inputs (input_ids, past_length) are written into their buffers, the
graph's new keys/values are appended to the cache by the core, and only the logits that are sampled
are downloaded. All of it is queued on the core's stream, which ONNX Runtime runs on too
(`user_compute_stream`), so no step needs more than its one final synchronize.

Why pointers: ONNX Runtime copies a CPU-resident input to the device when it is *bound*
(IOBinding::BindInput), so binding OrtValues of numpy arrays once and writing into the arrays
before later steps feeds a GPU provider stale inputs; that made every decode step wrong on an H200
(issue 9). Device pointers are read when the graph runs.

The same code runs on the CPU provider with `binding="pointer"`: "cpu" pointers into the host
memory core, which the CPU provider uses in place; the test suite checks it token for token
against session.run. The CPU provider's default stays the OrtValue binding (`OrtCache`), correct
there because the CPU provider reads a CPU OrtValue in place, and cheaper in Python per step
(see docs/tensorrt.md, "The device-memory core", for the measurement).

Decode steps (one token per sequence) bind fixed addresses once per cache slot. With CUDA graphs
(ort-cuda, on by default) ONNX Runtime captures that step on the first run with the slot's
`gpu_graph_id` and replays it afterwards; slots are pooled by (batch, capacity) so the addresses a
graph was recorded with stay valid, and every other run passes gpu_graph_id -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...artifacts.modeldir import ModelDir
from ...errors import BackendUnavailable, GptExportError, ModelDirError, UsageError
from .base import HostCache, Runner, notice
from .batchcache import BatchCache
from .device import DeviceMemory, HostMemory, open_memory
from .kvcache import DeviceCache, Slot, SlotPool, open_cache
from .ort_session import (ELEMENT_TYPES, ORT_TRT_MAX_BATCH, PROVIDERS, create_session, first_line, import_ort,
                          provider_options, run_options)


@dataclass
class DecodeBinding:
    """A slot's decode step bound in one session: its IOBinding and the run options it runs with."""

    session: object
    binding: object
    options: object  # RunOptions with the slot's gpu_graph_id (or -1), None without CUDA graphs
    captured: bool = False  # a run with the slot's graph id succeeded: the graph exists


BINDINGS = ("ortvalue", "pointer")


class OrtRunner(Runner):
    """Runs OUTDIR/model.onnx in an onnxruntime.InferenceSession."""

    def __init__(self, model_dir: ModelDir, provider: str = "cpu", threads: int | None = None,
                 tf32: bool = False, cuda_graphs: bool | None = None, binding: str | None = None,
                 kernels: str = "auto"):
        if provider not in PROVIDERS:
            raise UsageError(f"unknown ONNX Runtime provider {provider!r}; valid: {', '.join(PROVIDERS)}")
        binding = binding or ("ortvalue" if provider == "cpu" else "pointer")
        if binding not in BINDINGS or (binding == "ortvalue" and provider != "cpu"):
            raise UsageError(f"binding {binding!r}: the CPU provider takes ortvalue or pointer, a GPU provider pointer "
                             f"(ONNX Runtime copies a CPU OrtValue to the device when it is bound)")
        self.binding = binding
        self.kernels = kernels  # our CPU kernels for MatMulNBits: off, auto or on (backends/kernels.py)
        self.model_dir, self.provider, self.threads, self.tf32 = model_dir, provider, threads, tf32
        self.config, self.spec = model_dir.config, model_dir.spec
        self.name = f"onnxruntime-{provider}"
        # the TensorRT provider's one profile ends at ORT_TRT_MAX_BATCH rows (the scheduler's limit)
        self.max_batch = ORT_TRT_MAX_BATCH if provider == "tensorrt" else None
        # CUDA graphs on the CUDA provider only, on unless turned off (the TensorRT provider's own
        # graph mode is a different mechanism that we have never run)
        self.cuda_graphs = provider == "cuda" and cuda_graphs is not False
        self.session = self.ort = None
        self.memory: DeviceMemory | None = HostMemory() if provider == "cpu" else None
        self._pool: SlotPool | None = None
        self._plain = None  # run options of every run that must not be captured

    # ---- loading ----

    def activate(self) -> None:
        if self.session is not None:
            return
        ort = import_ort()
        wanted = PROVIDERS[self.provider]
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendUnavailable(f"ONNX Runtime provider {wanted} is not available here; "
                                     f"available: {', '.join(available)}")
        memory, memory_error = self.memory, None
        if memory is None:
            try:
                memory = open_memory("cuda")
            except BackendUnavailable as e:
                # ask ONNX Runtime anyway: without CUDA its provider will not start either, and
                # what it says about that is the more useful error
                memory_error = e
        try:
            self.session = self._session(ort, memory.stream_handle if memory else 0)
            if memory_error is not None:
                raise memory_error
        except BaseException:
            self.session = None
            if memory is not None and memory is not self.memory:
                memory.close()
            raise
        self.ort, self.memory = ort, memory
        self._pool = SlotPool() if self.cuda_graphs else None
        self._plain = run_options(ort, -1) if self.cuda_graphs else None

    def _session(self, ort, stream: int):
        opts = provider_options(self.provider, self.model_dir, stream, self.tf32, self.cuda_graphs)
        try:
            return create_session(ort, self.model_dir, self.provider, self.threads, opts, self.kernels)
        except ModelDirError as e:
            if not (self.cuda_graphs and "cuda graph" in str(e).lower()):
                raise
            # e.g. "This session cannot use the CUDA Graph feature ... all compute graph nodes have
            # not been partitioned to the CUDA EP": run without graphs rather than not at all
            notice(f"ONNX Runtime cannot use a CUDA graph for this model ({first_line(e.__cause__ or e)}); "
                   f"decode runs with plain launches")
            self.cuda_graphs = False
            return create_session(ort, self.model_dir, self.provider, self.threads, {**opts, "enable_cuda_graph": "0"},
                                  self.kernels)

    def deactivate(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self.session, self._pool = None, None
        if self.memory is not None and not isinstance(self.memory, HostMemory):
            self.memory.close()  # device buffers die with the session; host buffers may outlive it
            self.memory = None

    # ---- caches and forwards ----

    def new_cache(self, batch: int, capacity: int) -> "DeviceCache | OrtCache":
        self.activate()
        if self.binding == "ortvalue":
            return OrtCache(self, batch, capacity)
        return open_cache(self.memory, self.spec, self.config, batch, capacity, self._pool)

    def new_batch_cache(self, rows: int, capacity: int) -> BatchCache:
        """The scheduler's cache in this runner's memory core, run through the pointer binding (the
        CPU provider's too); with CUDA graphs decode runs at power-of-two buckets of rows."""
        self.activate()
        return BatchCache(self.memory, self.spec, self.config, rows, capacity, self._execute, self._decode,
                          pow2_buckets=self.cuda_graphs)

    def forward(self, input_ids: np.ndarray, cache, all_logits: bool = False) -> np.ndarray:
        """As Runner.forward; a one-token step returns a view of the cache's logits buffer, valid
        until the next forward on that cache."""
        if isinstance(cache, OrtCache) and input_ids.shape[1] == 1 and not all_logits:
            return cache.decode_step(input_ids)
        if not isinstance(cache, DeviceCache):
            return super().forward(input_ids, cache, all_logits)  # a HostCache: plain session.run
        self.activate()
        if cache.slot.memory is not self.memory:
            raise GptExportError("this KV cache belongs to a closed session of the runner; make a new one")
        if input_ids.shape[1] == 1 and not all_logits:
            return cache.decode(input_ids, self._decode)
        return cache.run(input_ids, all_logits, self._execute)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.activate()
        try:
            with self.memory.lock:  # on CUDA: never while another thread's step is being captured
                outputs = self.session.run(self.spec.output_names, feeds, self._plain)
        except Exception as e:  # e.g. a graph that does not match its manifest's config
            raise self.run_error(e) from e
        return dict(zip(self.spec.output_names, outputs))

    def _bind(self, ins: dict, outs: dict, addresses: dict):
        """An IOBinding of every input and output to its buffer's address, with its shape."""
        binding, device = self.session.io_binding(), self.memory.ort_device
        for t in self.spec.inputs:
            binding.bind_input(t.name, device, 0, ELEMENT_TYPES[t.dtype], ins[t.name], addresses[t.name])
        for t in self.spec.outputs:
            binding.bind_output(t.name, device, 0, ELEMENT_TYPES[t.dtype], outs[t.name], addresses[t.name])
        return binding

    def _execute(self, slot: Slot, ins: dict, outs: dict, addresses: dict) -> None:
        """Any forward's run: bound afresh (its shapes vary), never captured."""
        self._run(self._bind(ins, outs, addresses), self._plain)

    def _decode(self, slot: Slot) -> None:
        """The decode step's run, bound once per slot and session; captured and replayed with graphs."""
        state = slot.backend_state
        if state is None or state.session is not self.session:
            d = slot.decode_buffers()
            options = run_options(self.ort, slot.graph_id) if self.cuda_graphs else self._plain
            state = slot.backend_state = DecodeBinding(self.session, self._bind(d.input_shapes, d.output_shapes,
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


class OrtCache(HostCache):
    """The CPU provider's default cache: a HostCache plus the IOBinding of its one-token decode step.

    OrtValues made with ortvalue_from_numpy share the arrays' memory, and the CPU provider reads a
    CPU OrtValue in place, so writing into the arrays before each step is enough. (A GPU provider
    copies such an OrtValue to the device when it is bound: never use this there.) Per-generation
    state, like the buffers, so one runner can serve several caches from threads.
    """

    def __init__(self, runner: OrtRunner, batch: int, capacity: int):
        super().__init__(runner.spec, runner.config, batch, capacity, runner.cache_dtype())
        self.runner = runner
        self.session = None  # the session the binding belongs to; bound on the first decode step

    def _bind(self) -> None:
        c, spec, B = self.runner.config, self.runner.spec, self.batch
        self.input_ids = np.zeros((B, 1), np.int64)
        self.past_length = np.zeros(B, np.int64)
        self.logits = np.zeros((B, 1, c.vocab_size), np.float32)
        dtype = self.runner.cache_dtype()
        self.new = {name: np.zeros((B, c.n_head, 1, c.head_dim), dtype) for name in spec.new_names}
        inputs = {"input_ids": self.input_ids, "past_length": self.past_length,
                  "logit_positions": np.zeros(1, np.int64), **self.buffers}
        outputs = {"logits": self.logits, **self.new}
        # the OrtValues are kept with the arrays for as long as the binding lives
        ortvalue = self.runner.ort.OrtValue.ortvalue_from_numpy
        self.values = {n: ortvalue(a) for n, a in {**inputs, **outputs}.items()}
        self.session = self.runner.session
        self.binding = self.session.io_binding()
        for name in inputs:
            self.binding.bind_ortvalue_input(name, self.values[name])
        for name in outputs:
            self.binding.bind_ortvalue_output(name, self.values[name])

    def decode_step(self, input_ids: np.ndarray) -> np.ndarray:
        """Run one token per sequence after the cached ones; (B, V) logits, a view reused next step."""
        grown = self.reserve(self.length + 1)  # before the run: an overflow raises with nothing run
        if grown or self.session is None or self.session is not self.runner.session:
            self.runner.activate()  # first step, re-activated, or the buffers moved: bind them
            self._bind()
        self.input_ids[...] = input_ids
        self.past_length[:] = self.length  # the buffers are read whole; slots from here on are masked
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as e:
            raise self.runner.run_error(e) from e
        self.append(self.new, 1)
        return self.logits[:, 0]
