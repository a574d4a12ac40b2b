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


class Job:
    def __init__(self, link: TritonLink, model: FrontModel, arrays: dict[str, np.ndarray], n: int,
                 stops: tuple[str, ...], max_tokens: int, metrics: FrontMetrics, prefix: str):
        self.link, self.model, self.arrays, self.max_tokens = link, model, arrays, max_tokens
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [Choice(i, stops) for i in range(n)]
        self.prompt_tokens = 0
        self.timer = RequestTimer(metrics, model.name)
        self._ended = False
        self._raw = link.stream(model.name, arrays, self.id)
        self._stream = self._deltas()
        self._first: tuple[Choice, str, Delta] | None = None

    async def _deltas(self) -> AsyncIterator[tuple[Choice, str, Delta]]:
        async for delta in self._raw:
            if not 0 <= delta.index < len(self.choices):
                raise ModelError(f"the model answered sequence {delta.index} of {len(self.choices)}")
            self.prompt_tokens = delta.num_input
            choice = self.choices[delta.index]
            text = choice.add(delta)
            self.timer.tokens(len(delta.ids), delta.index)
            yield choice, text, delta

    async def start(self) -> None:
        """Send the request and wait for its first tokens: a bad request fails here, with its status."""
        import grpc

        try:
            self._first = await self._stream.__anext__()
        except StopAsyncIteration:
            self._first = None
        except ModelError as e:
            self.fail(400)
            raise FrontError(400, str(e), param_of(str(e))) from None
        except grpc.aio.AioRpcError as e:
            self.fail(503)
            raise FrontError(503, f"the model server cannot be reached ({e.code().name}: {e.details()})") from None
        except BaseException:
            self.cancel()
            await self.close()
            raise

    async def events(self) -> AsyncIterator[tuple[Choice, str, Delta]]:
        """Every delta after start(), with the text it releases; a ModelError mid-stream propagates."""
        try:
            if self._first is not None:
                yield self._first
            async for item in self._stream:
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            self.cancel()
            await self.close()
            raise
        except Exception:
            self.fail(500)
            raise

    async def close(self) -> None:
        """End the model's stream: if it is still open, Triton cancels the request."""
        await self._raw.aclose()  # `async for` leaves an iterator open; closing runs its finally

    async def collect(self) -> None:
        await self.start()
        async for _ in self.events():
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
