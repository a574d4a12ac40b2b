"""The KV cache in a memory core (device.py), and one forward step over it: shared by both GPU runners.

A cache is one (batch, n_head, capacity, head_dim) buffer per past input, allocated at its capacity
and zeroed. A forward binds the whole buffers as the past inputs (the graph masks the slots at and
beyond `past_length`), writes the graph's new_key/new_value outputs into the next slots with one
strided copy per layer tensor (KVLayout.append -> DeviceMemory.copy2d), and downloads only the
logits that are sampled. Nothing of the cache ever travels to the host.

Two step shapes:
- `DeviceCache.run`: any forward (prefill, all-logits), inputs and outputs in scratch buffers sized
  on demand; the backend binds them afresh each call.
- `DeviceCache.decode`: one token per sequence, with decode buffers allocated once per slot at fixed
  addresses. A backend may record that step once (ONNX Runtime's CUDA graph, a captured TensorRT
  enqueue) and replay it: a replay reads exactly those addresses, so the small inputs are written
  into them before every step and the outputs read from them after.

The buffers live in a `Slot`. With CUDA graphs a runner pools slots by (batch, capacity): a
captured graph keeps the addresses it was recorded with, so the buffers must outlive one
generation and serve the next of the same shape. A `DeviceCache` is the per-generation handle;
when it is closed or garbage-collected its slot goes back to the pool (or is freed).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...config import GPTConfig, IOSpec, numpy_dtype
from ...errors import GptExportError
from ...profiles import output_shapes, step_shapes
from .device import ALIGN, DeviceMemory


@dataclass(frozen=True)
class Copy2D:
    """A cudaMemcpy2D: `height` rows of `width` bytes, rows `spitch`/`dpitch` bytes apart."""

    dst_offset: int
    dpitch: int
    spitch: int
    width: int
    height: int


@dataclass(frozen=True)
class KVLayout:
    """One cache buffer, (batch, n_head, capacity, head_dim) contiguous, as the graph reads it."""

    batch: int
    n_head: int
    head_dim: int
    capacity: int
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.batch * self.n_head * self.capacity * self.head_dim * self.itemsize

    def new_nbytes(self, steps: int) -> int:
        """Bytes of one new_key/new_value output of `steps` positions."""
        return self.batch * self.n_head * steps * self.head_dim * self.itemsize

    def append(self, start: int, steps: int, tensors: int = 1) -> Copy2D:
        """Copy a new_key/new_value output (batch, n_head, steps, head_dim) into slots start..start+steps.

        Each (batch, head) row of the output is `steps * head_dim` contiguous elements; in the
        buffer that row begins `capacity * head_dim` elements after the previous one. `tensors`
        buffers back to back (and as many outputs back to back) are rows that simply continue:
        one copy appends to all of them.
        """
        if start < 0 or steps < 1 or start + steps > self.capacity:
            raise GptExportError(f"KV cache overflow: slots {start}..{start + steps} of {self.capacity}")
        row = self.head_dim * self.itemsize
        return Copy2D(dst_offset=start * row, dpitch=self.capacity * row, spitch=steps * row,
                      width=steps * row, height=tensors * self.batch * self.n_head)


def _aligned(nbytes: int) -> int:
    """nbytes rounded up to cudaMalloc's 256-byte alignment."""
    return -(-nbytes // ALIGN) * ALIGN


def graph_capacity(capacity: int, block_size: int) -> int:
    """The cache capacity a CUDA-graph slot is made with: the next of 64, 128, 256, ... capped at
    block_size, so a server sees a few (batch, capacity) graphs, not one per prompt length."""
    bucket = 64
    while bucket < capacity:
        bucket *= 2
    return min(bucket, block_size)


def nbytes(shape: tuple, dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class ScratchBuffers:
    """Named buffers that grow on demand (a prefill's outputs are sized by its prompt)."""

    def __init__(self, memory: DeviceMemory):
        self.memory, self.ptrs, self.sizes = memory, {}, {}

    def get(self, name: str, size: int) -> int:
        if self.sizes.get(name, -1) < size:
            if name in self.ptrs:
                self.memory.synchronize()  # queued work may still read the old buffer
                self.memory.free(self.ptrs.pop(name))
            self.ptrs[name], self.sizes[name] = self.memory.allocate(size), size
        return self.ptrs[name]

    def free(self) -> None:
        for ptr in self.ptrs.values():
            if ptr in self.memory.sizes:  # not already freed by the memory's close()
                self.memory.free(ptr)
        self.ptrs, self.sizes = {}, {}


@dataclass
class DecodeBuffers:
    """The one-token step's inputs and outputs at fixed addresses, with their shapes."""

    addresses: dict[str, int]  # every graph input and output by name (past_* are the cache buffers)
    input_shapes: dict[str, tuple]
    output_shapes: dict[str, tuple]
    logits: np.ndarray  # host (B, 1, V) float32: where each step's logits are downloaded
    appends: list[tuple[int, int, int]]  # (past, new_*, tensors): the copies of each step (Slot.appends)
    positions: np.ndarray  # the host source of logit_positions' upload, alive as long as the buffers


class Slot:
    """One cache's buffers in a memory core: the past buffers, the decode buffers, prefill scratch.

    `backend_state` is what a backend keeps with these addresses (an IOBinding, a captured graph),
    with `release_state` to free it; `graph_id` numbers the slot for ONNX Runtime's gpu_graph_id.
    """

    def __init__(self, memory: DeviceMemory, spec: IOSpec, config: GPTConfig, batch: int, capacity: int,
                 graph_id: int = -1):
        self.memory, self.spec, self.config = memory, spec, config
        self.batch, self.capacity, self.graph_id = batch, capacity, graph_id
        self.cache_dtype = numpy_dtype(spec.cache_dtype)
        self.layout = KVLayout(batch, config.n_head, config.head_dim, capacity, self.cache_dtype.itemsize)
        # every past buffer in one allocation, each at a 256-byte aligned offset (TensorRT and the
        # CUDA kernels get aligned tensors); when no padding is needed they are back to back, and
        # one strided copy appends a step to all of them (see appends)
        self.past_stride = _aligned(self.layout.nbytes)
        # zeroed: cudaMalloc leaves garbage, and a NaN in a masked slot still poisons the output:
        # the masked probabilities are 0, but 0 * NaN = NaN in probs @ v_past
        self.past_block = memory.allocate_zeroed(len(spec.past_names) * self.past_stride)
        self.past = {name: self.past_block + i * self.past_stride for i, name in enumerate(spec.past_names)}
        self.scratch = ScratchBuffers(memory)
        self.decode: DecodeBuffers | None = None
        self.backend_state = None
        self.release_state: Callable[[object], None] | None = None

    def new_outputs(self, block: int, steps: int) -> dict[str, int]:
        """Addresses of the new_key/new_value outputs of `steps` positions laid out like the past
        buffers (in order, each at an aligned offset) in `block` of new_outputs_size(steps) bytes."""
        stride = _aligned(self.layout.new_nbytes(steps))
        return {name.replace("past_", "new_", 1): block + i * stride for i, name in enumerate(self.spec.past_names)}

    def new_outputs_size(self, steps: int) -> int:
        return len(self.spec.past_names) * _aligned(self.layout.new_nbytes(steps))

    def appends(self, new: dict[str, int], steps: int) -> list[tuple[int, int, int]]:
        """The copies that append `steps` new positions (outputs laid out by new_outputs) to the
        cache: (past buffer, new output, tensors). One copy for all tensors when the past buffers
        and the outputs are back to back (no alignment padding), else one per tensor."""
        n, first = len(self.past), next(iter(self.past))
        new_size = self.layout.new_nbytes(steps)
        if self.past_stride == self.layout.nbytes and _aligned(new_size) == new_size:
            return [(self.past[first], new[first.replace("past_", "new_", 1)], n)]
        return [(ptr, new[name.replace("past_", "new_", 1)], 1) for name, ptr in self.past.items()]

    def decode_buffers(self) -> DecodeBuffers:
        """The decode step's buffers, allocated on first use and never moved afterwards."""
        if self.decode is None:
            spec, B, m = self.spec, self.batch, self.memory
            ins = step_shapes(spec, B, 1, self.capacity, 1)
            outs = output_shapes(spec, B, 1, 1)
            new = self.new_outputs(m.allocate(self.new_outputs_size(1)), 1)
            addresses = {**self.past, **new}
            for t in (*spec.inputs, *spec.outputs):
                if t.name not in addresses:
                    shape = ins.get(t.name) or outs[t.name]
                    addresses[t.name] = m.allocate(nbytes(shape, numpy_dtype(t.dtype)))
            positions = np.zeros(1, np.int64)  # the one new position: 0 (kept until the step's synchronize)
            m.upload(addresses["logit_positions"], positions)
            logits = np.empty(outs["logits"], np.float32)
            self.decode = DecodeBuffers(addresses, ins, outs, logits, self.appends(new, 1), positions)
        return self.decode

    def free(self) -> None:
        """Free the buffers and the backend's state (idempotent; after the memory closed, a no-op)."""
        if self.backend_state is not None and self.release_state is not None:
            self.release_state(self.backend_state)
        self.backend_state = None
        self.scratch.free()
        owned = [self.past_block, *(self.decode.addresses.values() if self.decode else ())]
        for ptr in dict.fromkeys(owned):
            if ptr in self.memory.sizes:  # a base pointer, not yet freed (the past and new blocks'
                self.memory.free(ptr)     # tensors after the first are inside their blocks)
        self.past, self.decode = {}, None


class SlotPool:
    """Slots kept for reuse by (batch, capacity), each with its own graph id; freed on close()."""

    def __init__(self):
        self._free: dict[tuple[int, int], list[Slot]] = {}
        self._all: list[Slot] = []
        self._lock = threading.Lock()

    def take(self, key: tuple[int, int], make: Callable[[int], Slot]) -> Slot:
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
            slot = make(len(self._all) + 1)  # graph ids 1, 2, ...: 0 is ONNX Runtime's default id
            self._all.append(slot)
            return slot

    def give(self, slot: Slot) -> None:
        with self._lock:
            if slot in self._all:
                self._free.setdefault((slot.batch, slot.capacity), []).append(slot)

    def close(self) -> None:
        with self._lock:
            for slot in self._all:
                slot.free()
            self._free, self._all = {}, []


def _release(give: Callable[[Slot], None], slot: Slot) -> None:
    try:
        give(slot)
    except Exception:  # at interpreter exit CUDA may already be gone; nothing left to free then
        pass


# A backend's execute: bind these addresses with these shapes and run the graph on the memory's stream.
Execute = Callable[[Slot, dict, dict, dict], None]


class DeviceCache:
    """The KV cache of one generation (a handle on a Slot), with base.HostCache's bookkeeping."""

    def __init__(self, slot: Slot, release: Callable[[Slot], None]):
        self.slot = slot
        self.batch, self.capacity, self.length = slot.batch, slot.capacity, 0
        self._finalizer = weakref.finalize(self, _release, release, slot)

    def reset(self) -> None:
        self.length = 0

    def close(self) -> None:
        """Give the buffers back now (also done when the cache is garbage-collected)."""
        self._finalizer()

    def read(self, name: str) -> np.ndarray:
        """A past buffer, downloaded: (batch, n_head, capacity, head_dim)."""
        s = self.slot
        out = np.empty((s.batch, s.config.n_head, s.capacity, s.config.head_dim), s.cache_dtype)
        with s.memory.lock:
            s.memory.download(out, s.past[name])
            s.memory.synchronize()
        return out

    def _check(self, batch: int, steps: int) -> None:
        if batch != self.batch or self.length + steps > self.capacity:
            raise GptExportError(f"KV cache overflow or batch mismatch: {self.length} + {steps} positions of "
                                 f"{self.capacity}, batch {batch} vs {self.batch}")

    def _append(self, appends: list[tuple[int, int, int]], steps: int) -> None:
        """The new keys/values into slots length..length+steps of every past buffer, on the stream."""
        layout, copy2d = self.slot.layout, self.slot.memory.copy2d
        for past, new, tensors in appends:
            copy2d(past, new, layout.append(self.length, steps, tensors))

    def run(self, input_ids: np.ndarray, all_logits: bool, execute: Execute) -> np.ndarray:
        """Any forward: (B, T) new tokens after the cached ones; logits (B, V) of the last, or (B, T, V)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        B, T = ids.shape
        self._check(B, T)
        s = self.slot
        positions = np.arange(T, dtype=np.int64) if all_logits else np.array([T - 1], np.int64)
        host = {"input_ids": ids, "past_length": np.full(B, self.length, np.int64), "logit_positions": positions}
        # a zero-length past in prefill, as HostCache.past_feeds: the graph does no masked work
        ins = step_shapes(s.spec, B, T, s.capacity if self.length else 0, len(positions))
        outs = output_shapes(s.spec, B, T, len(positions))
        logits = np.empty(outs["logits"], np.float32)
        with s.memory.lock:
            addresses = {name: s.scratch.get(name, a.nbytes) for name, a in host.items()}
            for name, array in host.items():
                s.memory.upload(addresses[name], array)
            addresses.update(s.past)
            new = s.new_outputs(s.scratch.get("new", s.new_outputs_size(T)), T)
            addresses.update(new)
            addresses["logits"] = s.scratch.get("logits", nbytes(outs["logits"], np.float32))
            execute(s, ins, outs, addresses)
            self._append(s.appends(new, T), T)
            s.memory.download(logits, addresses["logits"])
            s.memory.synchronize()  # `host` and `logits` stay referenced until here
        self.length += T
        return logits if all_logits else logits[:, -1, :]

    def decode(self, input_ids: np.ndarray, execute: Callable[[Slot], None]) -> np.ndarray:
        """One token per sequence at the fixed decode addresses; (B, V) logits, a view reused next step."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        self._check(ids.shape[0], 1)
        if ids.shape[1] != 1:
            raise GptExportError(f"internal error: a decode step takes one token per sequence, got {ids.shape[1]}")
        s = self.slot
        past_length = np.full(ids.shape[0], self.length, np.int64)
        with s.memory.lock:
            d = s.decode_buffers()
            s.memory.upload(d.addresses["input_ids"], ids)
            s.memory.upload(d.addresses["past_length"], past_length)  # the slots from here on are masked
            execute(s)
            self._append(d.appends, 1)
            s.memory.download(d.logits, d.addresses["logits"])
            s.memory.synchronize()
        self.length += 1
        return d.logits[:, 0]


def open_cache(memory: DeviceMemory, spec: IOSpec, config: GPTConfig, batch: int, capacity: int,
               pool: SlotPool | None) -> DeviceCache:
    """A new generation's cache: its own slot (freed with it), or with a pool (CUDA graphs) a slot of
    the bucketed capacity taken from the pool and given back when the cache goes."""
    if pool is None:
        return DeviceCache(Slot(memory, spec, config, batch, capacity), Slot.free)
    capacity = graph_capacity(capacity, config.block_size)
    slot = pool.take((batch, capacity), lambda graph_id: Slot(memory, spec, config, batch, capacity, graph_id))
    return DeviceCache(slot, pool.give)
