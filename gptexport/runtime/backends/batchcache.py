"""The scheduler's KV cache: `rows` sequences, each at its own length, in one memory core (device.py).

One allocation holds every past buffer, (rows, n_head, capacity, head_dim) each, back to back
(each tensor's bytes rounded up so that tensors stay a whole number of head rows apart, which is
what lets one 3-D copy cross every layer at once). A sequence lives in one row while it runs:
- `prefill(row, ids, starts)`: a prompt (or a chunk of one) through the graph: rows row..row+n-1,
  n prompts' chunks of one length T, each row after the `starts` positions it already holds (the
  graph's past_length is per row; an empty past when every start is 0); the new keys/values go into
  each row at its start (one copy per row). `window(ids)`: the same forward without keeping the keys
  and values (a cropped window, recomputed whole at every step, needs no row).
- `decode(ids)`: one token for each of rows 0..n-1 in ONE forward, every row at its own length
  (the graph's past_length is per row); each row's new key/value goes to its own position: one 3-D
  copy per row, across all layers. Rows are kept packed at 0..n-1 by the scheduler (`move`, `swap`),
  so the past inputs are a prefix of the buffers: a contiguous (n, n_head, capacity, head_dim) tensor
  at the buffers' own addresses.
- `ensure_capacity(c)` / `fit(c)`: the buffers hold `capacity` positions per row, what the longest
  row needs now rounded up to ROOM_STEP, not what the longest sequence may reach: the graph's
  attention reads every position of the capacity for every row, masked or not, so a step's cost
  follows it. Growing (and shrinking once the long rows have left) copies the rows in use into a new
  allocation. Under CUDA graphs the capacities are 64, 128, ... block_size instead, laid out in an
  arena whose addresses never move (GraphArena).
- `at_block_size`: where attention reads only each row's own length (our CachedAttention on the
  CPU) the capacity costs a step nothing, so every row is laid out at block_size from the start and
  never copied to grow or shrink (a growth of 16 rows at a few hundred positions copied 0.3-0.5 GB:
  a 0.4-0.6 s stall of every sequence); host pages are committed only as positions are written and a
  released row's pages go back (DeviceMemory.discard), so memory follows the lengths that are there.
- `forward_appends`: where the forward itself writes its new keys and values into the rows (our
  CachedAttention's presents, bound to the past's own buffers: ort.py), no append copy follows
  it; such a prefill binds the rows' whole capacity as their past, for the op to write into.
- `mixed(decode_ids, chunks)`: where the graph also takes a flat batch (`flat`), the decode rows'
  tokens and prompts' chunks in one forward of batch 1, every row at its own length (the
  scheduler's mixed step: a step that prefills is one forward, not a chunk's and a decode's).
- `move` / `swap` copy the positions a row holds, not its whole capacity.

Per decode step of n rows the memory core is asked for n + 3 copies: the token ids and the
lengths up, one append per row, the logits down; in host memory the ids, lengths and logits are the
bound buffers themselves, n, and none where the forward appends (tests/runtime/test_scheduler.py
counts them on the host twin).

Its decode steps run at fixed addresses per bucket (buckets.py), under CUDA graphs in an arena
the runner keeps across caches (buckets.GraphArena).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...config import GPTConfig, IOSpec, numpy_dtype
from ...errors import GptExportError
from ...profiles import output_shapes, step_shapes
from ..kernels.attention_pattern import POSITION_IDS, SEGMENTS
from .buckets import (
    Bucket,
    Copy3D,
    GraphArenas,
    ScratchBuffers,
    graph_bucket,
    graph_capacity,
    nbytes,
    past_stride,
    tensor_stride,
)
from .device import DeviceMemory, HostMemory

# run(None, input shapes, output shapes, addresses): a runner's forward of the graph at these buffers
Run = Callable[[object, dict, dict, dict], None]
# run_bucket(bucket): a runner's decode step at the bucket's fixed buffers (bound once, maybe captured)
RunBucket = Callable[["Bucket"], None]

# positions the capacity is rounded up to: a copy of the rows in use every ROOM_STEP steps of the longest row,
# against attention over up to ROOM_STEP - 1 unused positions per step (bench_engine.py measures it)
ROOM_STEP = 64


def positions(starts: np.ndarray, T: int) -> np.ndarray:
    """(n, T) positions of T new tokens in each of n rows after `starts` (n,): the graph's own
    past_length + 0..T-1, for a graph that takes them as `position_ids`."""
    return np.asarray(starts, np.int64)[:, None] + np.arange(T, dtype=np.int64)


def rounded_capacity(positions: int, block_size: int, room_step: int = ROOM_STEP) -> int:
    """The capacity a cache without CUDA graphs lays out for `positions`: rounded up to room_step, at
    most block_size (what the scheduler's cache limit counts, too)."""
    return min(block_size, -(-positions // room_step) * room_step)


class BatchCache:
    """The KV cache of up to `rows` sequences at their own lengths (see the module docstring)."""

    def __init__(self, memory: DeviceMemory, spec: IOSpec, config: GPTConfig, rows: int, capacity: int,
                 run: Run, run_bucket: RunBucket, graphs: GraphArenas | None = None, room_step: int = ROOM_STEP,
                 at_block_size: bool = False, forward_appends: bool = False, flat: bool = False):
        self.memory, self.spec, self.config, self.rows = memory, spec, config, rows
        self.room_step, self.at_block_size = room_step, at_block_size and graphs is None
        # the forward writes each row's new keys and values at its length itself (decode runs at n
        # rows then: an idle row of a larger bucket would write at position 0 of a row in use)
        self.forward_appends = forward_appends and graphs is None
        # the graph takes a flat batch (attention_pattern.py): with the forward appending, decode rows
        # and prompt chunks share one forward (`mixed`)
        self.mixes = flat and self.forward_appends
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
            block = self.memory.allocate_zeroed(size, small_pages=self.at_block_size)
        return block, {name: block + i * self.stride for i, name in enumerate(self.spec.past_names)}

    def ensure_capacity(self, capacity: int) -> None:
        """Room for `capacity` positions per row (rounded up: ROOM_STEP, or the graph capacities)."""
        if capacity > self.capacity:
            self._relayout(self._rounded(capacity))

    def fit(self, needed: int) -> None:
        """Shrink to what the rows need now (`needed` positions) once that is a ROOM_STEP or more below
        the capacity: the long rows have left, the short ones need not attend over their room."""
        if self.at_block_size:
            return  # laid out once: released rows gave their pages back instead
        capacity = self._rounded(max(needed, 1))
        if capacity + self.room_step <= self.capacity and capacity >= int(self.lengths.max()):
            self._relayout(capacity)

    def _rounded(self, capacity: int) -> int:
        if capacity > self.config.block_size:
            raise GptExportError(f"internal error: cache capacity {capacity} > block_size {self.config.block_size}")
        if self.arena is not None:
            return graph_capacity(capacity, self.config.block_size)
        if self.at_block_size:
            return self.config.block_size
        return rounded_capacity(capacity, self.config.block_size, self.room_step)

    def _relayout(self, capacity: int) -> None:
        """The buffers at `capacity` positions per row: the rows in use (those up to the last one
        holding positions) copied into the new layout (a new allocation, or with graphs the arena's
        own through a temporary one); the buckets whose bindings name the old layout are dropped (an
        arena keeps them: their layout comes back)."""
        old = self.block
        old_pitch, old_stride = (self.pitch, self.stride) if old is not None else (0, 0)
        if old is not None and self.arena is not None:  # the new layout overlaps the old one: copy it aside
            old = self.memory.allocate(len(self.spec.past_names) * old_stride)
            self.memory.copy3d(old, self.block, Copy3D(0, old_stride, old_stride, 0, old_stride, old_stride,
                                                       old_stride, 1, len(self.spec.past_names)))
        self.block, self.past = self._allocate(capacity)
        if old is not None:
            used = int(np.flatnonzero(self.lengths)[-1]) + 1 if self.lengths.any() else 0
            self.memory.copy3d(self.block, old, Copy3D(0, self.pitch, self.stride, 0, old_pitch, old_stride,
                                                       min(old_pitch, self.pitch), used * self.config.n_head,
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

    def _row_plan(self, dst_offset: int, dslice: int, src_offset: int, sslice: int, positions: int) -> Copy3D:
        """The first `positions` of one row of every tensor (n_head rows of `pitch` bytes apart)
        between two layouts."""
        nh, width = self.config.n_head, positions * self.config.head_dim * self.itemsize
        return Copy3D(dst_offset, self.pitch, dslice, src_offset, self.pitch, sslice, width, nh,
                      len(self.spec.past_names))

    def _row_ranges(self, row: int) -> list[tuple[int, int]]:
        """(address, bytes) of row `row` in each past tensor: n_head rows of `pitch` bytes, contiguous."""
        row_bytes = self.config.n_head * self.pitch
        return [(self.block + i * self.stride + row * row_bytes, row_bytes)
                for i in range(len(self.spec.past_names))]

    def release(self, row: int) -> None:
        """Row `row` holds nothing from now on (what it held is masked, then overwritten; laid out at
        block_size, its pages go back)."""
        self.lengths[row] = 0
        if self.at_block_size:
            for ptr, size in self._row_ranges(row):
                self.memory.discard(ptr, size)

    def scrub(self, row: int) -> None:
        """Zero row `row` in every tensor: a failed sequence's keys and values may be NaN or inf, and
        the graph's masked attention multiplies the slots past a row's length by 0 (0 * NaN = NaN),
        so what it left must not stay for the next sequence in the row (copies move only the
        positions a row holds). Only after a failure: it writes the row's whole capacity."""
        for ptr, size in self._row_ranges(row):
            self.memory.zero(ptr, size)

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s cache and length into row `dst` (the scheduler packs its rows)."""
        if src == dst:
            return
        row = self.config.n_head * self.pitch
        self.memory.copy3d(self.block, self.block, self._row_plan(dst * row, self.stride, src * row, self.stride,
                                                                  int(self.lengths[src])))
        self.lengths[dst], self.lengths[src] = self.lengths[src], 0

    def swap(self, a: int, b: int) -> None:
        """Rows `a` and `b` trade places (a prompt done filling joins the decode rows past another)."""
        if a == b:
            return
        row, held_a, held_b = self.config.n_head * self.pitch, int(self.lengths[a]), int(self.lengths[b])
        with self.memory.lock:
            aside = self.scratch.get("row", len(self.spec.past_names) * row)
            m, block, stride = self.memory, self.block, self.stride
            m.copy3d(aside, block, self._row_plan(0, row, a * row, stride, held_a))
            m.copy3d(block, block, self._row_plan(a * row, stride, b * row, stride, held_b))
            m.copy3d(block, aside, self._row_plan(b * row, stride, 0, row, held_a))
            self.memory.synchronize()
        self.lengths[[a, b]] = self.lengths[[b, a]]

    # ---- forwards ----

    def prefill(self, row: int, ids: np.ndarray, all_positions: bool = False,
                starts: np.ndarray | None = None) -> np.ndarray:
        """Rows row..row+n-1 take `ids` ((T,) for one row, or (n, T): chunks of one length) after the
        `starts` (n,) positions each already holds (default: none, a fresh start), in one forward; the
        last position's logits, (V,) or (n, V), or with `all_positions` every position's, (T, V) or
        (n, T, V) (parity's forward check, the perplexity)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        one = ids.ndim == 1
        ids = ids[None] if one else ids
        n, T = ids.shape
        starts = np.zeros(n, np.int64) if starts is None else np.asarray(starts, np.int64)
        if int(starts.max()) + T > self.capacity or row + n > self.rows or starts.shape != (n,):
            raise GptExportError(f"internal error: a prefill of {n} x {T} tokens after {starts.tolist()} at row "
                                 f"{row} in a cache of {self.rows} x {self.capacity}")
        logits = self._forward(ids, starts, all_positions, row)
        self.lengths[row:row + n] = starts + T
        return logits[0] if one else logits

    def window(self, ids: np.ndarray) -> np.ndarray:
        """(n, T) windows from scratch, their last position's (n, V) logits; no row keeps them."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return self._forward(ids, np.zeros(len(ids), np.int64), False, None)

    def _forward(self, ids: np.ndarray, starts: np.ndarray, all_positions: bool, row: int | None) -> np.ndarray:
        """A forward of (n, T) new tokens after `starts`; their keys and values appended to rows
        row..row+n-1 (row None: dropped)."""
        n, T = ids.shape
        L = T if all_positions else 1  # logit positions
        # an empty past attends over nothing; where the forward appends, it writes into the rows
        P = self.capacity if starts.any() or (self.forward_appends and row is not None) else 0
        # (the positions, for a graph that takes them: runners bind the inputs their graph has)
        host = {"input_ids": ids, "past_length": starts, "logit_positions": np.arange(T - L, T, dtype=np.int64),
                POSITION_IDS: positions(starts, T)}
        ins, outs = step_shapes(self.spec, n, T, P, L), output_shapes(self.spec, n, T, L)
        ins[POSITION_IDS] = (n, T)
        appends = [] if row is None or self.forward_appends else [(row + r, int(starts[r]), r) for r in range(n)]
        logits = self._run_forward(host, ins, outs, row or 0, T, appends)
        return logits if all_positions else logits[:, 0]

    def mixed(self, decode_ids: np.ndarray, chunks: list[tuple[int, list[int]]]) -> np.ndarray:
        """One forward of batch 1 over a flat batch (attention_pattern.py): one token for each of decode
        rows 0..n-1 (`decode_ids` (n,)) and, for each (row, ids) of `chunks`, a prompt's next tokens
        after what its row holds, every row at its own length; (n + len(chunks), V) logits: each decode
        row's, then each chunk's last position's (valid until the next forward)."""
        n = len(decode_ids)
        rows = np.array([*range(n), *(r for r, _ in chunks)], np.int64)
        counts = np.array([1] * n + [len(ids) for _, ids in chunks], np.int64)
        starts = self.lengths[np.minimum(rows, self.rows - 1)]  # (a row past the cache is refused below)
        if (not self.mixes or len(set(rows.tolist())) != len(rows) or (starts[:n] < 1).any() or counts.min() < 1
                or int((starts + counts).max()) > self.config.block_size or int(rows.max()) >= self.rows):
            raise GptExportError(f"internal error: a mixed forward of rows {rows.tolist()} at {starts.tolist()} "
                                 f"taking {counts.tolist()} tokens, block_size {self.config.block_size}")
        self.ensure_capacity(int((starts + counts).max()))
        ids = np.concatenate([np.asarray(decode_ids, np.int64), *(np.asarray(i, np.int64) for _, i in chunks)])[None]
        N, S = ids.shape[1], len(rows)
        at = np.concatenate([np.arange(s, s + c, dtype=np.int64) for s, c in zip(starts, counts)])[None]
        host = {"input_ids": ids, "past_length": self.lengths.copy(), "logit_positions": np.cumsum(counts) - 1,
                POSITION_IDS: at, SEGMENTS: np.stack([rows, counts], axis=1)}
        ins = step_shapes(self.spec, self.rows, N, self.capacity, S)  # every row's past, its length
        ins.update({"input_ids": (1, N), POSITION_IDS: (1, N), SEGMENTS: (S, 2)})
        logits = self._run_forward(host, ins, output_shapes(self.spec, 1, N, S), 0, N, [])
        self.lengths[rows] += counts
        return logits[0]

    def _run_forward(self, host: dict, ins: dict, outs: dict, past_row: int, T: int,
                     appends: list[tuple[int, int, int]]) -> np.ndarray:
        """Run the graph on `host`'s inputs (uploaded), the past from row `past_row` on, new keys and
        values of T positions per row into scratch, then each (row, position, new row) of `appends`
        copied into the cache; the logits, downloaded."""
        m, spec, nh = self.memory, self.spec, self.config.n_head
        pitch = T * self.config.head_dim * self.itemsize
        new_stride = tensor_stride(outs[spec.new_names[0]][0] * nh * pitch, pitch)
        logits = np.empty(outs["logits"], np.float32)
        with m.lock:
            addresses = {name: self.scratch.get(name, a.nbytes) for name, a in host.items()}
            for name, array in host.items():
                m.upload(addresses[name], array)
            # rows past_row.. of the past (with an empty past any valid address will do)
            addresses.update({name: a + past_row * nh * self.pitch for name, a in self.past.items()})
            new = self.scratch.get("new", len(spec.past_names) * new_stride)
            addresses.update({n.replace("past_", "new_", 1): new + i * new_stride
                              for i, n in enumerate(spec.past_names)})
            addresses["logits"] = self.scratch.get("logits", nbytes(outs["logits"], np.float32))
            self.run(None, ins, outs, addresses)
            for row, position, src in appends:
                m.copy3d(self.block, new, self._append_plan(row, position, src, T, new_stride))
            m.download(logits, addresses["logits"])
            m.synchronize()
        return logits

    def _bucket(self, size: int) -> Bucket:
        if self.arena is not None:
            return self.arena.bucket(size, self.capacity, self.past)
        if size not in self.buckets:
            self.buckets[size] = Bucket(self.memory, self.spec, self.config, size, self.capacity, self.past)
        return self.buckets[size]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """One token for each of rows 0..n-1 (ids (n,)), each at its own length (the cache grows to
        make room for the new position); (n, V) logits, a view of the bucket's buffer valid until its
        next step."""
        n = len(ids)
        lengths = self.lengths[:n]
        shortest, longest = int(lengths.min()), int(lengths.max())
        if not 1 <= n <= self.rows or shortest < 1 or longest >= self.config.block_size:
            raise GptExportError(f"internal error: decode of {n} rows at lengths {lengths.tolist()}, "
                                 f"block_size {self.config.block_size}")
        if longest >= self.capacity:
            self.ensure_capacity(longest + 1)
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
            if not self.forward_appends:
                first_new = d.addresses[self.spec.new_names[0]]
                for r in range(n):
                    m.copy3d(self.block, first_new, self._append_plan(r, int(lengths[r]), r, 1, bucket.new_stride))
            if not host:
                m.download(d.logits, d.addresses["logits"])
            m.synchronize()  # the step's host inputs stay untouched until here
        self.lengths[:n] += 1
        return d.logits[:n, 0]
