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
1. admit: the queued sequences (while fewer than max_batch run) are prefilled into the next free
   rows of the batch cache (batchcache.py) and sample their first tokens: prompts of one length
   together in one forward, each other length in a forward of its own (never padded: see
   docs/serving.md for the measurement).
2. crop: a sequence whose context passed block_size recomputes its cropped window, as nanoGPT
   does (every position shifts): all such windows (block_size tokens each) in one forward, in the
   free rows; the decode rows are untouched.
3. decode: one forward over rows 0..n-1, the sequences whose context still fits; each samples.
Rows stay packed: a sequence leaving the decode rows (finished, cropped) has its row taken by the
last one (one copy). No Triton, no threads here: the server drives `step` from a thread of its own.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import GptExportError, ParameterError
from .backends.base import Runner
from .params import GenerationParams, prepare
from .sampling import check_finite, next_token, token_logprob
from .textstream import TextStream


def crop_notice(prompt_len: int, block_size: int) -> str:
    return (f"notice: prompt has {prompt_len} tokens, more than block_size {block_size}; "
            f"using its last {block_size} tokens, as nanoGPT does")


def to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# on_delta(seq, ids, text): the tokens of one delta of `seq` and their text (None without a tokenizer)
OnDelta = Callable[["Sequence", list[int], "str | None"], None]


def _no_delta(seq: "Sequence", ids: list[int], text: str | None) -> None:
    pass


def _never() -> bool:
    return False


@dataclass
class Probe:
    """What a check (parity, perplexity) asks of a sequence besides its tokens: a copy of the logits
    behind each token, the prefill's logits at every prompt position, and tokens to feed instead of
    sampled ones (teacher forcing: the sequence ends when they run out). Served sequences have none."""

    all_positions: bool = False
    forced: list[int] | None = None
    prefill_logits: np.ndarray | None = None  # (T, V), with all_positions
    logits: list[np.ndarray] = field(default_factory=list)  # (V,) behind each token, in order


@dataclass
class Sequence:
    """One sequence: its request, its own generator, and what it has produced so far.

    `rng` continues a generator (default: a new one seeded with params.seed); `text` (attached by
    the session for a model with a tokenizer) turns its tokens into text deltas and finds its
    stop words; `on_done(seq)` is called once, when it is retired (on the thread that steps).
    """

    prompt_ids: list[int]
    params: GenerationParams
    on_delta: OnDelta | None = None  # None: nobody listens
    cancelled: Callable[[], bool] | None = None  # None: never cancelled
    notice: Callable[[str], None] | None = None
    rng: np.random.Generator | None = None
    on_done: Callable[["Sequence"], None] | None = None  # called once, when it is retired
    text: TextStream | None = None
    probe: Probe | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each token, with params.logprobs
    finish: str | None = None  # "length", "stop", "cancelled" or "error" once retired
    error: Exception | None = None
    context: list[int] = field(default_factory=list)  # the last block_size tokens: what the model sees
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.on_delta is None:
            self.on_delta = _no_delta
        if self.cancelled is None:
            self.cancelled = _never
        if self.rng is None:
            self.rng = np.random.default_rng(self.params.seed)

    @property
    def last(self) -> int:
        return self.tokens[-1]

    def accept(self, logits: np.ndarray, source: str, finite: bool | None = None) -> None:
        """Sample the next token from this sequence's (V,) logits with its own settings and generator,
        send what it completes, and retire the sequence if it is finished. `finite`: whether the
        logits were already found finite (the decode step checks every row at once)."""
        if not finite:
            check_finite(logits[None], source)
        if self.cancelled():  # checked before each token is sent, as the loop's callers do
            return self.retire("cancelled")
        if self.probe is not None and self._probed(logits):
            return
        p = self.params
        if p.plain:  # nanoGPT's settings: the logits as they come (no history to gather)
            z, sampling = logits, p.sampling
        else:
            z, sampling = prepare(logits, p, self.prompt_ids + self.tokens, len(self.tokens))
        token = int(next_token(z[None], sampling, self.rng)[0])
        if token == p.end_id and len(self.tokens) >= p.min_tokens:
            return self.retire("stop")  # the end token itself is not output (as TensorRT-LLM)
        if p.logprobs:
            self.logprobs.append(token_logprob(z, sampling, token))
        self.tokens.append(token)
        self.context.append(token)
        if self.text is None:
            self.on_delta(self, [token], None)
        else:
            self._send_text(token)
        if self.finish is None and len(self.tokens) == p.max_new_tokens:
            self.retire("length")

    def _probed(self, logits: np.ndarray) -> bool:
        """Record the logits; with forced tokens take the next one instead of sampling (or end when
        they have run out). True: nothing left to sample for this step."""
        probe = self.probe
        probe.logits.append(np.array(logits, np.float32))  # a copy: the engine reuses its buffers
        if probe.forced is None:
            return False
        if len(self.tokens) == len(probe.forced):
            self.retire("length")
            return True
        self.tokens.append(int(probe.forced[len(self.tokens)]))
        self.context.append(self.tokens[-1])
        if len(self.tokens) == self.params.max_new_tokens:
            self.retire("length")
        return True

    def _send_text(self, token: int) -> None:
        delta = self.text.feed([token])
        if delta is None:
            return  # held back: half a character
        self.on_delta(self, *delta)
        stop = self.text.stops(delta[1])  # every delta, so a word spanning deltas is found
        if stop and self.finish is None and len(self.tokens) >= self.params.min_tokens:
            self.retire("stop")

    def retire(self, finish: str, error: Exception | None = None) -> None:
        if self.finish is not None:
            return
        self.finish, self.error = finish, error
        if self.text is not None and self.text.pending and finish not in ("cancelled", "error"):
            self.on_delta(self, self.text.flush(), "")  # a character cut off by max_new_tokens: ids, no text
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


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


