"""What one sequence asks for besides its prompt, and what those settings do to its logits.

GenerationParams is shared by `gptexport generate`, the Python API and the server (TensorRT-LLM's
request inputs map onto it, serve/protocol.py). With only nanoGPT's settings (temperature, top_k,
top_p) a sequence samples straight from the model's logits, exactly as the generation loop does;
the TensorRT-LLM extras are applied, when asked for, in TensorRT-LLM's order (sampling.py):
the embedding bias, temperature, then the repetition, presence and frequency penalties over every token seen (prompt
included), the end_id mask while fewer than min_tokens were made, the bad words' ban, and only
then top-k / top-p and the draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError
from .sampling import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING, DEFAULT_SEED, SamplingParams, apply_penalties,
                       banned_tokens)


def _int(name: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ParameterError(name, f"must be an integer >= {low}, got {value}")


@dataclass(frozen=True)
class GenerationParams:
    """One sequence's settings; the defaults are `gptexport generate`'s (and change nothing)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingParams = DEFAULT_SAMPLING
    seed: int = DEFAULT_SEED
    stop_words: tuple[str, ...] = ()
    min_tokens: int = 0  # no stop (end_id, a stop word) before this many tokens
    end_id: int | None = None  # generation ends when this token is sampled (it is not output)
    repetition_penalty: float = 1.0  # > 0; 1: none
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    bad_words: tuple[tuple[int, ...], ...] = ()  # token ids of words never to complete
    embedding_bias: tuple[tuple[int, float], ...] = ()  # (token, weight): added to the token's logit
    logprobs: bool = False  # record each token's log-probability under the distribution it came from

    def __post_init__(self) -> None:
        _int("max_new_tokens", self.max_new_tokens, 0)
        _int("seed", self.seed, 0)
        _int("min_tokens", self.min_tokens, 0)
        _int("end_id", self.end_id, 0, allow_none=True)
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ParameterError(name, f"must be a finite number, got {value}")
        if self.repetition_penalty <= 0:
            raise ParameterError("repetition_penalty", f"must be > 0 (1: no penalty), got {self.repetition_penalty}")
        if any(not word for word in self.bad_words):
            raise ParameterError("bad_words", "has an empty word")
        if any(not math.isfinite(w) for _, w in self.embedding_bias):
            raise ParameterError("embedding_bias", "weights must be finite numbers")

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty, self.presence_penalty, self.frequency_penalty) != (1.0, 0.0, 0.0)

    @property
    def plain(self) -> bool:
        """Only nanoGPT's settings: the logits are sampled as they come, as the generation loop does."""
        return not (self.penalized or self.bad_words or self.embedding_bias
                    or (self.end_id is not None and self.min_tokens))

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids of these settings must be the model's."""
        if self.end_id is not None and self.end_id >= vocab_size:
            raise ParameterError("end_id", f"must be a token id 0..{vocab_size - 1}, got {self.end_id}")
        bad = [t for word in self.bad_words for t in word if not 0 <= t < vocab_size]
        bad += [t for t, _ in self.embedding_bias if not 0 <= t < vocab_size]
        if bad:
            raise ParameterError("bad_words", f"has token ids out of range: {bad[0]} (valid: 0..{vocab_size - 1})")

def prepare(logits: np.ndarray, params: GenerationParams, history: list[int], generated: int
            ) -> tuple[np.ndarray, SamplingParams]:
    """The (V,) logits a sequence samples from this step, and the settings to sample them with.

    `history`: every token of the sequence so far, prompt included; `generated`: how many of them
    it made. Plain settings return the logits untouched. Penalties act on temperature-scaled
    logits (TensorRT-LLM's order), which are then sampled at temperature 1; greedy is penalized
    on the raw logits (TensorRT-LLM's 1e6 scaling at temperature 0 would make penalties vanish).
    """
    if params.plain:
        return logits, params.sampling
    s = params.sampling
    z = np.array(logits, dtype=np.float64)
    for token, weight in params.embedding_bias:  # before the temperature, as TensorRT-LLM adds it
        z[token] += weight
    if params.penalized:
        if not s.greedy:
            z, s = z / s.temperature, SamplingParams(1.0, s.top_k, s.top_p)
        z = apply_penalties(z, np.asarray(history, np.int64), params.repetition_penalty, params.presence_penalty,
                            params.frequency_penalty)
    if params.end_id is not None and generated < params.min_tokens:
        z[params.end_id] = -np.inf
    if params.bad_words:
        z[banned_tokens(np.asarray(history, np.int64), [list(w) for w in params.bad_words])] = -np.inf
    return z, s
