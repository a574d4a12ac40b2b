"""The generation session: one model loaded for generating, and sequences generated on it.

`gptexport generate` (one prompt or a file of them), the Python API and the Triton model all
generate through here. A GenerationSession holds what every sequence of one model directory
shares: the activated runner, the tokenizer, and the scheduler (scheduler.py) that runs every
sequence in flight in one forward per step. Each sequence has
- its own numpy.random.Generator, seeded from `params.seed` (or handed on from the previous
  sample, as nanoGPT's sample.py draws all its samples from one seed), consumed exactly as the
  generation loop consumes it, so the same seed gives the same tokens whoever asks;
- its text streamed as deltas by a TextStream the session attaches (textstream.py): the tokens
  sampled since the last delta and their text, never half a UTF-8 character (a byte-level BPE
  token can end mid-character), handed to `on_delta(seq, ids, text)`;
- its stop: max_new_tokens, a stop word completed (the delta that completes it is sent), or
  `cancelled()` turning true (checked before each delta).
Never imports torch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from ..artifacts.modeldir import ModelDir, load_model_dir
from ..errors import ParameterError
from .backends import open_runner
from .backends.base import Runner
from .params import GenerationParams, encode, params_from
from .scheduler import PREFILL_CHUNK, OnDelta, Scheduler, Sequence
from .textstream import TextStream

DEFAULT_MAX_BATCH = 16  # sequences in flight at once (see docs/serving.md for how it was chosen)


@dataclass
class Outcome:
    tokens: list[int]  # every token sampled, in order (the prompt excluded)
    finish: str  # "length" (max_new_tokens reached), "stop" (a stop word or end_id) or "cancelled"
    logprobs: list[float] = field(default_factory=list)  # with GenerationParams.logprobs


@dataclass
class Sample:
    """One sample of `generate_samples`: its tokens and their text (None without a tokenizer)."""

    tokens: list[int]
    text: str | None
    finish: str = "length"
    logprobs: list[float] | None = None  # each token's, with logprobs=True

    def to_dict(self) -> dict:
        d = {"tokens": self.tokens, "text": self.text}
        return d if self.logprobs is None else {**d, "logprobs": self.logprobs}


@dataclass
class GenerationSession:
    """A model directory's runner (activated), tokenizer and scheduler, shared by every sequence."""

    runner: Runner
    tokenizer: object = None
    max_batch: int = DEFAULT_MAX_BATCH
    prefill_chunk: int | None = PREFILL_CHUNK  # prompt tokens prefilled per step (Scheduler)
    max_cache_mb: float | None = None  # the KV cache the running sequences may hold (Scheduler)

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.runner, self.max_batch, self.prefill_chunk, self.max_cache_mb)

    @classmethod
    def open(cls, model_dir: str | Path | ModelDir, backend: str = "onnxruntime", threads: int | None = None,
             max_batch: int = DEFAULT_MAX_BATCH, prefill_chunk: int | None = PREFILL_CHUNK,
             max_cache_mb: float | None = None, **runner_options) -> "GenerationSession":
        """Load a model directory (every hash checked; a ModelDir is taken as loaded), open its runner
        on `backend` and activate it. `runner_options` are open_runner's: tf32, cuda_graphs.
        """
        md = load_model_dir(model_dir)
        runner = open_runner(backend, md, threads, **runner_options)
        runner.activate()
        try:
            return cls(runner, md.tokenizer(), max_batch, prefill_chunk, max_cache_mb)
        except BaseException:
            runner.deactivate()
            raise

    def close(self) -> None:
        self.scheduler.close()
        self.runner.deactivate()

    def __enter__(self) -> "GenerationSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def vocab_size(self) -> int:
        return self.runner.config.vocab_size

    def encode(self, text: str, param: str = "prompt") -> list[int]:
        """Text -> token ids with this model's tokenizer; errors name `param`."""
        return encode(self.tokenizer, text, param)

    def params(self, settings: Mapping[str, object], base: GenerationParams = GenerationParams()) -> GenerationParams:
        """`base` with named settings (params.SETTINGS) set; bad words given as text are encoded here."""
        return params_from(settings, base, self.tokenizer)

    def decode(self, tokens: list[int]) -> str | None:
        """Token ids -> text, or None for a model directory without a tokenizer."""
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else None

    def submit(self, prompt_ids: list[int], params: GenerationParams = GenerationParams(),
               on_delta: OnDelta | None = None, cancelled: Callable[[], bool] | None = None,
               notice: Callable[[str], None] | None = None, rng: np.random.Generator | None = None,
               on_done: Callable[[Sequence], None] | None = None) -> Sequence:
        """Queue one sequence (Sequence's arguments, in its order); it runs when the scheduler steps
        (`generate`, a server's loop). Its text is streamed and its stop words found by a
        TextStream of this model's tokenizer."""
        text = None if self.tokenizer is None else TextStream(self.tokenizer, params.stop_words)
        seq = Sequence(list(prompt_ids), params, on_delta, cancelled, notice, rng, on_done, text)
        return self.scheduler.submit(seq)

    def generate(self, prompt_ids: list[int], params: GenerationParams = GenerationParams(),
                 on_delta: OnDelta | None = None, cancelled: Callable[[], bool] | None = None,
                 notice: Callable[[str], None] | None = None, rng: np.random.Generator | None = None) -> Outcome:
        """Generate one sequence after `prompt_ids`, calling `on_delta` for every delta as soon as it is
        complete (sequences queued on this session before it step along with it)."""
        seq = self.submit(prompt_ids, params, on_delta, cancelled, notice, rng)
        self.scheduler.run(until=seq)
        return outcome_of(seq)


