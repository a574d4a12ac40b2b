"""One served model and one request's generation, with no Triton in sight (tested in-process).

A ServedModel holds what all requests share: the verified model directory, its tokenizer and one
activated runner. Each request gets its own KV cache (inside `generate`) and its own
`numpy.random.Generator` seeded from the request's seed, consumed exactly as `gptexport generate`
consumes it, so both give the same tokens. Text is streamed through the CLI's TextStream: a delta
per token, or per complete UTF-8 character for byte-level BPE, never half a character.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..backends import open_runner
from ..backends.base import Runner
from ..generate import TextStream, generate
from ..modeldir import ModelDir, load_model_dir
from .protocol import ServeRequest, parse_request

# emit(ids, text): the tokens of one delta and their text (None for a model without a tokenizer)
Emit = Callable[[list[int], "str | None"], None]


@dataclass
class Outcome:
    tokens: list[int]  # every token sampled, in order
    finish: str  # "length" (max_tokens reached), "stop" (a stop word completed) or "cancelled"


@dataclass
class ServedModel:
    model_dir: ModelDir
    tokenizer: object
    runner: Runner
    max_tokens_limit: int

    def parse(self, inputs: dict[str, np.ndarray], parameters: dict) -> ServeRequest:
        return parse_request(inputs, parameters, self.tokenizer, self.model_dir.config.vocab_size,
                             self.max_tokens_limit)

    def run(self, request: ServeRequest, emit: Emit, cancelled: Callable[[], bool] = lambda: False,
            notice: Callable[[str], None] | None = None) -> Outcome:
        return run_request(self.runner, self.tokenizer, request, emit, cancelled, notice)

    def close(self) -> None:
        self.runner.deactivate()


def open_served_model(path: str | Path, backend: str, max_tokens_limit: int, threads: int | None = None) -> ServedModel:
    """Load (hashes checked: a tampered file is refused) and activate one model directory."""
    md = load_model_dir(path)
    runner = open_runner(backend, md, threads)
    runner.activate()
    return ServedModel(md, md.tokenizer(), runner, max_tokens_limit)


def cpu_threads(instances: int) -> int:
    """CPU threads for each of `instances` model instances: the cores this process may use, less one
    for Triton's own threads (HTTP/gRPC, responses from the stubs), shared among the instances.

    ONNX Runtime's threads spin while they wait; given every core they starve the server: on 2
    cores one instance with 2 threads served 16 streaming clients at 880 tok/s, with 1 thread at
    1428 (scripts/serve_load.py, shipped model).
    """
    return max(1, (len(os.sched_getaffinity(0)) - 1) // max(1, instances))


def run_request(runner: Runner, tokenizer, request: ServeRequest, emit: Emit,
                cancelled: Callable[[], bool] = lambda: False,
                notice: Callable[[str], None] | None = None) -> Outcome:
    """Generate for one request, calling `emit` for every delta as soon as it is complete.

    Stops after max_tokens, after the token that completes a stop word (which is sent), or when
    `cancelled()` turns true (checked before each token is sent).
    """
    rng = np.random.default_rng(request.seed)  # as run_generation: one generator, seeded by the request
    tokens: list[int] = []
    pending: list[int] = []  # sampled, not yet sent: the start of an unfinished UTF-8 character
    state = {"finish": "length", "text": ""}

    def on_text(text: str) -> None:
        ids = pending.copy()
        pending.clear()
        if tokenizer is None:
            emit(ids, None)
            return
        before = len(state["text"])
        state["text"] += text
        emit(ids, text)
        if any(w in state["text"][max(0, before - len(w) + 1):] for w in request.stop_words):
            state["finish"] = "stop"

    stream = TextStream(tokenizer, on_text)

    def on_token(token: np.ndarray) -> bool:
        if cancelled():
            state["finish"] = "cancelled"
            return True
        tokens.append(int(token[0]))
        pending.append(tokens[-1])
        stream.write([tokens[-1]])
        return state["finish"] == "stop"

    generate(runner, np.array([request.prompt_ids]), request.max_tokens, request.sampling, rng,
             on_token=on_token, notice=notice)
    if pending and state["finish"] != "cancelled":
        emit(pending.copy(), "")  # the bytes of a character cut off by max_tokens: ids, no text
    return Outcome(tokens, state["finish"])
