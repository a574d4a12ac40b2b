"""One OpenAI request in flight: its stream from the model, its choices, its metrics, its end.

A Job is what the completions and chat endpoints share: it sends the request (triton_link),
turns the model's error before the first token into a 400 naming the field (or a 503 when Triton
cannot be reached), feeds every delta to its choice (stop strings, held-back text), and records
the request in the metrics exactly once: finished, failed or cancelled.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from .openai_metrics import FrontMetrics, RequestTimer
from .openai_schema import FrontError
from .openai_translate import Choice, param_of, usage
from .triton_link import Delta, ModelError, TritonLink


@dataclass
class FrontModel:
    """What the front knows of one served model (from its repository folder)."""

    name: str
    tokenizer: object
    block_size: int
    max_tokens_limit: int  # the repository's max_tokens
    chat_template: object | None  # a compiled Jinja2 template, or None: no chat endpoint
    created: int


END = object()  # the model's final response was read


class Job:
    """A reader task takes the model's responses as they come; the endpoint takes them in batches:
    all that arrived since its last look, so a front that falls behind writes several tokens to
    its client in one send instead of one send (and one system call) per token."""

    def __init__(self, link: TritonLink, model: FrontModel, arrays: dict[str, np.ndarray], n: int,
                 stops: tuple[str, ...], max_tokens: int, metrics: FrontMetrics, prefix: str):
        self.link, self.model, self.arrays, self.max_tokens = link, model, arrays, max_tokens
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [Choice(i, stops) for i in range(n)]
        self.prompt_tokens = 0
        self.timer = RequestTimer(metrics, model.name)
        self._ended = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self._first: object = None

    async def _read(self) -> None:
        try:
            async for delta in self.link.stream(self.model.name, self.arrays, self.id):
                self._queue.put_nowait(delta)
            self._queue.put_nowait(END)
        except Exception as e:  # handed to the endpoint, which answers it
            self._queue.put_nowait(e)

    def _apply(self, delta: Delta) -> tuple[Choice, str, Delta]:
        if not 0 <= delta.index < len(self.choices):
            raise ModelError(f"the model answered sequence {delta.index} of {len(self.choices)}")
        self.prompt_tokens = delta.num_input
        choice = self.choices[delta.index]
        text = choice.add(delta)
        self.timer.tokens(len(delta.ids), delta.index)
        return choice, text, delta

    async def start(self) -> None:
        """Send the request and wait for its first tokens: a bad request fails here, with its status."""
        import grpc

        self._reader = asyncio.ensure_future(self._read())
        try:
            first = await self._queue.get()
        except BaseException:
            await self.close()
            self.cancel()
            raise
        if isinstance(first, ModelError):
            self.fail(400)
            raise FrontError(400, str(first), param_of(str(first)))
        if isinstance(first, grpc.aio.AioRpcError):
            self.fail(503)
            raise FrontError(503, f"the model server cannot be reached ({first.code().name}: {first.details()})")
        self._first = first

    async def batches(self) -> AsyncIterator[list[tuple[Choice, str, Delta]]]:
        """After start(): the deltas in batches (each with the text it releases) until the end; an
        error mid-stream propagates; leaving early cancels the request."""
        items = [self._first]
        try:
            while True:
                while not self._queue.empty():
                    items.append(self._queue.get_nowait())
                batch = []
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item is not END:
                        batch.append(self._apply(item))
                if batch:
                    yield batch
                if END in items:
                    return
                items = [await self._queue.get()]
        except (asyncio.CancelledError, GeneratorExit):
            self.cancel()
            await self.close()
            raise
        except Exception:
            self.fail(500)
            raise

    async def close(self) -> None:
        """Stop reading: if the model's stream is still open, Triton cancels the request."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def collect(self) -> None:
        await self.start()
        async for _ in self.batches():
            pass

    def finish(self) -> list[tuple[Choice, str, str]]:
        """Each choice's held-back text and finish_reason; the request is recorded as finished."""
        ends = [(c, *c.finish(self.max_tokens)) for c in self.choices]
        if not self._ended:
            self._ended = True
            self.timer.end(self.prompt_tokens, [reason for _, _, reason in ends])
        return ends

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.choices)

    def fail(self, status: int) -> None:
        if not self._ended:
            self._ended = True
            self.timer.end(self.prompt_tokens, status=status)

    def cancel(self) -> None:
        if not self._ended:
            self._ended = True
            self.timer.end(self.prompt_tokens, cancelled=True)


async def until_disconnected(request, job: Job, poll_s: float = 0.25) -> bool:
    """Collect a non-streamed job while watching its client: True if it completed, False (the job
    cancelled, so the model frees its row) if the client went away first."""
    task = asyncio.ensure_future(job.collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                task.result()  # its FrontError / ModelError, if any
                return True
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                job.cancel()
                return False
    finally:
        if not task.done():
            task.cancel()
