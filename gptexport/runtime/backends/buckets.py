"""The fixed-address buffers of the batch cache's forwards, and the arenas that keep them under CUDA graphs.

A decode step's inputs and outputs sit at fixed addresses per *bucket* (a batch size the step is
run at: n itself on the CPU; with CUDA graphs 1, 2, 4, 8... up to the cache's rows, so a few graphs
serve every n, and no bucket is larger than the past buffers or the engine's profiles): rows
n..bucket-1 of a bucket are idle (token 0, length 0); their outputs are ignored and never appended.
A runner's decode step (an IOBinding, a CUDA graph) binds a bucket once and may capture it:
`decode_buffers()` are its fixed addresses, `graph_id` its CUDA graph's id, `backend_state` what the
runner keeps with them.

With CUDA graphs the past buffers and the buckets live in a `GraphArena` that the runner keeps
across caches, so that captured graphs are reused rather than piling up (see GraphArena).
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...config import GPTConfig, IOSpec, numpy_dtype
from ...profiles import output_shapes, step_shapes
from .device import ALIGN, DeviceMemory, HostMemory

# gpu_graph_id of each bucket: unique in the process
_GRAPH_IDS = itertools.count(1_000_000)


def nbytes(shape: tuple, dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class ScratchBuffers:
    """Named buffers that grow on demand (a prefill's inputs and outputs are sized by its prompt)."""

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
    logits: np.ndarray  # (B, 1, V) float32 on the host: the output buffer itself, or where it is downloaded
    positions: np.ndarray  # the host source of logit_positions' upload, alive as long as the buffers


def graph_capacity(capacity: int, block_size: int) -> int:
    """The capacity a cache under CUDA graphs is laid out at: the next of 64, 128, 256, ... capped
    at block_size, so a server sees a few (bucket, capacity) graphs, not one per length."""
    bucket = 64
    while bucket < capacity:
        bucket *= 2
    return min(bucket, block_size)


@dataclass(frozen=True)
class Copy3D:
    """A cudaMemcpy3D between linear buffers: `depth` slices of `height` rows of `width` bytes; rows
    `spitch`/`dpitch` and slices `sslice`/`dslice` bytes apart; from src + src_offset to
    dst + dst_offset. Every slice pitch is a whole number of row pitches (cudaPitchedPtr's ysize)."""

    dst_offset: int
    dpitch: int
    dslice: int
    src_offset: int
    spitch: int
    sslice: int
    width: int
    height: int
    depth: int


def graph_bucket(n: int, rows: int) -> int:
    """The batch a decode step of n rows runs at with CUDA graphs: the next power of two, but never
    more than the cache's `rows` (its past buffers hold no more, nor do the engine's profiles)."""
    return min(1 << (n - 1).bit_length(), rows)


def tensor_stride(rows_bytes: int, pitch: int) -> int:
    """Bytes from one tensor to the next in a block: at least `rows_bytes`, a multiple of the row
    pitch (so a 3-D copy can step over tensors) and of the 256-byte alignment the kernels get."""
    unit = pitch * (ALIGN // math.gcd(pitch, ALIGN))  # the least multiple of both
    return -(-rows_bytes // unit) * unit


class Bucket:
    """A decode step of `size` rows at fixed addresses: what a runner binds once (and may capture).
    Its past inputs are rows 0..size-1 of the past buffers at `past`, laid out at `capacity`."""

    def __init__(self, memory: DeviceMemory, spec: IOSpec, config: GPTConfig, size: int, capacity: int,
                 past: dict[str, int]):
        self.memory, self.spec, self.config = memory, spec, config
        self.size, self.capacity, self.past, self.graph_id = size, capacity, dict(past), next(_GRAPH_IDS)
        self.decode: DecodeBuffers | None = None
        self.backend_state = None
        self.release_state: Callable[[object], None] | None = None
        self.new_stride = 0
        self.owned: list[int] = []  # the allocations this bucket made (not the past buffers)

    def decode_buffers(self) -> DecodeBuffers:
        """The step's buffers, allocated on first use."""
        if self.decode is None:
            spec, m, B = self.spec, self.memory, self.size
            ins = step_shapes(spec, B, 1, self.capacity, 1)
            outs = output_shapes(spec, B, 1, 1)
            pitch = self.config.head_dim * numpy_dtype(spec.cache_dtype).itemsize  # one new output's row
            self.new_stride = tensor_stride(B * self.config.n_head * pitch, pitch)
            block = m.allocate(len(spec.past_names) * self.new_stride)
            self.owned.append(block)
            addresses = dict(self.past)
            addresses.update({n.replace("past_", "new_", 1): block + i * self.new_stride
                              for i, n in enumerate(spec.past_names)})
            for t in (*spec.inputs, *spec.outputs):
                if t.name not in addresses:
                    shape = ins.get(t.name) or outs[t.name]
                    addresses[t.name] = m.allocate(nbytes(shape, numpy_dtype(t.dtype)))
                    self.owned.append(addresses[t.name])
            positions = np.zeros(1, np.int64)  # the one new position, 0 (alive as long as the buffers)
            m.upload(addresses["logit_positions"], positions)
            # the host side of each step's small inputs, reused (idle rows: token 0, no past); in host
            # memory the bound buffers themselves, written in place (no upload)
            self.step_ids = self._host(m, addresses["input_ids"], (B, 1), np.int64)
            self.step_lengths = self._host(m, addresses["past_length"], (B,), np.int64)
            self.step_ids[...], self.step_lengths[...] = 0, 0
            self.decode = DecodeBuffers(addresses, ins, outs, self._logits(m, addresses["logits"], outs["logits"]),
                                        positions)
        return self.decode

    @staticmethod
    def _host(m: DeviceMemory, address: int, shape: tuple, dtype) -> np.ndarray:
        """The host side of a step buffer: the buffer itself in host memory (written and read in place),
        else a host array it is uploaded from or downloaded into."""
        return m.view(address, shape, dtype) if isinstance(m, HostMemory) else np.zeros(shape, dtype)

    def _logits(self, m: DeviceMemory, address: int, shape: tuple) -> np.ndarray:
        return self._host(m, address, shape, np.float32)

    def free(self) -> None:
        if self.backend_state is not None and self.release_state is not None:
            self.release_state(self.backend_state)
        self.backend_state = None
        for ptr in self.owned:
            if ptr in self.memory.sizes:  # not already freed by the memory's close()
                self.memory.free(ptr)
        self.owned, self.decode = [], None


def past_stride(config: GPTConfig, itemsize: int, rows: int, capacity: int) -> int:
    """Bytes from one past tensor, (rows, n_head, capacity, head_dim), to the next in a block."""
    pitch = capacity * config.head_dim * itemsize
    return tensor_stride(rows * config.n_head * pitch, pitch)


class GraphArena:
    """The past buffers and decode buckets of a batch cache under CUDA graphs, kept by the runner
    from one cache to the next, so that a captured graph is captured once and replayed for good.

    What this relies on: ONNX Runtime captures a decode step on the first run with a new
    gpu_graph_id and from then on replays that capture (its addresses, its shapes) for every run
    with the id; an id cannot be captured again ("Trying to capture a graph with annotation id N
    that already used", CUDAGraphManager::CaptureBegin in onnxruntime/core/providers/cuda/
    cuda_graph.cc), and its graphs are destroyed only with the session (no API deletes one). A
    TensorRT graph (trt.py) replays its addresses too. So addresses never change here: one
    allocation with room for `rows` rows of block_size positions, made once; a cache of capacity c
    lays its past buffers out in it at c (attention then reads c positions, not block_size), and
    the buckets, one per (size, capacity), keep their buffers and graph ids as long as the arena.
    Capacities are 64, 128, ... block_size (graph_capacity), so an arena holds at most
    (bucket sizes) x (capacities) graphs however long a server runs.
    """

    def __init__(self, memory: DeviceMemory, spec: IOSpec, config: GPTConfig, rows: int):
        self.memory, self.spec, self.config, self.rows = memory, spec, config, rows
        itemsize = numpy_dtype(spec.cache_dtype).itemsize
        self.block = memory.allocate(len(spec.past_names) * past_stride(config, itemsize, rows, config.block_size))
        self.buckets: dict[tuple[int, int], Bucket] = {}

    def bucket(self, size: int, capacity: int, past: dict[str, int]) -> Bucket:
        key = (size, capacity)
        if key not in self.buckets:
            self.buckets[key] = Bucket(self.memory, self.spec, self.config, size, capacity, past)
        return self.buckets[key]

    def free(self) -> None:
        for bucket in self.buckets.values():
            bucket.free()
        self.buckets = {}
        if self.block in self.memory.sizes:
            self.memory.free(self.block)


class GraphArenas:
    """A runner's arenas, each lent to one batch cache at a time (two caches at once get two);
    closed with the runner's session, which frees their graphs."""

    def __init__(self):
        self._free: dict[int, list[GraphArena]] = {}
        self.all: list[GraphArena] = []
        self._lock = threading.Lock()

    def take(self, memory: DeviceMemory, spec: IOSpec, config: GPTConfig, rows: int) -> GraphArena:
        with self._lock:
            free = self._free.get(rows)
            if free:
                return free.pop()
            arena = GraphArena(memory, spec, config, rows)
            self.all.append(arena)
            return arena

    def give(self, arena: GraphArena) -> None:
        with self._lock:
            if arena in self.all:
                self._free.setdefault(arena.rows, []).append(arena)

    def graph_ids(self) -> int:
        """How many buckets (graph ids) the arenas hold: what bounds the graphs captured."""
        return sum(len(a.buckets) for a in self.all)

    def close(self) -> None:
        with self._lock:
            for arena in self.all:
                arena.free()
            self._free, self.all = {}, []
