"""The request bodies of the OpenAI front (pydantic) and its error envelope.

Field names and defaults are OpenAI's, plus the extras vLLM accepts (`top_k`, `min_tokens`,
`repetition_penalty`, `ignore_eos`). A field left out is not sent to the model, so it takes
`gptexport generate`'s default (temperature 0.8, top_k 200, seed 1337): the same request gives
the same text as the CLI. Unknown fields are accepted and ignored with one log line, as vLLM does.
Values are checked by the model (serve/protocol.py), whose messages name the field; only what
is the front's own (n, logprobs, echo, the prompt's shape, stream_options) is checked here.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16  # as num_return_sequences (serve/protocol.py MAX_RETURN_SEQUENCES)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # ignored
    # vLLM's extras
    top_k: Optional[int] = None
    min_tokens: Optional[int] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False  # no end token is used unless asked for: nothing to ignore

    @field_validator("n", "stream", "ignore_eos", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        """OpenAI's schema lets a client send null for these: the default then."""
        return cls.model_fields[info.field_name].default if value is None else value

    def stops(self) -> tuple[str, ...]:
        words = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(w for w in words if w)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = None
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0)
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("echo", mode="before")
    @classmethod
    def _null_echo(cls, value):
        return False if value is None else value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0)
    add_generation_prompt: bool = True  # vLLM's extra

    @field_validator("logprobs", "add_generation_prompt", mode="before")
    @classmethod
    def _null_flags(cls, value, info):
        return cls.model_fields[info.field_name].default if value is None else value


class FrontError(Exception):
    """A request the front answers with an error: HTTP status, message, the field it names."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 503: "service_unavailable_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def bad(message: str, param: str | None = None) -> FrontError:
    return FrontError(400, message, param)


def check_completion(req: CompletionRequest) -> None:
    """The completion fields only the front knows (the model checks every value it receives)."""
    if req.best_of is not None and req.best_of != req.n:
        raise bad(f"best_of {req.best_of} is not supported: it must equal n ({req.n}); "
                  f"ranking candidates by log-probability is not done here", "best_of")
    if req.suffix:
        raise bad("suffix is not supported: the model only continues text (no insertion)", "suffix")
    if req.logprobs is not None and req.logprobs > 1:
        raise bad(f"logprobs {req.logprobs} is not supported: the model returns the sampled token's "
                  f"log-probability only (give 0 or 1)", "logprobs")
    if req.echo and req.logprobs is not None:
        raise bad("echo with logprobs is not supported: the prompt's log-probabilities are not computed", "echo")
    check_stream_options(req)


def check_chat(req: ChatCompletionRequest) -> None:
    if req.top_logprobs:
        raise bad(f"top_logprobs {req.top_logprobs} is not supported: the model returns the sampled token's "
                  f"log-probability only (give 0)", "top_logprobs")
    check_stream_options(req)


def check_stream_options(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad("stream_options is only for a streamed request (stream: true)", "stream_options")


def single_prompt(prompt) -> str | list[int]:
    """The one prompt of a completion request: a string or a list of token ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad(f"prompt: a batch of {len(prompt)} prompts is not supported; send one request per prompt "
                      f"(n gives several completions of one)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, (str, list)) and not prompt:
        raise bad("prompt is empty: give at least one character or token id", "prompt")
    return prompt


def message_text(message: ChatMessage) -> str:
    """A message's content as one string (text parts joined; other parts refused)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    others = [p.type for p in message.content if p.type != "text"]
    if others:
        raise bad(f"messages: content parts of type {others[0]!r} are not supported: the model takes text only",
                  "messages")
    return "".join(p.text or "" for p in message.content)
