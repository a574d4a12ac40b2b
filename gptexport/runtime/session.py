"""The generation session: one model loaded for generating, and sequences generated on it.

`gptexport generate`, the Python API and the Triton model all generate through here.
A GenerationSession holds what every sequence of one model directory shares: the activated
runner and the tokenizer. `session.generate(prompt_ids, params, on_delta)` runs one sequence:
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
from ..errors import ParameterError, TokenizerError, UsageError
from .backends import open_runner
from .backends.base import Runner
from .loop import generate
from .sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING, DEFAULT_SEED, SamplingParams
from .textstream import TextStream

# on_delta(ids, text): the tokens of one delta and their text (None for a model without a tokenizer)
OnDelta = Callable[[list[int], "str | None"], None]


@dataclass(frozen=True)
class GenerationParams:
    """What one sequence asks for, besides its prompt; the defaults are `gptexport generate`'s."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingParams = DEFAULT_SAMPLING
    seed: int = DEFAULT_SEED
    stop_words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ParameterError("max_new_tokens", f"must be an integer >= 0, got {self.max_new_tokens}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ParameterError("seed", f"must be an integer >= 0, got {self.seed}")


@dataclass
class Outcome:
    tokens: list[int]  # every token sampled, in order (the prompt excluded)
    finish: str  # "length" (max_new_tokens reached), "stop" (a stop word completed) or "cancelled"


@dataclass
class Sample:
    """One sample of `generate_samples`: its tokens and their text (None without a tokenizer)."""

    tokens: list[int]
    text: str | None
    finish: str = "length"

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "text": self.text}


@dataclass
class GenerationSession:
    """A model directory's runner (activated) and tokenizer, shared by every sequence generated on it."""

    runner: Runner
    tokenizer: object = None
    model_dir: ModelDir | None = field(default=None, repr=False)

    @classmethod
    def open(cls, model_dir: str | Path | ModelDir, backend: str = "onnxruntime", threads: int | None = None,
             **runner_options) -> "GenerationSession":
        """Load a model directory (every hash checked), open its runner on `backend` and activate it.

        `runner_options` are open_runner's: tf32, cuda_graphs, binding.
        """
        md = load_model_dir(model_dir)
        runner = open_runner(backend, md, threads, **runner_options)
        runner.activate()
        return cls(runner, md.tokenizer(), md)

    def close(self) -> None:
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

    def generate(self, prompt_ids: list[int], params: GenerationParams = GenerationParams(),
                 on_delta: OnDelta | None = None, cancelled: Callable[[], bool] | None = None,
                 notice: Callable[[str], None] | None = None, rng: np.random.Generator | None = None) -> Outcome:
        """Generate one sequence after `prompt_ids`, calling `on_delta` for every delta as soon as it is complete."""
        from ..artifacts.tokenizer import check_token_ids

        if not prompt_ids:
            raise ParameterError("prompt_ids", "is empty: give at least one token")
        try:
            check_token_ids(list(prompt_ids), self.vocab_size)
        except UsageError as e:
            raise ParameterError("prompt_ids", f"has {e}") from None
        rng = np.random.default_rng(params.seed) if rng is None else rng
        sequence = _Sequence(self.tokenizer, params.stop_words, on_delta or (lambda ids, text: None),
                             cancelled or (lambda: False))
        if params.max_new_tokens:
            generate(self.runner, np.array([prompt_ids]), params.max_new_tokens, params.sampling, rng,
                     on_token=sequence.on_token, notice=notice)
        sequence.flush()
        return Outcome(sequence.tokens, sequence.finish)


class _Sequence:
    """One sequence's tokens and text as the loop samples them: deltas, stop words, cancellation."""

    def __init__(self, tokenizer, stop_words: tuple[str, ...], on_delta: OnDelta, cancelled: Callable[[], bool]):
        self.tokenizer, self.stop_words, self.on_delta, self.cancelled = tokenizer, stop_words, on_delta, cancelled
        self.tokens: list[int] = []
        self.pending: list[int] = []  # sampled, not yet sent: the start of an unfinished UTF-8 character
        self.text = ""
        self.finish = "length"
        self.stream = TextStream(tokenizer, self._on_text)

    def on_token(self, token: np.ndarray) -> bool:
        """The loop's callback for each sampled (1,) token; True ends the sequence."""
        if self.cancelled():
            self.finish = "cancelled"
            return True
        self.tokens.append(int(token[0]))
        self.pending.append(self.tokens[-1])
        self.stream.write([self.tokens[-1]])
        return self.finish == "stop"

    def _on_text(self, text: str) -> None:
        ids, self.pending = self.pending, []
        if self.tokenizer is None:
            self.on_delta(ids, None)
            return
        before = len(self.text)
        self.text += text
        self.on_delta(ids, text)
        # a stop word may span deltas: look only where it could end in this one
        if any(w in self.text[max(0, before - len(w) + 1):] for w in self.stop_words):
            self.finish = "stop"

    def flush(self) -> None:
        if self.pending and self.finish != "cancelled":
            ids, self.pending = self.pending, []
            self.on_delta(ids, "")  # the bytes of a character cut off by max_new_tokens: ids, no text


def generate_samples(model_dir: str | Path | ModelDir, prompt: str | None = None, *,
                     prompt_ids: list[int] | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     temperature: float = DEFAULT_SAMPLING.temperature, top_k: int | None = DEFAULT_SAMPLING.top_k,
                     top_p: float | None = DEFAULT_SAMPLING.top_p, seed: int = DEFAULT_SEED, num_samples: int = 1,
                     stop_words: tuple[str, ...] = (), backend: str = "onnxruntime", threads: int | None = None,
                     stream: Callable[[str], None] | None = None, separator: str = "\n---------------\n",
                     **runner_options) -> list[Sample]:
    """Draw `num_samples` samples one after another from one seeded generator, as nanoGPT's sample.py.

    The prompt is text (`prompt`, default a newline as in sample.py) or `prompt_ids`. `stream`
    receives the prompt's text, then every delta, and `separator` between samples (a newline
    after the last). `runner_options` are open_runner's (tf32, cuda_graphs, binding).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ParameterError("num_samples", f"must be an integer >= 1, got {num_samples}")
    if prompt is not None and prompt_ids is not None:
        raise ParameterError("prompt", "and prompt_ids: give only one")
    params = GenerationParams(max_new_tokens, SamplingParams(temperature, top_k, top_p), seed, tuple(stop_words))
    with GenerationSession.open(model_dir, backend, threads, **runner_options) as session:
        ids = list(prompt_ids) if prompt_ids is not None else session.encode("\n" if prompt is None else prompt)
        rng = np.random.default_rng(params.seed)
        samples = []
        for i in range(num_samples):
            if stream is not None:
                TextStream(session.tokenizer, stream).write(ids)
            on_delta = None if stream is None else (lambda ids, text: stream(_shown(ids, text)))
            outcome = session.generate(ids, params, on_delta, rng=rng)
            if stream is not None:
                stream(separator if i < num_samples - 1 else "\n")
            text = session.tokenizer.decode(outcome.tokens) if session.tokenizer is not None else None
            samples.append(Sample(outcome.tokens, text, outcome.finish))
    return samples


def _shown(ids: list[int], text: str | None) -> str:
    """A delta as `gptexport generate` prints it: its text, or its ids for a model without a tokenizer."""
    return text if text is not None else "".join(f"{i} " for i in ids)
