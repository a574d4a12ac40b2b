"""In-flight batching: every running sequence in one forward per step, each with its own settings.

The scheduler admits sequences (up to `max_batch` running, the rest queued first come, first
served), steps them (one decode forward for all of them, every row at its own length), and
retires them (max tokens, a stop word, cancellation, an error of their own). Each sequence keeps
its own sampling settings and its own numpy Generator, consumed as nanoGPT's `generate` consumes
its one (one draw per token), so a sequence samples the same tokens whichever sequences share its
steps; only the floating-point rounding of a batched forward may differ from a forward of one,
which can swap two tokens whose logits tie to within it (a near-tie).

This is the one generation engine: `gptexport generate`, the Python API, the Triton model, parity,
golden files, the bench and the perplexity all run their forwards through it (tests/test_layout.py).

One step:
1. admit: the queued sequences, first come first served while fewer than max_batch run and their
   KV cache rows (at the capacity of the longest) stay under max_cache_mb, each into a free row.
2. fill: the prompts being admitted are prefilled `prefill_chunk` tokens per step in all, first come
   first served (the oldest prompt takes what it needs, the next what is left), each chunk after the
   chunks before it in its row (the graph's past_length is per row); chunks of one length in
   consecutive rows share a forward. So a long prompt never stalls the running sequences for more
   than a chunk, and first tokens come in arrival order. While no sequence decodes there is no one
   to keep waiting: the oldest prompt is prefilled whole. A prompt that is whole samples its first
   token and joins the decode rows (docs/serving.md "Prefill" for the measurement of the chunk).
3. crop: a sequence whose context passed block_size recomputes its cropped window, as nanoGPT
   does (every position shifts): all such windows (block_size tokens each) in one forward whose
   keys and values no row keeps.
4. decode: one forward over rows 0..n-1, the sequences whose context still fits; each samples.
Where the graph takes a flat batch (our attention on the CPU: BatchCache.mixed), a step with both
prompts to fill and rows to decode runs 2 and 4 as ONE forward of batch 1: the decode rows' tokens
and the prompts' chunks side by side, each at its own row's length; a prompt whole in it samples its
first token and decodes from the next step on (the mixed step).
Rows stay packed: a sequence leaving the decode rows (finished, cropped) has its row taken by the
last one (one copy), and the cache shrinks to the rows still there (a cache laid out at block_size,
batchcache.py, gives the row's pages back instead). No Triton, no threads here: the
server drives `step` from a thread of its own.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import GptExportError, ParameterError
from .backends.base import Runner
from .backends.batchcache import rounded_capacity
from .params import check_int
from .sequence import OnDelta, Probe, Sequence

__all__ = ["PREFILL_CHUNK", "OnDelta", "Probe", "Scheduler", "Sequence", "crop_notice", "run_to_end", "to_stderr"]


def crop_notice(prompt_len: int, block_size: int) -> str:
    return (f"notice: prompt has {prompt_len} tokens, more than block_size {block_size}; "
            f"using its last {block_size} tokens, as nanoGPT does")


def to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KB"


def run_to_end(runner: Runner, sequences: list[Sequence], max_batch: int | None = None) -> list[Sequence]:
    """Offline work (parity, the perplexity, benchmarks): `sequences` to their end on a scheduler of
    their own, `max_batch` at a time (default: all), its cache freed after; a sequence's error raised."""
    scheduler = Scheduler(runner, max_batch or len(sequences))
    try:
        for seq in sequences:
            scheduler.submit(seq)
        scheduler.run()
    finally:
        scheduler.close()
    for seq in sequences:
        if seq.finish == "error":
            raise seq.error
    return sequences


# prompt tokens prefilled per step, shared first come first served by the prompts waiting (decode
# steps of the running sequences go on in between): docs/serving.md "Prefill" for the measurement
PREFILL_CHUNK = 128


