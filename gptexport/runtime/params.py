"""What one sequence asks for besides its prompt, and what those settings do to its logits.

GenerationParams is the one set of settings of a request, whoever makes it: `gptexport generate`'s
flags, a `--prompts` JSON line, the Python API's keywords and a served request (TensorRT-LLM's
request inputs map onto it, serve/protocol.py) all name their settings as SETTINGS does and build
it with `params_from`, so each value is checked, and each error worded, in one place.
With only nanoGPT's settings (temperature, top_k, top_p) a sequence samples straight from the
model's logits, exactly as the generation loop does; the TensorRT-LLM extras are applied, when
asked for, in TensorRT-LLM's order (sampling.py): the embedding bias, temperature, then the
repetition, presence and frequency penalties over every token seen (prompt included), the end_id
mask while fewer than min_tokens were made, the bad words' ban, and only then top-k / top-p and
the draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Mapping

import numpy as np

from ..errors import ParameterError, TokenizerError
from .sampling import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SAMPLING,
    DEFAULT_SEED,
    SamplingParams,
    apply_penalties,
    banned_tokens,
    check_penalties,
)


def check_int(name: str, value, low: int, allow_none: bool = False) -> None:
    """A setting that must be an integer >= low (a bool is not one), else a ParameterError naming it."""
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
        check_int("max_new_tokens", self.max_new_tokens, 0)
        check_int("seed", self.seed, 0)
        check_int("min_tokens", self.min_tokens, 0)
        check_int("end_id", self.end_id, 0, allow_none=True)
        check_penalties(self.repetition_penalty, self.presence_penalty, self.frequency_penalty,
                        ("repetition_penalty", "presence_penalty", "frequency_penalty"))
        if any(not word for word in self.bad_words):
            raise ParameterError("bad_words", "has an empty word")
        if any(not math.isfinite(w) for _, w in self.embedding_bias):
            raise ParameterError("embedding_bias", "weights must be finite numbers")

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty, self.presence_penalty, self.frequency_penalty) != (1.0, 0.0, 0.0)

    @cached_property
    def plain(self) -> bool:
        """Only nanoGPT's settings: the logits are sampled as they come, as the generation loop does
        (worked out once: every token of the sequence asks)."""
        return not (self.penalized or self.bad_words or self.embedding_bias
                    or (self.end_id is not None and self.min_tokens))

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids of these settings must be the model's."""
        if self.end_id is not None and self.end_id >= vocab_size:
            raise ParameterError("end_id", f"must be a token id 0..{vocab_size - 1}, got {self.end_id}")
        for name, ids in (("bad_words", [t for word in self.bad_words for t in word]),
                          ("embedding_bias", [t for t, _ in self.embedding_bias])):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ParameterError(name, f"has token ids out of range: {bad[0]} (valid: 0..{vocab_size - 1})")


# The named settings of a request: `gptexport generate`'s flags (--top-k is top_k), a --prompts
# JSON line's keys, the Python API's keywords; a served request's inputs map onto them (protocol.py).
SAMPLING = ("temperature", "top_k", "top_p")
SETTINGS = ("max_new_tokens", *SAMPLING, "seed", "stop_words", "min_tokens", "end_id", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "bad_words", "embedding_bias", "logprobs")


def params_from(settings: Mapping[str, object], base: GenerationParams = GenerationParams(),
                tokenizer=None) -> GenerationParams:
    """`base` with the named `settings` (SETTINGS' names) set; a name or value that is not valid is a
    ParameterError naming it. A bad word given as text is encoded with `tokenizer`; as a list of
    token ids it is taken as it is."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ParameterError(unknown[0], f"is not a setting; valid: {', '.join(SETTINGS)}")
    fields = {k: v for k, v in settings.items() if k not in SAMPLING}
    if any(k in settings for k in SAMPLING):  # SamplingParams checks them (and makes top_k 0 None)
        fields["sampling"] = SamplingParams(*(settings.get(k, getattr(base.sampling, k)) for k in SAMPLING))
    if "stop_words" in fields:
        fields["stop_words"] = tuple(fields["stop_words"] or ())
    if "bad_words" in fields:
        fields["bad_words"] = tuple(_word_ids(tokenizer, w) for w in (fields["bad_words"] or ()) if w)
    if "embedding_bias" in fields:
        fields["embedding_bias"] = _bias(fields["embedding_bias"])
    return replace(base, **fields)


def _word_ids(tokenizer, word) -> tuple[int, ...]:
    if isinstance(word, str):
        return tuple(encode(tokenizer, word, "bad_words"))
    if isinstance(word, (list, tuple)) and all(type(t) is int for t in word):
        return tuple(word)
    raise ParameterError("bad_words", f"must be words (text) or lists of token ids, got {word!r}")


def _bias(pairs) -> tuple[tuple[int, float], ...]:
    """(token, weight) pairs; a weight must be a number (finite: GenerationParams checks)."""
    out = []
    for pair in pairs or ():
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and type(pair[0]) is int
                and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)):
            raise ParameterError("embedding_bias", f"must be (token id, weight) pairs, got {pair!r}")
        out.append((pair[0], float(pair[1])))
    return tuple(out)


def encode(tokenizer, text: str, param: str) -> list[int]:
    """Text -> token ids with a model's tokenizer; errors name `param`."""
    if tokenizer is None:
        raise ParameterError(param, "cannot be text: this model directory has no tokenizer (give token ids)")
    if not text:
        raise ParameterError(param, "is empty: give at least one character")
    try:
        return tokenizer.encode(text)
    except TokenizerError as e:
        raise ParameterError(param, f"cannot be encoded: {e}") from None


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
    z = np.array(logits, dtype=np.float64)  # a copy: the masks below write into it
    for token, weight in params.embedding_bias:  # before the temperature, as TensorRT-LLM adds it
        z[token] += weight
    seen = np.asarray(history, np.int64)
    if params.penalized:
        if not s.greedy:
            z, s = z / s.temperature, SamplingParams(1.0, s.top_k, s.top_p)
        z = apply_penalties(z, seen, params.repetition_penalty, params.presence_penalty, params.frequency_penalty)
    if params.end_id is not None and generated < params.min_tokens:
        z[params.end_id] = -np.inf
    if params.bad_words:
        z[banned_tokens(seen, params.bad_words)] = -np.inf
    return z, s
