"""The Triton Python-backend model that every repository written by `gptexport triton` serves.

A repository's `NAME/1/model.py` only imports TritonPythonModel from here. The model is
decoupled (config.pbtxt: `model_transaction_policy { decoupled: true }`): `execute` sends each
request's responses through its response sender as they are made, and always ends with the
final flag. Each model instance is a process of its own (Triton's Python stub), holding one
ServedModel; a request runs to its end before the instance takes the next, so `--instances N`
serves N requests at once and queues the rest.

Only this module knows `triton_python_backend_utils`; it is imported in `initialize`, so the
module itself imports anywhere (and never imports torch).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import GptExportError, UsageError
from ..runtime.session import GenerationSession, Outcome
from .protocol import ServeRequest, parse_request, response_tensors

CANCEL_CHECK_S = 0.02  # is_cancelled() asks the server (IPC): once per token would cost more than a token


@dataclass
class ServedModel:
    """What one model instance serves: a generation session and the request limits (no Triton here)."""

    session: GenerationSession
    max_tokens_limit: int

    @property
    def tokenizer(self):
        return self.session.tokenizer

    @property
    def runner(self):
        return self.session.runner

    def parse(self, inputs: dict[str, np.ndarray], parameters: dict) -> ServeRequest:
        return parse_request(inputs, parameters, self.tokenizer, self.session.vocab_size, self.max_tokens_limit)

    def run(self, request: ServeRequest, emit, cancelled: Callable[[], bool] = lambda: False,
            notice: Callable[[str], None] | None = None) -> Outcome:
        """One request's generation, exactly `gptexport generate`'s with the same seed and settings;
        `emit(ids, text)` receives every delta."""
        return self.session.generate(request.prompt_ids, request.params, emit, cancelled, notice)

    def close(self) -> None:
        self.session.close()


def open_served_model(path: str | Path, backend: str, max_tokens_limit: int, threads: int | None = None) -> ServedModel:
    """Load (hashes checked: a tampered file is refused) and activate one model directory."""
    return ServedModel(GenerationSession.open(path, backend, threads), max_tokens_limit)


def cpu_threads(instances: int) -> int:
    """CPU threads for each of `instances` model instances: the cores this process may use, less one
    for Triton's own threads (HTTP/gRPC, responses from the stubs), shared among the instances.

    ONNX Runtime's threads spin while they wait; given every core they starve the server: on 2
    cores one instance with 2 threads served 16 streaming clients at 880 tok/s, with 1 thread at
    1428 (scripts/serve_load.py, shipped model).
    """
    return max(1, (len(os.sched_getaffinity(0)) - 1) // max(1, instances))


def _at_most_every(seconds: float, check: Callable[[], bool]) -> Callable[[], bool]:
    """`check`, called at most once per `seconds`; False in between."""
    last = [time.monotonic()]

    def throttled() -> bool:
        now = time.monotonic()
        if now - last[0] < seconds:
            return False
        last[0] = now
        return check()

    return throttled


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        if args.get("model_instance_kind") == "GPU":  # one process per instance: pin it to its GPU
            os.environ["CUDA_VISIBLE_DEVICES"] = args["model_instance_device_id"]
        threads = int(params.get("threads") or 0) or cpu_threads(instances)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        try:
            self.model: ServedModel = open_served_model(
                version_dir, params.get("backend", "onnxruntime"), int(params.get("max_tokens", "1024")), threads)
        except GptExportError as e:  # a tampered file, a missing backend: the model does not load
            raise pb_utils.TritonModelException(f"error: {e}") from None
        self.log = pb_utils.Logger
        self.log.log_info(f"gptexport: {args['model_name']} instance {args.get('model_instance_name')}: "
                          f"{version_dir} on {self.model.runner.name}, {threads} thread(s)")

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            try:
                if not self._serve(request, sender):
                    sender.send(flags=final)
            except UsageError as e:  # a bad value in the request: say what is valid, keep serving
                sender.send(self._error(str(e), self.pb.TritonError.INVALID_ARG), flags=final)
            except GptExportError as e:  # e.g. NaN logits: this request fails, the next may not
                sender.send(self._error(str(e), self.pb.TritonError.INTERNAL), flags=final)
            except Exception as e:  # a bug: the client still gets an answer and the final flag
                self.log.log_error(f"gptexport: {traceback.format_exc()}")
                sender.send(self._error(f"internal error: {type(e).__name__}: {e}", self.pb.TritonError.INTERNAL),
                            flags=final)
        return None

    def finalize(self) -> None:
        self.model.close()

    def _serve(self, request, sender) -> bool:
        """Run one request; True if its final response was already sent."""
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        req = self.model.parse(inputs, json.loads(request.parameters() or "{}"))
        n_in = len(req.prompt_ids)
        sent = [0]

        def emit(ids: list[int], text: str | None) -> None:
            sent[0] += len(ids)
            if req.stream:
                sender.send(self._response(response_tensors(ids, text, n_in, sent[0])))

        outcome = self.model.run(req, emit, cancelled=_at_most_every(CANCEL_CHECK_S, sender.is_cancelled),
                                 notice=lambda msg: self.log.log_info(f"gptexport: {msg}"))
        if outcome.finish == "cancelled":
            self.log.log_info(f"gptexport: request {request.request_id()!r} cancelled by the client after "
                              f"{len(outcome.tokens)} of {req.max_tokens} tokens")
            return False
        if req.stream:
            return False
        tokenizer = self.model.tokenizer
        text = None
        if tokenizer is not None:
            text = tokenizer.decode(outcome.tokens)
            if not req.exclude_input:  # as TensorRT-LLM: a whole (non-streamed) output starts with the prompt
                prompt = req.prompt_text if req.prompt_text is not None else tokenizer.decode(req.prompt_ids)
                text = prompt + text
        sender.send(self._response(response_tensors(outcome.tokens, text, n_in, len(outcome.tokens))),
                    flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return True

    def _response(self, arrays: dict[str, np.ndarray]):
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(k, v) for k, v in arrays.items()])

    def _error(self, message: str, code):
        return self.pb.InferenceResponse(error=self.pb.TritonError(message, code))
