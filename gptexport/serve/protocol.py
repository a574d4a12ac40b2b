"""The tensors a served model takes and returns: TensorRT-LLM's names, so its clients work unchanged.

TensorRT-LLM's Triton models (`ensemble`, `tensorrt_llm_bls`) take `text_input` with optional
sampling inputs and return `text_output`; Triton's HTTP generate / generate_stream endpoints map
a JSON request's keys onto these inputs. A model directory without a tokenizer is served on
token ids alone (`input_ids` in, `output_ids` out); one with a tokenizer takes either.

Defaults are those of `gptexport generate`, so a request with only a prompt samples exactly what
the CLI samples with the same seed. Every value is checked here, and a bad one is a UsageError
whose message names the input and says what is valid; the model sends it back as an error
response and goes on serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError, TokenizerError, UsageError
from ..runtime.sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING, DEFAULT_SEED, SamplingParams
from ..runtime.session import GenerationParams


@dataclass(frozen=True)
class TensorSpec:
    name: str
    triton_type: str  # as config.pbtxt spells it
    dims: tuple[int, ...]  # without the batch dim (max_batch_size 1: every tensor has a leading 1)
    text_only: bool = False  # declared only for a model directory with a tokenizer


INPUTS = (
    TensorSpec("text_input", "TYPE_STRING", (1,), text_only=True),
    TensorSpec("input_ids", "TYPE_INT32", (-1,)),
    TensorSpec("max_tokens", "TYPE_INT32", (1,)),
    TensorSpec("temperature", "TYPE_FP32", (1,)),
    TensorSpec("top_k", "TYPE_INT32", (1,)),
    TensorSpec("top_p", "TYPE_FP32", (1,)),
    TensorSpec("seed", "TYPE_UINT64", (1,)),
    TensorSpec("stream", "TYPE_BOOL", (1,)),
    TensorSpec("stop_words", "TYPE_STRING", (-1,), text_only=True),
    TensorSpec("exclude_input_in_output", "TYPE_BOOL", (1,), text_only=True),
)
OUTPUTS = (
    TensorSpec("text_output", "TYPE_STRING", (-1,), text_only=True),
    TensorSpec("output_ids", "TYPE_INT32", (-1,)),
    TensorSpec("num_input_tokens", "TYPE_INT32", (1,)),
    TensorSpec("num_output_tokens", "TYPE_INT32", (1,)),
)
# the library's parameter -> the request input that sets it, where the names differ
INPUT_NAMES = {"max_new_tokens": "max_tokens"}


def tensors(specs: tuple[TensorSpec, ...], with_text: bool) -> tuple[TensorSpec, ...]:
    return tuple(s for s in specs if with_text or not s.text_only)


@dataclass(frozen=True)
class ServeRequest:
    prompt_ids: list[int]
    prompt_text: str | None  # text_input as given; a non-streamed text_output starts with it
    params: GenerationParams  # max_tokens, the sampling inputs, seed, stop_words
    stream: bool = False
    exclude_input: bool = False

    @property
    def max_tokens(self) -> int:
        return self.params.max_new_tokens


def parse_request(inputs: dict[str, np.ndarray], parameters: dict, tokenizer, vocab_size: int,
                  max_tokens_limit: int) -> ServeRequest:
    """One request's input tensors (and request parameters) -> a checked ServeRequest."""
    names = [s.name for s in tensors(INPUTS, tokenizer is not None)]
    if parameters:  # the generate endpoint passes JSON keys that are no input as parameters
        raise UsageError(f"unknown request parameter(s) {', '.join(map(repr, sorted(parameters)))}; "
                         f"valid inputs: {', '.join(names)}")
    text = _text(inputs, "text_input")
    ids = inputs.get("input_ids")
    if (text is None) == (ids is None):
        raise UsageError("give exactly one of text_input and input_ids" if tokenizer is not None
                         else "give input_ids: this model has no tokenizer")
    prompt_ids = _encode(text, tokenizer) if text is not None else _token_ids(ids, vocab_size)

    max_tokens = _scalar(inputs, "max_tokens", int, min(DEFAULT_MAX_NEW_TOKENS, max_tokens_limit))
    if not 1 <= max_tokens <= max_tokens_limit:
        raise UsageError(f"max_tokens must be in 1..{max_tokens_limit} (this model's limit), got {max_tokens}")
    d = DEFAULT_SAMPLING
    try:
        sampling = SamplingParams(_scalar(inputs, "temperature", float, d.temperature),
                                  _scalar(inputs, "top_k", int, d.top_k), _scalar(inputs, "top_p", float, d.top_p))
        params = GenerationParams(max_tokens, sampling, _scalar(inputs, "seed", int, DEFAULT_SEED),
                                  tuple(w for w in (_strings(inputs, "stop_words") or []) if w))
    except ParameterError as e:  # the library's wording, with the request's names
        raise UsageError(e.worded(INPUT_NAMES.get(e.param, e.param))) from None
    return ServeRequest(prompt_ids=prompt_ids, prompt_text=text, params=params,
                        stream=_scalar(inputs, "stream", bool, False),
                        exclude_input=_scalar(inputs, "exclude_input_in_output", bool, False))


def response_tensors(ids: list[int], text: str | None, num_input: int, num_output: int) -> dict[str, np.ndarray]:
    """One response's output tensors, each with the leading batch dim of 1."""
    out = {"output_ids": np.array([ids], dtype=np.int32).reshape(1, len(ids)),
           "num_input_tokens": np.array([[num_input]], dtype=np.int32),
           "num_output_tokens": np.array([[num_output]], dtype=np.int32)}
    if text is not None:
        out["text_output"] = np.array([[text.encode("utf-8")]], dtype=np.object_)
    return out


def _scalar(inputs: dict[str, np.ndarray], name: str, kind: type, default):
    a = inputs.get(name)
    if a is None:
        return default
    if a.size != 1:
        raise UsageError(f"{name} must be one value, got {a.size}")
    value = a.reshape(-1)[0]
    if kind is float:
        # JSON's 0.8 arrives as float32 0.800000011920929; its shortest decimal form gives back the
        # 0.8 that `gptexport generate --temperature 0.8` divides by, so both sample alike
        return float(str(np.float32(value)))
    return kind(value.item())


def _strings(inputs: dict[str, np.ndarray], name: str) -> list[str] | None:
    a = inputs.get(name)
    if a is None:
        return None
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in a.reshape(-1)]
    except UnicodeDecodeError as e:
        raise UsageError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _text(inputs: dict[str, np.ndarray], name: str) -> str | None:
    values = _strings(inputs, name)
    if values is None:
        return None
    if len(values) != 1:
        raise UsageError(f"{name} must be one string, got {len(values)}")
    return values[0]


def _encode(text: str, tokenizer) -> list[int]:
    if not text:
        raise UsageError("text_input is empty: give at least one character")
    try:
        return tokenizer.encode(text)
    except TokenizerError as e:
        raise UsageError(f"text_input: {e}") from None


def _token_ids(ids: np.ndarray, vocab_size: int) -> list[int]:
    from ..artifacts.tokenizer import check_token_ids

    values = [int(i) for i in ids.reshape(-1)]
    if not values:
        raise UsageError("input_ids is empty: give at least one token id")
    try:
        check_token_ids(values, vocab_size)
    except UsageError as e:
        raise UsageError(f"input_ids: {e}") from None
    return values
