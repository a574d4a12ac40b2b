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

from dataclasses import dataclass, replace

import numpy as np

from ..errors import ParameterError, TokenizerError, UsageError
from ..runtime.params import GenerationParams, params_from
from ..runtime.sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED


@dataclass(frozen=True)
class TensorSpec:
    name: str
    triton_type: str  # as config.pbtxt spells it
    dims: tuple[int, ...]  # without the batch dim (max_batch_size 1: every tensor has a leading 1)
    text_only: bool = False  # declared only for a model directory with a tokenizer


INPUTS = (  # every input of TensorRT-LLM's ensemble / tensorrt_llm_bls models, with their types
    TensorSpec("text_input", "TYPE_STRING", (1,), text_only=True),
    TensorSpec("input_ids", "TYPE_INT32", (-1,)),
    TensorSpec("max_tokens", "TYPE_INT32", (1,)),
    TensorSpec("temperature", "TYPE_FP32", (1,)),
    TensorSpec("top_k", "TYPE_INT32", (1,)),
    TensorSpec("top_p", "TYPE_FP32", (1,)),
    TensorSpec("seed", "TYPE_UINT64", (1,)),
    TensorSpec("random_seed", "TYPE_UINT64", (1,)),
    TensorSpec("stream", "TYPE_BOOL", (1,)),
    TensorSpec("stop_words", "TYPE_STRING", (-1,), text_only=True),
    TensorSpec("bad_words", "TYPE_STRING", (-1,), text_only=True),
    TensorSpec("exclude_input_in_output", "TYPE_BOOL", (1,), text_only=True),
    TensorSpec("end_id", "TYPE_INT32", (1,)),
    TensorSpec("pad_id", "TYPE_INT32", (1,)),
    TensorSpec("min_length", "TYPE_INT32", (1,)),
    TensorSpec("min_tokens", "TYPE_INT32", (1,)),
    TensorSpec("repetition_penalty", "TYPE_FP32", (1,)),
    TensorSpec("presence_penalty", "TYPE_FP32", (1,)),
    TensorSpec("frequency_penalty", "TYPE_FP32", (1,)),
    TensorSpec("embedding_bias_words", "TYPE_STRING", (-1,), text_only=True),
    TensorSpec("embedding_bias_weights", "TYPE_FP32", (-1,), text_only=True),
    TensorSpec("beam_width", "TYPE_INT32", (1,)),
    TensorSpec("length_penalty", "TYPE_FP32", (1,)),
    TensorSpec("num_return_sequences", "TYPE_INT32", (1,)),
    TensorSpec("return_log_probs", "TYPE_BOOL", (1,)),
    TensorSpec("return_num_input_tokens", "TYPE_BOOL", (1,)),
    TensorSpec("return_num_output_tokens", "TYPE_BOOL", (1,)),
    # inputs of features gptexport does not have: declared so that a client sending them gets an
    # error naming the feature (REFUSED), not Triton's "unexpected inference input"
    TensorSpec("return_context_logits", "TYPE_BOOL", (1,)),
    TensorSpec("return_generation_logits", "TYPE_BOOL", (1,)),
    TensorSpec("return_perf_metrics", "TYPE_BOOL", (1,)),
    TensorSpec("decoder_text_input", "TYPE_STRING", (1,), text_only=True),
    TensorSpec("prompt_embedding_table", "TYPE_FP16", (-1, -1)),
    TensorSpec("prompt_table_extra_id", "TYPE_UINT64", (1,)),
    TensorSpec("prompt_vocab_size", "TYPE_INT32", (1,)),
    TensorSpec("prompt_ignore_length", "TYPE_INT32", (1,)),
    TensorSpec("lora_task_id", "TYPE_UINT64", (1,)),
    TensorSpec("lora_weights", "TYPE_FP16", (-1, -1)),
    TensorSpec("lora_config", "TYPE_INT32", (-1, 3)),
    TensorSpec("guided_decoding_guide_type", "TYPE_STRING", (1,)),
    TensorSpec("guided_decoding_guide", "TYPE_STRING", (1,)),
    TensorSpec("num_draft_tokens", "TYPE_INT32", (1,)),
    TensorSpec("use_draft_logits", "TYPE_BOOL", (1,)),
    TensorSpec("image_input", "TYPE_FP16", (-1, 3, -1, -1)),
    TensorSpec("image_bytes_input", "TYPE_UINT8", (-1, -1, -1, -1)),
    TensorSpec("image_url_input", "TYPE_STRING", (1,)),
    TensorSpec("video_bytes_input", "TYPE_UINT8", (-1, -1, -1, -1)),
)
# input -> why it is refused (inputs whose default value changes nothing pass with that value)
REFUSED = {
    "return_context_logits": "returning the prompt's logits is not supported",
    "return_generation_logits": "returning the generation logits is not supported",
    "return_perf_metrics": "TensorRT-LLM's KV-cache and timing metrics do not exist here",
    "decoder_text_input": "a GPT is decoder-only (no encoder-decoder input)",
    "prompt_embedding_table": "prompt tables (p-tuning) are not supported",
    "prompt_table_extra_id": "prompt tables (p-tuning) are not supported",
    "prompt_vocab_size": "prompt tables (p-tuning) are not supported",
    "prompt_ignore_length": "the penalties count the whole sequence, prompt included",
    "lora_task_id": "LoRA adapters are not supported",
    "lora_weights": "LoRA adapters are not supported",
    "lora_config": "LoRA adapters are not supported",
    "guided_decoding_guide_type": "guided decoding (JSON schema, regex, grammar) is not supported",
    "guided_decoding_guide": "guided decoding (JSON schema, regex, grammar) is not supported",
    "num_draft_tokens": "speculative decoding (draft tokens) is not supported",
    "use_draft_logits": "speculative decoding (draft tokens) is not supported",
    "image_input": "the model takes text only",
    "image_bytes_input": "the model takes text only",
    "image_url_input": "the model takes text only",
    "video_bytes_input": "the model takes text only",
}
MAX_RETURN_SEQUENCES = 16
OUTPUTS = (
    TensorSpec("text_output", "TYPE_STRING", (-1,), text_only=True),
    TensorSpec("output_ids", "TYPE_INT32", (-1,)),
    TensorSpec("num_input_tokens", "TYPE_INT32", (1,)),
    TensorSpec("num_output_tokens", "TYPE_INT32", (1,)),
    TensorSpec("cum_log_probs", "TYPE_FP32", (-1,)),
    TensorSpec("output_log_probs", "TYPE_FP32", (-1, -1)),
    TensorSpec("sequence_index", "TYPE_INT32", (1,)),
)
# the library's parameter -> the request input that sets it, where the names differ
INPUT_NAMES = {"max_new_tokens": "max_tokens", "embedding_bias": "embedding_bias_words", "logprobs": "return_log_probs"}


