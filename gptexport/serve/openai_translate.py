"""OpenAI's request fields -> the model's input tensors, and the model's streamed tokens -> choices.

The model is always asked to stream (one response per token of each sequence, `sequence_index`
for n > 1): a non-streamed OpenAI request is the same stream collected, so both give the same
text. Stop strings are passed to the model (it stops generating at one) and are also found here,
where the text is cut before the stop string, as OpenAI returns it; while streaming, text that
could be the start of a stop string is held back until the next tokens decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .openai_schema import SamplingFields, bad
from .triton_link import Delta

# OpenAI's field -> the model's input (serve/protocol.py), where both take the value as it is
SCALARS = {"temperature": ("temperature", np.float32), "top_p": ("top_p", np.float32),
           "top_k": ("top_k", np.int32), "seed": ("seed", np.uint64), "min_tokens": ("min_tokens", np.int32),
           "presence_penalty": ("presence_penalty", np.float32),
           "frequency_penalty": ("frequency_penalty", np.float32),
           "repetition_penalty": ("repetition_penalty", np.float32)}


def scalar(value, dtype, name: str = "") -> np.ndarray:
    try:
        return np.array([[value]], dtype=dtype)
    except OverflowError:  # a JSON integer beyond the input's type
        raise bad(f"{name} is out of range, got {value}", name) from None


def model_inputs(req: SamplingFields, prompt: str | list[int], max_tokens: int, logprobs: bool,
                 tokenizer) -> dict[str, np.ndarray]:
    """The input tensors of one request (each with the leading batch dim of 1)."""
    if isinstance(prompt, str):
        arrays = {"text_input": np.array([[prompt.encode("utf-8")]], dtype=np.object_)}
    else:
        arrays = {"input_ids": np.array([prompt], dtype=np.int32)}
    arrays |= {"max_tokens": scalar(max_tokens, np.int32, "max_tokens"), "stream": scalar(True, np.bool_),
               "num_return_sequences": scalar(req.n, np.int32), "return_log_probs": scalar(logprobs, np.bool_)}
    for name, (input_name, dtype) in SCALARS.items():
        value = getattr(req, name)
        if value is not None:
            if dtype in (np.uint64, np.int32) and value < 0:  # would wrap around in the tensor
                raise bad(f"{name} must be >= 0, got {value}", name)
            arrays[input_name] = scalar(value, dtype, name)
    if req.stops():
        arrays["stop_words"] = np.array([[w.encode("utf-8") for w in req.stops()]], dtype=np.object_)
    if req.logit_bias:
        words, weights = bias_words(req.logit_bias, tokenizer)
        arrays["embedding_bias_words"] = np.array([words], dtype=np.object_)
        arrays["embedding_bias_weights"] = np.array([weights], dtype=np.float32)
    return arrays


def bias_words(logit_bias: dict[str, float], tokenizer) -> tuple[list[bytes], list[float]]:
    """logit_bias's token ids as the words the model's embedding_bias_words takes: each token's own
    text, which must encode back to that one token."""
    words, weights = [], []
    for key, weight in logit_bias.items():
        try:
            token = int(key)
            text = tokenizer.decode([token])
            ok = tokenizer.encode(text) == [token]
        except Exception:  # a bad id, or text outside the vocabulary: both mean "not a usable token"
            ok = False
        if not ok:
            raise bad(f"logit_bias: {key!r} is not a token id whose text encodes back to it", "logit_bias")
        if not -100 <= weight <= 100:
            raise bad(f"logit_bias: the bias of token {key} must be in -100..100, got {weight}", "logit_bias")
        words.append(text.encode("utf-8"))
        weights.append(float(weight))
    return words, weights


def param_of(message: str) -> str | None:
    """The field a model error names: its first word when that is one of ours."""
    word = message.split(" ", 1)[0].rstrip(":")
    known = {"max_tokens", "n", "stop", "stop_words", "text_input", "input_ids", "logit_bias", *SCALARS}
    return {"text_input": "prompt", "input_ids": "prompt", "stop_words": "stop"}.get(word, word) \
        if word in known else None


@dataclass
class Choice:
    """One choice as it streams: every token, its text so far, where a stop string starts."""

    index: int
    stops: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` handed out
    stop_at: int | None = None

    def add(self, delta: Delta) -> str:
        """Take a delta; the text that is safe to send now."""
        self.ids += delta.ids
        self.logprobs += delta.logprobs or []
        if self.stop_at is not None:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += delta.text
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.stop_at = min(found)
        return self._release(self.stop_at if self.stop_at is not None else len(self.text) - self._held())

    def _held(self) -> int:
        """How many trailing characters could begin a stop string."""
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:k])), default=0)

    def _release(self, end: int) -> str:
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def finish(self, max_tokens: int) -> tuple[str, str]:
        """The text still held back, and the finish_reason."""
        rest = self._release(self.stop_at if self.stop_at is not None else len(self.text))
        stopped = self.stop_at is not None or len(self.ids) < max_tokens
        return rest, "stop" if stopped else "length"

    @property
    def final_text(self) -> str:
        return self.text[:self.stop_at] if self.stop_at is not None else self.text


def legacy_logprobs(ids: list[int], logprobs: list[float], tokenizer, offset: int, top: bool) -> dict:
    """Completions' log-probs: per token its text, its log-prob, its offset in the text; with
    `top` (logprobs 1) the sampled token as the one alternative listed."""
    tokens = [tokenizer.decode([t]) for t in ids]
    offsets = np.cumsum([offset] + [len(t) for t in tokens[:-1]]).tolist() if tokens else []
    return {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs)] if top else None}


def chat_logprobs(ids: list[int], logprobs: list[float], tokenizer) -> dict:
    """Chat's log-probs: per token its text, bytes and log-prob (no alternatives)."""
    tokens = [tokenizer.decode([t]) for t in ids]
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs)]}


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}
