"""The scheduler's KV cache: `rows` sequences, each at its own length, in one memory core (device.py).

One allocation holds every past buffer, (rows, n_head, capacity, head_dim) each, back to back
(each tensor's bytes rounded up so that tensors stay a whole number of head rows apart, which is
what lets one 3-D copy cross every layer at once). A sequence lives in one row while it runs:
- `prefill(row, ids)`: its prompt (or its cropped window) through the graph, batch 1 with an
  empty past; the new keys/values go into its row at positions 0..T-1 (one copy). Windows of the
  same length (every sequence past block_size has one of block_size) go in one forward, one row each.
- `decode(ids)`: one token for each of rows 0..n-1 in ONE forward, every row at its own length
  (the graph's past_length is per row); each row's new key/value goes to its own position: one 3-D
  copy per row, across all layers. Rows are kept packed at 0..n-1 by the scheduler (`move`), so
  the past inputs are a prefix of the buffers: a contiguous (n, n_head, capacity, head_dim) tensor
  at the buffers' own addresses.
- `ensure_capacity(c)`: the buffers hold `capacity` positions per row: the longest reach of the
  sequences admitted so far (prompt + max tokens, at most block_size); a longer one makes them grow
  (one 3-D copy into a new allocation). Growing instead with the longest row in steps of 64, as the
  old single-sequence loop did, was measured slower in one process on the 2-core AVX2 EPYC (int8
  GPT-2-small, 16 + 128 tokens, batch 1: 77-109 tok/s growing against 101-122 at the reach, two
  interleaved runs), so the reach it is. Under CUDA graphs the capacities are 64, 128, ... block_size
  instead, laid out in an arena whose addresses never move (GraphArena).

Per decode step of n rows the memory core is asked for n + 3 copies: the token ids and the
lengths up, one append per row, the logits down; in host memory the ids, lengths and logits are the
bound buffers themselves, n (tests/runtime/test_scheduler.py counts them on the host twin).

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
from ...errors import GptExportError
from ...profiles import output_shapes, step_shapes
from .device import ALIGN, DeviceMemory, HostMemory

# run(None, input shapes, output shapes, addresses): a runner's forward of the graph at these buffers
Run = Callable[[object, dict, dict, dict], None]
# run_bucket(bucket): a runner's decode step at the bucket's fixed buffers (bound once, maybe captured)
RunBucket = Callable[["Bucket"], None]

ROOM_STEP = 1  # positions: without graphs the buffers are sized to the longest reach, not rounded up

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


class BatchCache:
    """The KV cache of up to `rows` sequences at their own lengths (see the module docstring)."""

    def __init__(self, memory: DeviceMemory, spec: IOSpec, config: GPTConfig, rows: int, capacity: int,
                 run: Run, run_bucket: RunBucket, graphs: GraphArenas | None = None, room_step: int = ROOM_STEP):
        self.memory, self.spec, self.config, self.rows = memory, spec, config, rows
        self.room_step = room_step
        self.run, self.run_bucket = run, run_bucket
        # decode of n rows at n, or (for CUDA graphs: a few captures serve every n) at
        # graph_bucket(n, rows), in an arena whose addresses outlive this cache
        self.arena = graphs.take(memory, spec, config, rows) if graphs is not None else None
        self.graphs = graphs
        self.bucket_of = (lambda n: graph_bucket(n, rows)) if graphs is not None else (lambda n: n)
        self.itemsize = numpy_dtype(spec.cache_dtype).itemsize
        self.lengths = np.zeros(rows, np.int64)
        self.capacity, self.block, self.past = 0, None, {}
        self.buckets: dict[int, Bucket] = {}
        self.scratch = ScratchBuffers(memory)
        self.ensure_capacity(capacity)

    # ---- layout ----

    @property
    def pitch(self) -> int:
        """Bytes of one head's row of positions, the row pitch of a past tensor."""
        return self.capacity * self.config.head_dim * self.itemsize

    @property
    def stride(self) -> int:
        return past_stride(self.config, self.itemsize, self.rows, self.capacity)

    @property
    def bytes_per_row(self) -> int:
        """What one sequence's slot costs: keys and values of every layer at this capacity."""
        return len(self.spec.past_names) * self.config.n_head * self.pitch

    def _allocate(self, capacity: int) -> tuple[int, dict[str, int]]:
        self.capacity = capacity
        size = len(self.spec.past_names) * self.stride
        if self.arena is not None:  # the arena's one allocation, laid out at this capacity
            block = self.arena.block
            self.memory.zero(block, size)  # what an earlier cache left (a NaN, too) is not this one's
        else:
            # zeroed: a NaN in a masked slot still poisons the output (0 * NaN = NaN in probs @ v_past);
            # on the host twin calloc's lazy zero pages cost nothing until a position is written
            block = self.memory.allocate_zeroed(size)
        return block, {name: block + i * self.stride for i, name in enumerate(self.spec.past_names)}

    def ensure_capacity(self, capacity: int) -> None:
        """Room for `capacity` positions per row; growing copies every row into the new layout (a new
        allocation, or with graphs the arena's own through a temporary one) and drops the buckets
        whose bindings name the old layout (an arena keeps them: their layout comes back)."""
        if capacity <= self.capacity:
            return
        if capacity > self.config.block_size:
            raise GptExportError(f"internal error: cache capacity {capacity} > block_size {self.config.block_size}")
        if self.arena is not None:
            capacity = graph_capacity(capacity, self.config.block_size)
        else:
            capacity = min(self.config.block_size, -(-capacity // self.room_step) * self.room_step)
        old = self.block
        old_pitch, old_stride = (self.pitch, self.stride) if old is not None else (0, 0)
        if old is not None and self.arena is not None:  # the new layout overlaps the old one: copy it aside
            old = self.memory.allocate(len(self.spec.past_names) * old_stride)
            self.memory.copy3d(old, self.block, Copy3D(0, old_stride, old_stride, 0, old_stride, old_stride,
                                                       old_stride, 1, len(self.spec.past_names)))
        self.block, self.past = self._allocate(capacity)
        if old is not None:
            self.memory.copy3d(self.block, old, Copy3D(0, self.pitch, self.stride, 0, old_pitch, old_stride,
                                                       old_pitch, self.rows * self.config.n_head,
                                                       len(self.spec.past_names)))
            self._drop_buckets()
            self.memory.synchronize()  # the copy reads the old allocation
            self.memory.free(old)

    def _drop_buckets(self) -> None:
        for bucket in self.buckets.values():
            bucket.free()
        self.buckets = {}

    def close(self) -> None:
        self._drop_buckets()
        self.scratch.free()
        if self.arena is not None:
            self.graphs.give(self.arena)  # its allocation and buckets stay, for the next cache
            self.arena = None
        elif self.block is not None and self.block in self.memory.sizes:
            self.memory.free(self.block)
        self.block, self.past = None, {}

    # ---- copies ----

    def _append_plan(self, row: int, position: int, src_row: int, steps: int, new_stride: int) -> Copy3D:
        """new keys/values of `steps` positions (row `src_row` of the new outputs) -> row `row` at
        `position`, in every layer tensor at once: depth = tensors, height = heads."""
        nh, head = self.config.n_head, self.config.head_dim * self.itemsize
        if position < 0 or position + steps > self.capacity:
            raise GptExportError(f"KV cache overflow: positions {position}..{position + steps} of {self.capacity}")
        spitch = steps * head
        return Copy3D(dst_offset=row * nh * self.pitch + position * head, dpitch=self.pitch, dslice=self.stride,
                      src_offset=src_row * nh * spitch, spitch=spitch, sslice=new_stride,
                      width=steps * head, height=nh, depth=len(self.spec.past_names))

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s cache and length into row `dst` (the scheduler packs its rows)."""
        if src == dst:
            return
        nh = self.config.n_head
        self.memory.copy3d(self.block, self.block, Copy3D(dst * nh * self.pitch, self.pitch, self.stride,
                                                          src * nh * self.pitch, self.pitch, self.stride,
                                                          self.pitch, nh, len(self.spec.past_names)))
        self.lengths[dst], self.lengths[src] = self.lengths[src], 0

    # ---- forwards ----

    def prefill(self, row: int, ids: np.ndarray, all_positions: bool = False) -> np.ndarray:
        """Rows row..row+n-1 start afresh with `ids` ((T,) for one row, or (n, T) of one length), in one
        forward with an empty past; the last position's logits, (V,) or (n, V), or with `all_positions`
        every position's, (T, V) or (n, T, V) (parity's forward check, the perplexity)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        one = ids.ndim == 1
        ids = ids[None] if one else ids
        n, T = ids.shape
        L = T if all_positions else 1  # logit positions
        if T > self.capacity or row + n > self.rows:
            raise GptExportError(f"internal error: a prefill of {n} x {T} tokens at row {row} in a cache of "
                                 f"{self.rows} x {self.capacity}")
        m, spec = self.memory, self.spec
        positions = np.arange(T - L, T, dtype=np.int64)
        host = {"input_ids": ids, "past_length": np.zeros(n, np.int64), "logit_positions": positions}
        ins, outs = step_shapes(spec, n, T, 0, L), output_shapes(spec, n, T, L)
        pitch = T * self.config.head_dim * self.itemsize
        new_stride = tensor_stride(n * self.config.n_head * pitch, pitch)
        logits = np.empty(outs["logits"], np.float32)
        with m.lock:
            addresses = {name: self.scratch.get(name, a.nbytes) for name, a in host.items()}
            for name, array in host.items():
                m.upload(addresses[name], array)
            addresses.update(self.past)  # an empty past (shape (n, nh, 0, hs)): any valid address
            new = self.scratch.get("new", len(spec.past_names) * new_stride)
            addresses.update({n.replace("past_", "new_", 1): new + i * new_stride
                              for i, n in enumerate(spec.past_names)})
            addresses["logits"] = self.scratch.get("logits", nbytes(outs["logits"], np.float32))
            self.run(None, ins, outs, addresses)
            for r in range(n):
                m.copy3d(self.block, new, self._append_plan(row + r, 0, r, T, new_stride))
            m.download(logits, addresses["logits"])
            m.synchronize()
        self.lengths[row:row + n] = T
        logits = logits if all_positions else logits[:, 0]
        return logits[0] if one else logits

    def _bucket(self, size: int) -> Bucket:
        if self.arena is not None:
            return self.arena.bucket(size, self.capacity, self.past)
        if size not in self.buckets:
            self.buckets[size] = Bucket(self.memory, self.spec, self.config, size, self.capacity, self.past)
        return self.buckets[size]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """One token for each of rows 0..n-1 (ids (n,)), each at its own length; (n, V) logits, a view
        of the bucket's buffer valid until its next step."""
        n = len(ids)
        lengths = self.lengths[:n]
        if not 1 <= n <= self.rows or lengths.min() < 1 or lengths.max() >= self.capacity:
            raise GptExportError(f"internal error: decode of {n} rows at lengths {lengths.tolist()}, "
                                 f"capacity {self.capacity}")
        size = self.bucket_of(n)
        bucket = self._bucket(size)
        m = self.memory
        with m.lock:
            d = bucket.decode_buffers()
            bucket.step_ids[:n, 0] = ids
            bucket.step_lengths[:n] = lengths
            if size > n:
                bucket.step_ids[n:], bucket.step_lengths[n:] = 0, 0  # idle rows of a larger bucket
            host = isinstance(m, HostMemory)  # there the step's inputs and logits are the bound buffers
            if not host:
                m.upload(d.addresses["input_ids"], bucket.step_ids)
                m.upload(d.addresses["past_length"], bucket.step_lengths)
            self.run_bucket(bucket)
            first_new = d.addresses[self.spec.new_names[0]]
            for r in range(n):
                m.copy3d(self.block, first_new, self._append_plan(r, int(lengths[r]), r, 1, bucket.new_stride))
            if not host:
                m.download(d.logits, d.addresses["logits"])
            m.synchronize()  # the step's host inputs stay untouched until here
        self.lengths[:n] += 1
        return d.logits[:n, 0]