def outcome_of(seq: Sequence) -> Outcome:
    """A finished sequence's Outcome, or its error raised (NaN logits, say)."""
    if seq.finish == "error":
        raise seq.error
    return Outcome(seq.tokens, seq.finish, seq.logprobs)


@contextmanager
def opened(model: str | Path | ModelDir | GenerationSession, backend: str = "onnxruntime",
           threads: int | None = None, max_batch: int = DEFAULT_MAX_BATCH) -> Iterator[GenerationSession]:
    """`model` if it is an open session (left open), else a session opened on it (closed after)."""
    if isinstance(model, GenerationSession):
        yield model
        return
    with GenerationSession.open(model, backend, threads, max_batch) as session:
        yield session


def generate_samples(model: str | Path | ModelDir | GenerationSession, prompt: str | None = None, *,
                     prompt_ids: list[int] | None = None, params: GenerationParams = GenerationParams(),
                     num_samples: int = 1, stream: Callable[[str], None] | None = None,
                     separator: str = "\n---------------\n", backend: str = "onnxruntime",
                     threads: int | None = None, **settings) -> list[Sample]:
    """Draw `num_samples` samples one after another from one seeded generator, as nanoGPT's sample.py.

    `model`: a model directory, or a GenerationSession already open (for runner options such as
    tf32: GenerationSession.open's). The prompt is text (`prompt`, default a newline as in
    sample.py) or `prompt_ids`. The settings are `params` with any named setting given as a keyword
    on top (max_new_tokens=100, temperature=0.9, bad_words=("the",) as text: params.SETTINGS).
    `stream` receives the prompt's text, then every delta, and `separator` between samples (a
    newline after the last).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ParameterError("num_samples", f"must be an integer >= 1, got {num_samples}")
    if prompt is not None and prompt_ids is not None:
        raise ParameterError("prompt", "and prompt_ids: give only one")
    with opened(model, backend, threads) as session:
        ids = list(prompt_ids) if prompt_ids is not None else session.encode("\n" if prompt is None else prompt)
        params = session.params(settings, params)
        rng = np.random.default_rng(params.seed)
        show = None if stream is None else (lambda seq, ids, text: stream(_shown(ids, text)))
        samples = []
        for i in range(num_samples):
            seq = session.submit(ids, params, show, rng=rng)  # checked before anything is printed
            if stream is not None:
                _show_prompt(ids, session.tokenizer, stream)
            session.scheduler.run(until=seq)
            outcome = outcome_of(seq)
            if stream is not None:
                stream(separator if i < num_samples - 1 else "\n")
            samples.append(Sample(outcome.tokens, session.decode(outcome.tokens), outcome.finish,
                                  outcome.logprobs if params.logprobs else None))
    return samples


def _show_prompt(ids: list[int], tokenizer, stream: Callable[[str], None]) -> None:
    """The prompt as `gptexport generate` prints it before the sample (not a trailing half character)."""
    if tokenizer is None:
        stream(_shown(ids, None))
        return
    delta = TextStream(tokenizer).feed(list(ids))
    if delta is not None:
        stream(delta[1])


def _shown(ids: list[int], text: str | None) -> str:
    """A delta as `gptexport generate` prints it: its text, or its ids for a model without a tokenizer."""
    return text if text is not None else "".join(f"{i} " for i in ids)