def tensors(specs: tuple[TensorSpec, ...], with_text: bool) -> tuple[TensorSpec, ...]:
    return tuple(s for s in specs if with_text or not s.text_only)


@dataclass(frozen=True)
class ServeRequest:
    prompt_ids: list[int]
    prompt_text: str | None  # text_input as given; a non-streamed text_output starts with it
    params: GenerationParams  # max_tokens, the sampling inputs, seed, stop words, penalties, ...
    stream: bool = False
    exclude_input: bool = False
    num_return_sequences: int = 1  # sequence i is seeded with seed + i

    @property
    def max_tokens(self) -> int:
        return self.params.max_new_tokens

    def sequence_params(self) -> list[GenerationParams]:
        return [replace(self.params, seed=self.params.seed + i) for i in range(self.num_return_sequences)]


def parse_request(inputs: dict[str, np.ndarray], parameters: dict, tokenizer, vocab_size: int,
                  max_tokens_limit: int) -> ServeRequest:
    """One request's input tensors (and request parameters) -> a checked ServeRequest."""
    names = [s.name for s in tensors(INPUTS, tokenizer is not None)]
    if parameters:  # the generate endpoint passes JSON keys that are no input as parameters
        raise UsageError(f"unknown request parameter(s) {', '.join(map(repr, sorted(parameters)))}; "
                         f"valid inputs: {', '.join(names)}")
    _refuse_unsupported(inputs)
    text = _text(inputs, "text_input")
    ids = inputs.get("input_ids")
    if (text is None) == (ids is None):
        raise UsageError("give exactly one of text_input and input_ids" if tokenizer is not None
                         else "give input_ids: this model has no tokenizer")
    prompt_ids = _encode(text, tokenizer) if text is not None else _token_ids(ids, vocab_size)

    max_tokens = _scalar(inputs, "max_tokens", int, min(DEFAULT_MAX_NEW_TOKENS, max_tokens_limit))
    if not 1 <= max_tokens <= max_tokens_limit:
        raise UsageError(f"max_tokens must be in 1..{max_tokens_limit} (this model's limit), got {max_tokens}")
    beam_width = _scalar(inputs, "beam_width", int, 1)
    if beam_width != 1:
        raise UsageError(f"beam_width {beam_width} is not supported: gptexport has no beam search "
                         f"(1: greedy or sampling, as temperature says)")
    n = _scalar(inputs, "num_return_sequences", int, 1)
    if not 1 <= n <= MAX_RETURN_SEQUENCES:
        raise UsageError(f"num_return_sequences must be in 1..{MAX_RETURN_SEQUENCES}, got {n}")
    _scalar(inputs, "length_penalty", float, 0.0)  # beam search only: no effect at beam_width 1, as in TensorRT-LLM
    # pad_id only pads outputs, which are never padded here: unchecked, as TensorRT-LLM leaves it (a client
    # built for GPT-2 sends 50256 to every model)
    _scalar(inputs, "pad_id", int, 0)
    try:
        params = params_from(_settings(inputs, tokenizer, max_tokens, vocab_size))
        params.check_vocab(vocab_size)
    except ParameterError as e:  # the library's wording, with the request's names
        raise UsageError(e.worded(INPUT_NAMES.get(e.param, e.param))) from None
    return ServeRequest(prompt_ids=prompt_ids, prompt_text=text, params=params,
                        stream=_scalar(inputs, "stream", bool, False),
                        exclude_input=_scalar(inputs, "exclude_input_in_output", bool, False), num_return_sequences=n)


