"""The generation session: one model loaded for generating, and sequences generated on it.

`gptexport generate` (one prompt or a file of them), the Python API and the Triton model all
generate through here. A GenerationSession holds what every sequence of one model directory
shares: the activated runner, the tokenizer, and the scheduler (scheduler.py) that runs every
sequence in flight in one forward per step. Each sequence has
- its own numpy.random.Generator, seeded from `params.seed` (or handed on from the previous
  sample, as nanoGPT's sample.py draws all its samples from one seed), consumed exactly as the
  generation loop consumes it, so the same seed gives the same tokens whoever asks;
- its text streamed as deltas: the tokens sampled since the last delta and their text, never
  half a UTF-8 character (a byte-level BPE token can end mid-character);
- its stop: max_new_tokens, a stop word completed (the delta that completes it is sent), or
  `cancelled()` turning true (checked before each delta).
Never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts.modeldir import ModelDir, load_model_dir
from ..errors import ParameterError, TokenizerError
from .backends import open_runner
from .backends.base import Runner
from .sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING, DEFAULT_SEED, SamplingParams
from .params import GenerationParams
from .scheduler import OnDelta, Scheduler, Sequence
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
    model_dir: ModelDir | None = field(default=None, repr=False)
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.runner, self.tokenizer, self.max_batch)

    @classmethod
    def open(cls, model_dir: str | Path | ModelDir, backend: str = "onnxruntime", threads: int | None = None,
             max_batch: int = DEFAULT_MAX_BATCH, **runner_options) -> "GenerationSession":
        """Load a model directory (every hash checked), open its runner on `backend` and activate it.

        `runner_options` are open_runner's: tf32, cuda_graphs.
        """
        md = load_model_dir(model_dir)
        runner = open_runner(backend, md, threads, **runner_options)
        runner.activate()
        try:
            return cls(runner, md.tokenizer(), md, max_batch)
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
        if self.tokenizer is None:
            raise ParameterError(param, "cannot be text: this model directory has no tokenizer (give token ids)")
        if not text:
            raise ParameterError(param, "is empty: give at least one character")
        try:
            return self.tokenizer.encode(text)
        except TokenizerError as e:
            raise ParameterError(param, f"cannot be encoded: {e}") from None

    def encode_words(self, words: tuple[str, ...], param: str = "bad_words") -> tuple[tuple[int, ...], ...]:
        """Words (an empty one skipped) -> their token ids, for GenerationParams.bad_words."""
        return tuple(tuple(self.encode(w, param)) for w in words if w)

    def decode(self, tokens: list[int]) -> str | None:
        """Token ids -> text, or None for a model directory without a tokenizer."""
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else None

    def submit(self, prompt_ids: list[int], params: GenerationParams = GenerationParams(),
               on_delta: OnDelta | None = None, cancelled: Callable[[], bool] | None = None,
               notice: Callable[[str], None] | None = None, rng: np.random.Generator | None = None,
               on_done: Callable[[Sequence], None] | None = None) -> Sequence:
        """Queue one sequence; it runs when the scheduler steps (`generate`, a server's loop);
        `on_done(seq)` is called when it ends (on the thread that steps)."""
        return self.scheduler.submit(prompt_ids, params, on_delta, cancelled, rng, notice, on_done)

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


def generate_samples(model_dir: str | Path | ModelDir, prompt: str | None = None, *,
                     prompt_ids: list[int] | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     temperature: float = DEFAULT_SAMPLING.temperature, top_k: int | None = DEFAULT_SAMPLING.top_k,
                     top_p: float | None = DEFAULT_SAMPLING.top_p, seed: int = DEFAULT_SEED, num_samples: int = 1,
                     stop_words: tuple[str, ...] = (), min_tokens: int = 0, end_id: int | None = None,
                     repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     bad_words: tuple[str, ...] = (), logprobs: bool = False, backend: str = "onnxruntime",
                     threads: int | None = None, stream: Callable[[str], None] | None = None,
                     separator: str = "\n---------------\n", **runner_options) -> list[Sample]:
    """Draw `num_samples` samples one after another from one seeded generator, as nanoGPT's sample.py.

    The prompt is text (`prompt`, default a newline as in sample.py) or `prompt_ids`. `stream`
    receives the prompt's text, then every delta, and `separator` between samples (a newline
    after the last). The TensorRT-LLM settings (min_tokens ... logprobs) are GenerationParams';
    `bad_words` are text, encoded by the model's tokenizer. `runner_options` are open_runner's
    (tf32, cuda_graphs).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ParameterError("num_samples", f"must be an integer >= 1, got {num_samples}")
    if prompt is not None and prompt_ids is not None:
        raise ParameterError("prompt", "and prompt_ids: give only one")
    with GenerationSession.open(model_dir, backend, threads, **runner_options) as session:
        ids = list(prompt_ids) if prompt_ids is not None else session.encode("\n" if prompt is None else prompt)
        params = GenerationParams(max_new_tokens, SamplingParams(temperature, top_k, top_p), seed, tuple(stop_words),
                                  min_tokens, end_id, repetition_penalty, presence_penalty, frequency_penalty,
                                  session.encode_words(bad_words), logprobs=logprobs)
        rng = np.random.default_rng(params.seed)
        samples = []
        for i in range(num_samples):
            if stream is not None:
                TextStream(session.tokenizer, stream).write(ids)
            on_delta = None if stream is None else (lambda ids, text: stream(_shown(ids, text)))
            outcome = session.generate(ids, params, on_delta, rng=rng)
            if stream is not None:
                stream(separator if i < num_samples - 1 else "\n")
            samples.append(Sample(outcome.tokens, session.decode(outcome.tokens), outcome.finish,
                                  outcome.logprobs if logprobs else None))
    return samples


def _shown(ids: list[int], text: str | None) -> str:
    """A delta as `gptexport generate` prints it: its text, or its ids for a model without a tokenizer."""
    return text if text is not None else "".join(f"{i} " for i in ids)
