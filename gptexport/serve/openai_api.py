"""The OpenAI-compatible HTTP front of `gptexport serve`: /v1/completions, /v1/chat/completions,
/v1/models, /health and /metrics, on FastAPI, forwarding each request to the Triton model.

The front is a translation layer only: the model (its scheduler, in-flight batching, checks of
every value) stays in the one tritonserver, reached over gRPC (triton_link.py). Errors are
answered in OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
field (named), 404 for an unknown model, 503 while the model is not ready; an error after a
stream has begun is sent as `data: {"error": ...}`. Imports neither torch nor onnx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..artifacts.modeldir import MANIFEST, load_model_dir
from ..errors import GptExportError, UsageError
from .chat_template import load_template, render
from .openai_job import FrontModel, Job, until_disconnected
from .openai_metrics import FrontMetrics
from .openai_schema import (
    DEFAULT_COMPLETION_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    FrontError,
    bad,
    check_chat,
    check_completion,
    error_body,
    message_text,
    single_prompt,
)
from .openai_translate import chat_logprobs, legacy_logprobs, model_inputs
from .triton_link import ModelError, TritonLink

log = logging.getLogger("gptexport.openai")
VERSION_DIR = "1"


def front_models(repo: Path) -> dict[str, FrontModel]:
    """The repository's models written by `gptexport triton` with a tokenizer (the front speaks text)."""
    models = {}
    for config in sorted(repo.glob("*/config.pbtxt")):
        folder = config.parent
        if not (folder / VERSION_DIR / MANIFEST).is_file():
            continue
        md = load_model_dir(folder / VERSION_DIR, verify=False)  # Triton's model checks every hash at load
        tokenizer = md.tokenizer()
        if tokenizer is None:
            continue
        limit = re.search(r'key: "max_tokens" value: \{ string_value: "(\d+)"', config.read_text())
        models[folder.name] = FrontModel(folder.name, tokenizer, md.config.block_size,
                                         int(limit.group(1)) if limit else 1024, load_template(folder),
                                         int(config.stat().st_mtime))
    return models


class Front:
    """The endpoints: what they share is the models, the metrics and the gRPC link to Triton."""

    def __init__(self, models: dict[str, FrontModel], grpc_url: str, metrics: FrontMetrics):
        self.models, self.grpc_url, self.metrics = models, grpc_url, metrics
        self.link: TritonLink | None = None
        self._ready = False

    @asynccontextmanager
    async def lifespan(self, app):
        self.link = TritonLink(self.grpc_url)  # in the app's event loop
        yield
        await self.link.close()

    async def ready(self) -> bool:
        if not self._ready:  # once every model is ready the answer is kept: Triton does not unload them
            self._ready = all([await self.link.ready(name) for name in self.models])
        return self._ready

    async def served(self, name: str) -> FrontModel:
        if name not in self.models:
            raise FrontError(404, f"the model {name!r} does not exist; served: {', '.join(self.models) or 'none'}",
                             "model", "model_not_found")
        if not await self.ready():
            raise FrontError(503, "the model is loading: try again when GET /health answers 200")
        return self.models[name]

    async def health(self):
        return Response(status_code=200 if await self.ready() else 503)

    async def prometheus(self):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await asyncio.to_thread(self.metrics.text), media_type=CONTENT_TYPE_LATEST)

    async def list_models(self):
        return {"object": "list", "data": [model_card(m) for m in self.models.values()]}

    async def one_model(self, name: str):
        if name not in self.models:
            raise FrontError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return model_card(self.models[name])

    async def completions(self, body: CompletionRequest, request: Request):
        model = await self.served(body.model)
        check_completion(body)
        note_unknown(body)
        prompt = single_prompt(body.prompt)
        prompt_text = prompt if isinstance(prompt, str) else decode_prompt(model, prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else min(DEFAULT_COMPLETION_TOKENS,
                                                                               model.max_tokens_limit)
        job = Job(self.link, model, model_inputs(body, prompt, max_tokens, body.logprobs is not None, model.tokenizer),
                  body.n, body.stops(), max_tokens, self.metrics, "cmpl")
        if body.stream:
            await job.start()
            return StreamingResponse(sse(completion_chunks(job, body, prompt_text)), media_type="text/event-stream")
        if not await until_disconnected(request, job):
            return Response(status_code=499)  # nobody reads it: the client is gone
        return completion_body(job, body, prompt_text)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        model = await self.served(body.model)
        check_chat(body)
        note_unknown(body)
        prompt = chat_prompt(model, body)
        max_tokens = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None),
                          min(model.block_size, model.max_tokens_limit))
        job = Job(self.link, model, model_inputs(body, prompt, max_tokens, body.logprobs, model.tokenizer),
                  body.n, body.stops(), max_tokens, self.metrics, "chatcmpl")
        if body.stream:
            await job.start()
            return StreamingResponse(sse(chat_chunks(job, body)), media_type="text/event-stream")
        if not await until_disconnected(request, job):
            return Response(status_code=499)
        return chat_body(job, body)


def create_app(models: dict[str, FrontModel], grpc_url: str, metrics: FrontMetrics) -> FastAPI:
    """The FastAPI application of the front."""
    front = Front(models, grpc_url, metrics)
    app = FastAPI(title="gptexport", lifespan=front.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(FrontError, front_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    app.get("/health")(front.health)
    app.get("/metrics")(front.prometheus)
    app.get("/v1/models")(front.list_models)
    app.get("/v1/models/{name:path}")(front.one_model)
    app.post("/v1/completions")(front.completions)
    app.post("/v1/chat/completions")(front.chat_completions)
    return app


async def front_error(request, e: FrontError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def invalid_body(request, e: RequestValidationError) -> JSONResponse:
    """pydantic's complaint about a body, in OpenAI's envelope, naming the field."""
    first = e.errors()[0]
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})"),
                            status_code=400)
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc) or "the body"
    return JSONResponse(error_body(400, f"{where}: {first.get('msg')}", loc[0] if loc else None), status_code=400)