def _settings(inputs: dict[str, np.ndarray], tokenizer, max_tokens: int, vocab_size: int) -> dict[str, object]:
    """The request's inputs as the named settings of GenerationParams (params.SETTINGS); an input
    not given is left out, so it keeps `gptexport generate`'s default."""
    settings: dict[str, object] = {"max_new_tokens": max_tokens}
    for name, kind in (("temperature", float), ("top_k", int), ("top_p", float)):
        if name in inputs:
            settings[name] = _scalar(inputs, name, kind, None)
    settings.update(seed=_seed(inputs), stop_words=tuple(w for w in (_strings(inputs, "stop_words") or []) if w),
                    min_tokens=_min_tokens(inputs))
    if "end_id" in inputs:
        settings["end_id"] = _end_id(inputs, vocab_size)
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        if name in inputs:
            settings[name] = _scalar(inputs, name, float, None)
    settings.update(bad_words=_words(inputs, "bad_words", tokenizer), embedding_bias=_bias(inputs, tokenizer),
                    logprobs=_scalar(inputs, "return_log_probs", bool, False))
    return settings


def _refuse_unsupported(inputs: dict[str, np.ndarray]) -> None:
    for name, why in REFUSED.items():
        a = inputs.get(name)
        if a is None or (a.dtype == np.bool_ and not a.any()) or (a.dtype.kind in "iuf" and a.size and not a.any()):
            continue  # absent, false or 0: the feature is not asked for
        raise UsageError(f"{name} is not supported: {why}")