@dataclass(frozen=True)
class StepBudget:
    """The tokens of a mixed step (docs/serving.md "The mixed step"): `tokens`, each decode row
    counting `row_tokens`; prompts get the rest, at least a quarter of `tokens` (and at most the
    scheduler's prefill_chunk). So the step's forward, each running sequence's gap between two
    tokens, stays bounded, and the more rows decode the smaller the prompts' share: prompts arrive in
    proportion to the rows, so with many rows most steps are mixed and their length is the gap most
    streams see. While `burst` or more prompts are filling, and more of them than rows decode (a
    wave of arrivals: the first requests of 16 clients), they get prefill_chunk a step: most of the
    batch is still waiting for its first token, and few streams wait on the longer steps."""

    tokens: int = 88
    row_tokens: int = 4
    burst: int = 3

    def __post_init__(self):
        for name, least in (("tokens", 4), ("row_tokens", 0), ("burst", 1)):
            check_int(f"budget.{name}", getattr(self, name), least)

    def prompt_tokens(self, rows: int, filling: int) -> int:
        """Prompt tokens a step beside `rows` decode rows, with `filling` prompts waiting for them."""
        if filling >= self.burst and filling > rows:
            return sys.maxsize
        return max(self.tokens - self.row_tokens * rows, self.tokens // 4)


class Scheduler:
    """Runs sequences on one runner, every running one in the same forward (see the module docstring).

    `prefill_chunk`: prompt tokens prefilled per step (None: every prompt whole in the step that admits
    it); `max_cache_mb`: the KV cache bytes the admitted sequences may hold at their longest (None: no
    limit but max_batch); a sequence that would pass it waits, one that alone passes it is refused;
    `mix`: a step that fills and decodes runs them as one forward where the graph takes a flat batch
    (BatchCache.mixed; False: a chunk's forward, then the decode's, as on other graphs), of the
    size `budget` gives."""

    def __init__(self, runner: Runner, max_batch: int = 16, prefill_chunk: int | None = PREFILL_CHUNK,
                 max_cache_mb: float | None = None, mix: bool = True, budget: StepBudget = StepBudget()):
        check_int("max_batch", max_batch, 1)
        limit = getattr(runner, "max_batch", None)
        if limit is not None and max_batch > limit:
            raise ParameterError("max_batch", f"is {max_batch}, more than {runner.name} takes ({limit})")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ParameterError("prefill_chunk", f"must be an integer >= 1 or None, got {prefill_chunk}")
        if not isinstance(budget, StepBudget):
            raise ParameterError("budget", f"must be a StepBudget, got {type(budget).__name__}")
        if max_cache_mb is not None and not max_cache_mb > 0:
            raise ParameterError("max_cache_mb", f"must be > 0, got {max_cache_mb}")
        self.runner, self.max_batch = runner, max_batch
        self.config = runner.config
        # a chunk after a past needs a graph (or TensorRT profile) that takes one: else prompts go whole
        self.prefill_chunk = prefill_chunk if runner.chunked_prefill else None
        self.mix, self.budget = mix, budget  # fill and decode as one forward (the mixed step)
        self.max_cache_bytes = None if max_cache_mb is None else int(max_cache_mb * 2**20)
        c = self.config
        self.position_bytes = len(runner.spec.past_names) * c.n_head * c.head_dim * runner.cache_dtype().itemsize
        self.queue: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # decode rows 0..n-1 of the cache, packed
        self.filling: list[Sequence] = []  # prompts being prefilled, in arrival order, each in its own row
        self.cropping: list[Sequence] = []  # past block_size: a window recomputed every step, in no row
        self.cache = None
        self.lock = threading.Lock()  # submit() may come from other threads than step()
        self._wake = threading.Condition(self.lock)
        self.steps = 0  # decode forwards run, for measurements

    # ---- what callers use ----

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a sequence, once its prompt and settings are found valid for this model."""
        from ..artifacts.tokenizer import check_token_ids
        from ..errors import UsageError

        if not seq.prompt_ids:
            raise ParameterError("prompt_ids", "is empty: give at least one token")
        try:
            check_token_ids(seq.prompt_ids, self.config.vocab_size)
        except UsageError as e:
            raise ParameterError("prompt_ids", f"has {e}") from None
        seq.params.check_vocab(self.config.vocab_size)
        need = self._cache_bytes([seq])
        if self.max_cache_bytes is not None and need > self.max_cache_bytes:
            raise ParameterError("max_new_tokens", f"needs {need // self.position_bytes} positions of KV cache "
                                 f"({_size(need)}) with its prompt, more than this server's limit of "
                                 f"{_size(self.max_cache_bytes)} (--max-cache-mb)")
        if seq.params.max_new_tokens == 0:
            seq.retire("length")
            return seq
        with self.lock:
            self.queue.append(seq)
            self._wake.notify()
        return seq

    @property
    def running(self) -> list[Sequence]:
        return [*self.rows, *self.filling, *self.cropping]

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.rows or self.filling or self.cropping)

    def run(self, until: Sequence | None = None) -> None:
        """Step until every sequence (or `until`) is done."""
        while self.busy and not (until is not None and until.done.is_set()):
            self.step()

    def loop(self, stop: threading.Event, on_bug: Callable[[BaseException], None] = lambda e: None) -> None:
        """Step for as long as there is work, sleep while there is none, return once `stop` is set
        (a server's thread). A bug in a step fails the sequences it held, not the loop."""
        while not stop.is_set():
            with self._wake:
                while not self.busy and not stop.is_set():
                    self._wake.wait(0.25)
            if stop.is_set():
                return
            try:
                self.step()
            except Exception as e:
                on_bug(e)
                for seq in self.running:
                    seq.retire("error", GptExportError(f"internal error: {type(e).__name__}: {e}"))
                self.rows, self.filling, self.cropping = [], [], []
                self.close()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    # ---- admission: how many run, and what their cache may cost ----

    def _reach(self, seq: Sequence) -> int:
        """The positions a sequence may hold: its prompt and tokens, at most block_size."""
        return min(self.config.block_size, len(seq.prompt_ids) + seq.params.max_new_tokens)

    def _cache_bytes(self, seqs: list[Sequence]) -> int:
        """What rows for `seqs` cost at the longest reach among them (every row of a batch cache has
        the capacity of its longest, rounded up as the cache rounds it)."""
        reach = max(self._reach(s) for s in seqs)
        return len(seqs) * rounded_capacity(reach, self.config.block_size) * self.position_bytes

    def _admits(self, seq: Sequence) -> bool:
        running = self.running
        if len(running) >= self.max_batch:
            return False
        return self.max_cache_bytes is None or self._cache_bytes([*running, seq]) <= self.max_cache_bytes

    # ---- one step ----

    def step(self) -> None:
        """Admit, fill, crop, decode: every running sequence samples one token (one whose prompt
        has just filled, two, unless the fill and the decode were one forward: the mixed step)."""
        self._admit()
        if self.filling and self.rows and self.mix and self.cache.mixes and not any(map(self._every, self.filling)):
            if self.cropping:
                self._crop()
            self._mixed()  # fill and decode in one forward
        else:
            if self.filling:
                self._fill()
            if self.cropping:
                self._crop()
            if self.rows:
                self._decode()
        if not self.busy:
            self.close()  # an idle scheduler holds no cache: the next sequences size it afresh

    def _admit(self) -> None:
        """Queued sequences, first come first served while max_batch and the cache limit allow, each
        into a free row (the lowest) to fill."""
        with self.lock:
            admitted = []
            while self.queue and self._admits(self.queue[0]):
                admitted.append(self.queue.popleft())
                self.filling.append(admitted[-1])
        block = self.config.block_size
        for seq in admitted:
            if len(seq.prompt_ids) > block:
                (seq.notice or to_stderr)(crop_notice(len(seq.prompt_ids), block))
            seq.context, seq.filled = seq.prompt_ids[-block:], 0
            seq.row = self._free_row(len(self.rows))  # admission left one: fewer than max_batch run
            self._cache(len(seq.context))

    def _free_row(self, first: int, *holding: Sequence) -> int | None:
        """The lowest row from `first` on that no prompt being filled (nor one of `holding`) holds."""
        held = {s.row for s in (*self.filling, *holding)}
        return next((r for r in range(first, self.max_batch) if r not in held), None)

    def _fill(self) -> None:
        """The next chunks of the waiting prompts, prefill_chunk tokens in all, first come first
        served; chunks of one length in consecutive rows share a forward. A prompt that is whole
        samples its first token and joins the decode rows."""
        self._drop_cancelled()
        work = self._chunks()
        whole_now: list[Sequence] = []
        while work:
            seq, take = work[0]
            every = self._every(seq)
            k = 1
            while (k < len(work) and work[k][1] == take and work[k][0].row == seq.row + k and not every
                   and not self._every(work[k][0])):
                k += 1
            whole_now += self._fill_chunks([s for s, _ in work[:k]], take, every)
            work = work[k:]
        self._fill_done(whole_now)

    @staticmethod
    def _every(seq: Sequence) -> bool:
        """Whether a prompt wants every position's logits (parity, the perplexity): one forward, whole."""
        return seq.probe is not None and seq.probe.all_positions

    def _drop_cancelled(self) -> None:
        for seq in self.filling:
            if seq.filled and seq.finish is None and seq.cancelled():  # between chunks: stop paying for it
                seq.retire("cancelled")

    def _chunks(self, most: int = sys.maxsize) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to take) of the prompts filling this step: prefill_chunk tokens in all (or
        `most`, if fewer), first come first served (while no sequence decodes, the oldest prompt whole)."""
        budget = min(self.prefill_chunk or sys.maxsize, most)
        oldest = next((s for s in self.filling if s.finish is None), None)
        if not self.rows and oldest is not None:  # no one decodes, no one to keep waiting: the oldest goes whole
            budget = max(budget, len(oldest.context) - oldest.filled)
        work: list[tuple[Sequence, int]] = []
        for seq in self.filling:
            if budget <= 0:
                break
            if seq.finish is not None:
                continue
            left = len(seq.context) - seq.filled
            take = left if self._every(seq) else min(left, budget)
            work.append((seq, take))
            budget -= take
        return work

    def _fill_done(self, whole_now: list[Sequence]) -> None:
        """The prompts now whole (or ended) leave the filling ones for the decode rows (or out)."""
        for seq in [s for s in self.filling if s.finish is not None or s in whole_now]:
            self.filling.remove(seq)  # the others (done too, or not) keep their rows meanwhile
            self._filled(seq)

    def _mixed(self) -> None:
        """The decode rows' next tokens and the prompts' next chunks in ONE forward (a flat batch:
        BatchCache.mixed), so a step that prefills costs the running sequences one forward, not two."""
        n = len(self.rows)
        self._drop_cancelled()  # (before the prompts still filling are counted)
        work = self._chunks(self.budget.prompt_tokens(n, sum(s.finish is None for s in self.filling)))
        try:
            logits = self.cache.mixed(np.array([s.last for s in self.rows], np.int64),
                                      [(s.row, s.context[s.filled:s.filled + take]) for s, take in work])
        except GptExportError as e:  # the forward itself failed: every sequence in it fails
            for seq in [*self.rows, *(s for s, _ in work)]:
                seq.retire("error", e)
            self._pack()
            self._fill_done([])
            return
        for seq, take in work:
            seq.filled += take
        whole = [i for i, (s, _) in enumerate(work) if s.filled == len(s.context)]
        if whole:
            self._accept([work[i][0] for i in whole], logits[[n + i for i in whole]])
        self._decoded(logits[:n])
        self._fill_done([work[i][0] for i in whole])

    def _fill_chunks(self, seqs: list[Sequence], take: int, all_positions: bool) -> list[Sequence]:
        """`take` more tokens of each of `seqs` (consecutive rows), in one forward; those now whole."""
        starts = np.array([s.filled for s in seqs], np.int64)
        ids = np.array([s.context[s.filled:s.filled + take] for s in seqs])
        try:
            logits = self.cache.prefill(seqs[0].row, ids, all_positions, starts)
        except GptExportError as e:  # these sequences fail (a broken backend); the others go on
            for seq in seqs:
                seq.retire("error", e)
            return []
        for seq in seqs:
            seq.filled += take
        if all_positions:
            for seq, rows in zip(seqs, logits):
                seq.probe.prefill_logits = np.array(rows, np.float32)
            logits = logits[:, -1]
        whole = [i for i, s in enumerate(seqs) if s.filled == len(s.context)]
        if whole:
            self._accept([seqs[i] for i in whole], logits[whole])
        return [seqs[i] for i in whole]

    def _filled(self, seq: Sequence) -> None:
        """A sequence whose prompt is in its row (and has sampled from it), or that failed: into the
        decode rows (row len(rows); a prompt filling there moves to a free row, or trades places with
        it), to the cropped windows, or out."""
        if seq.finish is not None or len(seq.context) > self.config.block_size:
            if seq.finish == "error":
                self.cache.scrub(seq.row)
            self.cache.release(seq.row)
            if seq.finish is None:
                self.cropping.append(seq)
            seq.row = -1
            return
        target = len(self.rows)
        other = next((s for s in self.filling if s.row == target), None)
        if other is not None:  # a prompt still filling holds the row: it moves to a free row, if any
            free = self._free_row(target + 1, seq)
            if free is not None:
                self.cache.move(target, free)
                other.row = free
        if other is not None and other.row == target:  # no free row: the two trade places (three copies)
            self.cache.swap(seq.row, target)
            other.row = seq.row
        elif seq.row != target:
            self.cache.move(seq.row, target)
            self.cache.release(seq.row)  # (what it held is at target now)
        seq.row = -1  # a decode row: its index in self.rows
        self.rows.append(seq)

    def _accept(self, seqs: list[Sequence], logits: np.ndarray) -> None:
        """Each sequence samples from its row of (n, V) logits; a sequence's own failure is its alone."""
        finite = np.isfinite(logits).all(axis=-1)
        for i, seq in enumerate(seqs):
            try:
                seq.accept(logits[i], self.runner.name, bool(finite[i]))
            except GptExportError as e:  # NaN logits, say
                seq.retire("error", e)

    def _crop(self) -> None:
        """Every sequence past block_size recomputes its window (block_size tokens, the same length for
        all) in one forward whose keys and values no row keeps (the window slides every step)."""
        for seq in self.cropping:
            del seq.context[0]  # the window slides: every position shifts, so recompute it whole
        try:
            logits = self._cache(1).window(np.array([s.context for s in self.cropping]))
        except GptExportError as e:
            for seq in self.cropping:
                seq.retire("error", e)
            self.cropping = []
            return
        self._accept(self.cropping, logits)
        self.cropping = [s for s in self.cropping if s.finish is None]

    def _decode(self) -> None:
        try:
            logits = self.cache.decode(np.array([s.last for s in self.rows], np.int64))
        except GptExportError as e:  # the forward itself failed: every sequence in it fails
            for seq in self.rows:
                seq.retire("error", e)
            self._pack()
            return
        self._decoded(logits)

    def _decoded(self, logits: np.ndarray) -> None:
        """The decode rows sample from their (n, V) logits; those past block_size go to the cropped
        windows; the rows are packed."""
        self.steps += 1
        self._accept(self.rows, logits)
        for seq in self.rows:
            if seq.finish is None and len(seq.context) > self.config.block_size:
                self.cropping.append(seq)  # leaves the decode rows: from now on it recomputes its window
        self._pack()

    def _pack(self) -> None:
        """Keep the decode rows packed at 0..n-1: the last row fills each row that leaves; once rows
        have left, the cache shrinks to what the rows still there need."""
        self.cropping = [s for s in self.cropping if s.finish is None]
        for row, seq in enumerate(self.rows):
            if seq.finish == "error":  # what it wrote may be NaN: not for the next sequence in its row
                self.cache.scrub(row)
        i, left = 0, False
        while i < len(self.rows):
            seq = self.rows[i]
            if seq.finish is None and len(seq.context) <= self.config.block_size:
                i += 1
                continue
            last = len(self.rows) - 1
            self.cache.move(last, i)
            self.cache.release(last)  # (moved, or the row that left was the last)
            self.rows[i] = self.rows[last]
            self.rows.pop()
            left = True
        if left:
            lengths = self.cache.lengths
            self.cache.fit(max([int(lengths[:len(self.rows)].max(initial=0)) + 1,
                                *(len(s.context) for s in self.filling)]))

    def _cache(self, positions: int):
        """The batch cache, with room for `positions` per row (made on first use, grown as needed)."""
        if self.cache is None:
            self.cache = self.runner.new_batch_cache(self.max_batch, positions)
        self.cache.ensure_capacity(positions)
        return self.cache