class Scheduler:
    """Runs sequences on one runner, every running one in the same forward (see the module docstring)."""

    def __init__(self, runner: Runner, max_batch: int = 16):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ParameterError("max_batch", f"must be an integer >= 1, got {max_batch}")
        limit = getattr(runner, "max_batch", None)
        if limit is not None and max_batch > limit:
            raise ParameterError("max_batch", f"is {max_batch}, more than {runner.name} takes ({limit})")
        self.runner, self.max_batch = runner, max_batch
        self.config = runner.config
        self.queue: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # decode rows 0..n-1 of the cache, packed
        self.cropping: list[Sequence] = []  # past block_size: a window recomputed every step
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
        if seq.params.max_new_tokens == 0:
            seq.retire("length")
            return seq
        with self.lock:
            self.queue.append(seq)
            self._wake.notify()
        return seq

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.rows or self.cropping)

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
                for seq in [*self.rows, *self.cropping]:
                    seq.retire("error", GptExportError(f"internal error: {type(e).__name__}: {e}"))
                self.rows, self.cropping = [], []
                self.close()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    # ---- one step ----

    def step(self) -> None:
        """Admit, crop, decode: every running sequence samples one token (admitted ones two)."""
        self._admit()
        if self.cropping:
            self._crop()
        if self.rows:
            self._decode()
        if not self.busy:
            self.close()  # an idle scheduler holds no cache: the next sequences size it afresh

    def _admit(self) -> None:
        """Queued sequences into the free rows, first come first served; prompts of one length are
        prefilled together (one forward, a row each), other lengths one forward per length."""
        with self.lock:
            free = self.max_batch - len(self.rows) - len(self.cropping)
            admitted = [self.queue.popleft() for _ in range(min(free, len(self.queue)))]
        block = self.config.block_size
        groups: dict[tuple[int, bool], list[Sequence]] = {}
        for seq in admitted:
            if len(seq.prompt_ids) > block:
                (seq.notice or to_stderr)(crop_notice(len(seq.prompt_ids), block))
            seq.context = seq.prompt_ids[-block:]
            all_positions = seq.probe is not None and seq.probe.all_positions
            groups.setdefault((len(seq.context), all_positions), []).append(seq)
        for (T, all_positions), seqs in groups.items():
            reach = max(min(block, T + s.params.max_new_tokens) for s in seqs)
            self._prefill(seqs, reach, all_positions)

    def _prefill(self, seqs: list[Sequence], reach: int, all_positions: bool = False) -> None:
        """Admitted sequences with prompts of one length into the next free rows, then their first tokens."""
        try:
            logits = self._cache(reach).prefill(len(self.rows), np.array([s.context for s in seqs]), all_positions)
        except GptExportError as e:  # these sequences fail (a broken backend); the others go on
            for seq in seqs:
                seq.retire("error", e)
            return
        if all_positions:
            for seq, rows in zip(seqs, logits):
                seq.probe.prefill_logits = np.array(rows, np.float32)
            logits = logits[:, -1]
        self._accept(seqs, logits)
        self.rows += seqs
        self.cropping += [s for s in seqs if s.finish is None and len(s.context) > self.config.block_size]
        self._pack()

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
        all): one forward over the free rows after the decode rows; the other rows are untouched."""
        block = self.config.block_size
        for seq in self.cropping:
            del seq.context[0]  # the window slides: every position shifts, so recompute it whole
        try:
            logits = self._cache(block).prefill(len(self.rows), np.array([s.context for s in self.cropping]))
        except GptExportError as e:
            for seq in self.cropping:
                seq.retire("error", e)
            self.cropping = []
            return
        self._accept(self.cropping, logits)
        self.cropping = [s for s in self.cropping if s.finish is None]

    def _decode(self) -> None:
        n = len(self.rows)
        try:
            self.cache.ensure_capacity(int(self.cache.lengths[:n].max()) + 1)  # room for this step's position
            logits = self.cache.decode(np.array([s.last for s in self.rows], np.int64))
        except GptExportError as e:  # the forward itself failed: every sequence in it fails
            for seq in self.rows:
                seq.retire("error", e)
            self._pack()
            return
        self.steps += 1
        self._accept(self.rows, logits)
        for seq in self.rows[:n]:
            if seq.finish is None and len(seq.context) > self.config.block_size:
                self.cropping.append(seq)  # leaves the decode rows: from now on it recomputes its window
        self._pack()

    def _pack(self) -> None:
        """Keep the decode rows packed at 0..n-1: the last row fills each row that leaves."""
        self.cropping = [s for s in self.cropping if s.finish is None]
        i = 0
        while i < len(self.rows):
            seq = self.rows[i]
            if seq.finish is None and len(seq.context) <= self.config.block_size:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                self.cache.move(last, i)
            self.rows[i] = self.rows[last]
            self.rows.pop()

    def _cache(self, positions: int):
        """The batch cache, with room for `positions` per row (made on first use, grown as needed)."""
        if self.cache is None:
            self.cache = self.runner.new_batch_cache(self.max_batch, positions)
        self.cache.ensure_capacity(positions)
        return self.cache
