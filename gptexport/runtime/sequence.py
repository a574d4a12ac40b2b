"""One sequence of the engine: its request, its own sampler state, and what it has produced.

The scheduler (scheduler.py) owns when a sequence runs and in which row; a Sequence owns what it
does with its logits: sample its next token with its own settings and generator, send its text,
find its stop words, retire itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .params import GenerationParams, prepare
from .sampling import check_finite, next_token, token_logprob
from .textstream import TextStream

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
    row: int = -1  # its row of the batch cache while its prompt fills (a decode row is its index in the rows)
    filled: int = 0  # positions of its context in the cache so far (its prompt fills in chunks)
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