async def http_error(request, e: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(e.status_code, f"{request.method} {request.url.path}: {e.detail}"),
                        status_code=e.status_code)


def chat_prompt(model: FrontModel, body: ChatCompletionRequest) -> str:
    """The conversation through the model's chat template."""
    if model.chat_template is None:
        raise FrontError(400, f"the model {model.name!r} has no chat template: use /v1/completions, or write its "
                              f"repository with `gptexport triton --chat-template FILE|NAME`", "messages",
                         "no_chat_template")
    messages = [{"role": m.role, "content": message_text(m), **({"name": m.name} if m.name else {})}
                for m in body.messages]
    try:
        prompt = render(model.chat_template, messages, body.add_generation_prompt)
    except UsageError as e:
        raise bad(str(e), "messages") from None
    if not prompt:
        raise bad("messages: the chat template made an empty prompt", "messages")
    return prompt


def model_card(model: FrontModel) -> dict:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "gptexport",
            "max_model_len": model.block_size}


def decode_prompt(model: FrontModel, ids: list[int]) -> str:
    if any(not isinstance(i, int) or not 0 <= i for i in ids):
        raise bad("prompt: token ids must be integers >= 0", "prompt")
    try:
        return model.tokenizer.decode(ids)
    except (KeyError, IndexError, ValueError, GptExportError):
        raise bad("prompt: a token id outside the model's vocabulary", "prompt") from None


def note_unknown(body) -> None:
    if body.unknown_fields():
        log.warning("ignored unknown field(s) of a request: %s", ", ".join(body.unknown_fields()))


async def sse(batches: AsyncIterator[list[dict]]) -> AsyncIterator[str]:
    """Server-sent events: `data: {chunk}` each (a batch in one write), `data: [DONE]` at the end, an
    error as `data: {"error": ...}`."""
    try:
        async for batch in batches:
            if batch:
                yield "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in batch)
    except FrontError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    except Exception as e:  # the model's error mid-stream (or the link's): the client's APIError
        log.warning("request failed mid-stream: %s", e)
        message = str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"
        yield f"data: {json.dumps(error_body(500, message))}\n\n"
    yield "data: [DONE]\n\n"


def _with_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def completion_chunks(job: Job, body: CompletionRequest, prompt_text: str) -> AsyncIterator[list[dict]]:
    base = {"id": job.id, "object": "text_completion", "created": job.created, "model": body.model}
    extra = {"usage": None} if _with_usage(body) else {}
    offsets = [len(prompt_text)] * body.n

    def chunk(index: int, text: str, logprobs=None, finish=None) -> dict:
        return {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                **extra}

    if body.echo:
        yield [chunk(i, prompt_text) for i in range(body.n)]
    async for batch in job.batches():
        chunks = []
        for choice, text, delta in batch:
            lp = None
            if body.logprobs is not None:
                lp = legacy_logprobs(delta.ids, delta.logprobs or [], job.model.tokenizer, offsets[choice.index],
                                     body.logprobs > 0)
                offsets[choice.index] += sum(map(len, lp["tokens"]))
            if text or lp:
                chunks.append(chunk(choice.index, text, lp))
        yield chunks
    yield [chunk(choice.index, rest, finish=reason) for choice, rest, reason in job.finish()] + \
        ([{**base, "choices": [], "usage": job.usage()}] if extra else [])


def completion_body(job: Job, body: CompletionRequest, prompt_text: str) -> dict:
    choices = []
    for choice, _, reason in job.finish():
        lp = (legacy_logprobs(choice.ids, choice.logprobs, job.model.tokenizer, len(prompt_text), body.logprobs > 0)
              if body.logprobs is not None else None)
        choices.append({"index": choice.index, "text": (prompt_text if body.echo else "") + choice.final_text,
                        "logprobs": lp, "finish_reason": reason})
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": body.model,
            "choices": choices, "usage": job.usage()}


async def chat_chunks(job: Job, body: ChatCompletionRequest) -> AsyncIterator[list[dict]]:
    base = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": body.model}
    extra = {"usage": None} if _with_usage(body) else {}

    def chunk(index: int, delta: dict, logprobs=None, finish=None) -> dict:
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                **extra}

    yield [chunk(i, {"role": "assistant", "content": ""}) for i in range(body.n)]
    async for batch in job.batches():
        chunks = []
        for choice, text, delta in batch:
            lp = chat_logprobs(delta.ids, delta.logprobs or [], job.model.tokenizer) if body.logprobs else None
            if text or lp:
                chunks.append(chunk(choice.index, {"content": text}, lp))
        yield chunks
    yield [chunk(choice.index, {"content": rest} if rest else {}, finish=reason)
           for choice, rest, reason in job.finish()] + \
        ([{**base, "choices": [], "usage": job.usage()}] if extra else [])


def chat_body(job: Job, body: ChatCompletionRequest) -> dict:
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.final_text},
                "logprobs": chat_logprobs(c.ids, c.logprobs, job.model.tokenizer) if body.logprobs else None,
                "finish_reason": reason} for c, _, reason in job.finish()]
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": body.model,
            "choices": choices, "usage": job.usage()}