def _seed(inputs: dict[str, np.ndarray]) -> int:
    """`seed`, or `random_seed` (TensorRT-LLM's older name), not two different ones."""
    seed, random_seed = _scalar(inputs, "seed", int, None), _scalar(inputs, "random_seed", int, None)
    if seed is not None and random_seed is not None and seed != random_seed:
        raise UsageError(f"seed {seed} and random_seed {random_seed} differ: give one (they are the same input)")
    return next((v for v in (seed, random_seed) if v is not None), DEFAULT_SEED)


def _end_id(inputs: dict[str, np.ndarray], vocab_size: int) -> int | None:
    """`end_id` in [-1, vocabulary), as TensorRT-LLM takes it: -1 means no end token."""
    end_id = _scalar(inputs, "end_id", int, None)
    if end_id == -1:
        return None
    if end_id is not None and not 0 <= end_id < vocab_size:
        raise UsageError(f"end_id must be a token id 0..{vocab_size - 1}, or -1 for no end token, got {end_id}")
    return end_id


def _min_tokens(inputs: dict[str, np.ndarray]) -> int:
    """`min_tokens`, or `min_length` (TensorRT-LLM's older name, what GenAI-Perf sends)."""
    a, b = _scalar(inputs, "min_tokens", int, None), _scalar(inputs, "min_length", int, None)
    if a is not None and b is not None and a != b:
        raise UsageError(f"min_tokens {a} and min_length {b} differ: give one (they are the same input)")
    value = next((v for v in (a, b) if v is not None), 0)
    if value < 0:
        raise UsageError(f"{'min_tokens' if a is not None else 'min_length'} must be >= 0, got {value}")
    return value


def _words(inputs: dict[str, np.ndarray], name: str, tokenizer) -> tuple[tuple[int, ...], ...]:
    """A list of words as token ids; a word that encodes to nothing is dropped (as TensorRT-LLM's
    preprocessing drops it)."""
    words = [w for w in (_strings(inputs, name) or []) if w]
    try:
        return tuple(tuple(ids) for ids in (tokenizer.encode(w) for w in words) if ids)
    except TokenizerError as e:
        raise UsageError(f"{name}: {e}") from None


def _bias(inputs: dict[str, np.ndarray], tokenizer) -> tuple[tuple[int, float], ...]:
    """embedding_bias_words / _weights: every token of each word gets its weight added to its logit."""
    words = _strings(inputs, "embedding_bias_words") or []
    weights = inputs.get("embedding_bias_weights")
    weights = [] if weights is None else [float(w) for w in weights.reshape(-1)]
    if len(words) != len(weights):
        raise UsageError(f"embedding_bias_words has {len(words)} words and embedding_bias_weights {len(weights)} "
                         f"weights: give one weight per word")
    try:
        return tuple((t, w) for word, w in zip(words, weights) if word for t in tokenizer.encode(word))
    except TokenizerError as e:
        raise UsageError(f"embedding_bias_words: {e}") from None


def response_tensors(ids: list[int], text: str | None, num_input: int, num_output: int,
                     logprobs: list[float] | None = None, cum_logprob: float | None = None,
                     sequence_index: int | None = None) -> dict[str, np.ndarray]:
    """One response's output tensors, each with the leading batch dim of 1, shaped as TensorRT-LLM's:
    text_output (1,) (its clients read `as_numpy("text_output")[0]`), output_log_probs (1, 1, n)
    and cum_log_probs (1, 1) for its one beam; sequence_index when a request asked for several."""
    out = {"output_ids": np.array([ids], dtype=np.int32).reshape(1, len(ids)),
           "num_input_tokens": np.array([[num_input]], dtype=np.int32),
           "num_output_tokens": np.array([[num_output]], dtype=np.int32)}
    if text is not None:
        out["text_output"] = np.array([text.encode("utf-8")], dtype=np.object_)
    if logprobs is not None:
        out["output_log_probs"] = np.array(logprobs, dtype=np.float32).reshape(1, 1, len(logprobs))
        out["cum_log_probs"] = np.array([[cum_logprob]], dtype=np.float32)
    if sequence_index is not None:
        out["sequence_index"] = np.array([[sequence_index]], dtype=np.int32)
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
