"""The OpenAI-compatible HTTP front of `gptexport serve`: /v1/completions, /v1/chat/completions,
/v1/models, /health and /metrics, on FastAPI, forwarding each request to the Triton model.

The front is a translation layer only: the model (its scheduler, in-flight batching, checks of
every value) stays in the one tritonserver, reached over gRPC (triton_link.py). Errors are
answered in OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
field (named), 404 for an unknown model, 503 while the model is not ready; an error after a
stream has begun is sent as `data: {"error": ...}`. Imports neither torch nor onnx.
"""

from __future__ import annotations

import json
import logging
import re
import time
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
from .openai_schema import (DEFAULT_COMPLETION_TOKENS, ChatCompletionRequest, CompletionRequest, FrontError,
                            bad, check_chat, check_completion, error_body, message_text, single_prompt)
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


def create_app(models: dict[str, FrontModel], grpc_url: str, metrics: FrontMetrics):
    """The FastAPI application of the front (its gRPC channel opens with the app's event loop)."""
    state: dict = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        state["link"] = TritonLink(grpc_url)
        yield
        await state["link"].close()

    app = FastAPI(title="gptexport", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(FrontError)
    async def front_error(request, e: FrontError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})"),
                                status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = loc[0] if loc else None
        where = ".".join(loc) or "the body"
        return JSONResponse(error_body(400, f"{where}: {first.get('msg')}", field), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(error_body(e.status_code, f"{request.method} {request.url.path}: {e.detail}"),
                            status_code=e.status_code)

    async def ready() -> bool:
        if not state["ready"]:  # once every model is ready the answer is cached: Triton does not unload them
            link = state["link"]
            state["ready"] = all([await link.ready(name) for name in models])
        return state["ready"]

    async def served(name: str) -> FrontModel:
        if name not in models:
            raise FrontError(404, f"the model {name!r} does not exist; served: {', '.join(models) or 'none'}",
                             "model", "model_not_found")
        if not await ready():
            raise FrontError(503, "the model is loading: try again when GET /health answers 200")
        return models[name]

    @app.get("/health")
    async def health():
        ok = await ready()
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        import asyncio

        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await asyncio.to_thread(metrics.text), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in models.values()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name not in models:
            raise FrontError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return model_card(models[name])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        model = await served(body.model)
        check_completion(body)
        note_unknown(body)
        prompt = single_prompt(body.prompt)
        prompt_text = prompt if isinstance(prompt, str) else decode_prompt(model, prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else min(DEFAULT_COMPLETION_TOKENS,
                                                                               model.max_tokens_limit)
        job = Job(state["link"], model, model_inputs(body, prompt, max_tokens, body.logprobs is not None,
                                                     model.tokenizer), body.n, body.stops(), max_tokens, metrics, "cmpl")
        if body.stream:
            await job.start()
            return StreamingResponse(sse(completion_chunks(job, body, prompt_text)), media_type="text/event-stream")
        if not await until_disconnected(request, job):
            return Response(status_code=499)
        return completion_body(job, body, prompt_text)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = await served(body.model)
        if model.chat_template is None:
            raise FrontError(400, f"the model {model.name!r} has no chat template: use /v1/completions, or write its "
                                  f"repository with `gptexport triton --chat-template FILE|NAME`", "messages",
                             "no_chat_template")
        check_chat(body)
        note_unknown(body)
        messages = [{"role": m.role, "content": message_text(m), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        try:
            prompt = render(model.chat_template, messages, body.add_generation_prompt)
        except UsageError as e:
            raise bad(str(e), "messages") from None
        if not prompt:
            raise bad("messages: the chat template made an empty prompt", "messages")
        max_tokens = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None),
                          min(model.block_size, model.max_tokens_limit))
        job = Job(state["link"], model, model_inputs(body, prompt, max_tokens, body.logprobs, model.tokenizer),
                  body.n, body.stops(), max_tokens, metrics, "chatcmpl")
        if body.stream:
            await job.start()
            return StreamingResponse(sse(chat_chunks(job, body)), media_type="text/event-stream")
        if not await until_disconnected(request, job):
            return Response(status_code=499)
        return chat_body(job, body)

    return app


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
        yield f"data: {json.dumps(error_body(500, str(e) if isinstance(e, ModelError) else f'{type(e).__name__}: {e}'))}\n\n"
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
           for choice, rest, reason in job.finish()] + ([{**base, "choices": [], "usage": job.usage()}] if extra else [])


def chat_body(job: Job, body: ChatCompletionRequest) -> dict:
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.final_text},
                "logprobs": chat_logprobs(c.ids, c.logprobs, job.model.tokenizer) if body.logprobs else None,
                "finish_reason": reason} for c, _, reason in job.finish()]
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": body.model,
            "choices": choices, "usage": job.usage()}
