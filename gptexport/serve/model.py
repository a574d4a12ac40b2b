"""The Triton Python-backend model that every repository written by `gptexport triton` serves.

A repository's `NAME/1/model.py` only imports TritonPythonModel from here. The model is
decoupled (config.pbtxt: `model_transaction_policy { decoupled: true }`): `execute` checks each
request and admits it to the instance's scheduler (runtime/scheduler.py), then returns; a thread
of the instance steps the scheduler, every sequence in flight in one forward, and sends each
request's responses through its response sender as they are made (Triton's Python backend lets
a decoupled model send from any thread, after execute has returned), always ending with the
final flag. Up to `max_batch` sequences run at once per instance (`gptexport triton
--max-batch`); the rest wait in the scheduler's queue, first come, first served. A bad request is
answered at once with its error and never reaches the scheduler.

Only this module knows `triton_python_backend_utils`; it is imported in `initialize`, so the
module itself imports anywhere (and never imports torch).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import GptExportError, UsageError
from ..runtime.scheduler import PREFILL_CHUNK, Sequence
from ..runtime.session import DEFAULT_MAX_BATCH, GenerationSession, Outcome, outcome_of
from .protocol import ServeRequest, parse_request, response_tensors

CANCEL_CHECK_S = 0.02  # is_cancelled() asks the server (IPC): once per token would cost more than a token


@dataclass
class ServedModel:
    """What one model instance serves: a generation session and the request limits (no Triton here).

    With `start()` a thread of its own steps the scheduler, and requests only `submit`; without
    it (in-process use, tests) `run` steps the scheduler itself until its sequence is done.
    """

    session: GenerationSession
    max_tokens_limit: int

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def tokenizer(self):
        return self.session.tokenizer

    @property
    def runner(self):
        return self.session.runner

    def parse(self, inputs: dict[str, np.ndarray], parameters: dict) -> ServeRequest:
        return parse_request(inputs, parameters, self.tokenizer, self.session.vocab_size, self.max_tokens_limit)

    def submit(self, request: ServeRequest, emit, cancelled: Callable[[], bool] = lambda: False,
               notice: Callable[[str], None] | None = None, on_done: Callable[[Sequence], None] | None = None,
               params=None) -> Sequence:
        """Queue one sequence of a request (`params`: one of request.sequence_params(), default its first):
        exactly `gptexport generate`'s with the same seed and settings; `emit(seq, ids, text)` receives
        every delta, `on_done(seq)` the end."""
        return self.session.submit(request.prompt_ids, params or request.params, emit, cancelled, notice,
                                   on_done=on_done)

    def run(self, request: ServeRequest, emit, cancelled: Callable[[], bool] = lambda: False,
            notice: Callable[[str], None] | None = None) -> Outcome:
        """One request to its end (stepping the scheduler here unless its thread runs)."""
        seq = self.submit(request, emit, cancelled, notice)
        if self._thread is not None:
            seq.done.wait()
        else:
            self.session.scheduler.run(until=seq)
        return outcome_of(seq)

    def start(self, on_bug: Callable[[BaseException], None] = lambda e: None) -> None:
        """Step the scheduler in a thread of its own from now on."""
        self._thread = threading.Thread(target=self.session.scheduler.loop, args=(self._stop, on_bug),
                                        name="gptexport-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self.session.close()


def open_served_model(path: str | Path, backend: str, max_tokens_limit: int, threads: int | None = None,
                      max_batch: int = DEFAULT_MAX_BATCH, prefill_chunk: int | None = PREFILL_CHUNK,
                      max_cache_mb: float | None = None) -> ServedModel:
    """Load (hashes checked: a tampered file is refused) and activate one model directory."""
    return ServedModel(GenerationSession.open(path, backend, threads, max_batch, prefill_chunk, max_cache_mb),
                       max_tokens_limit)


def default_cache_mb(backend: str, instances: int) -> float | None:
    """The KV cache each instance's running sequences may hold by default: on the CPU a quarter of
    the machine's memory, shared among the instances (the rest is the weights', the servers' and
    everyone else's); on a GPU no limit but max_batch (the cache is in device memory, sized by it)."""
    if backend != "onnxruntime":
        return None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / 4 / max(1, instances) / 2**20


def cpu_threads(instances: int) -> int:
    """CPU threads for each of `instances` model instances: the cores this process may use, shared.

    With in-flight batching one instance's scheduler runs every sequence in one forward per step,
    so that forward should have the cores: GenAI-Perf, 16 streaming clients on 2 cores, one
    instance at --max-batch 16: GPT-2-small shape 119 output tok/s with 1 thread, 180 with 2; the
    shipped model 789 with 1, 2049 with 2. (One sequence at a time, before batching, it was the
    other way round: ONNX Runtime's spinning threads starved Triton's, 880 tok/s with 2 threads
    against 1428 with 1 on the shipped model; hence the old default of the cores less one.)
    """
    return max(1, len(os.sched_getaffinity(0)) // max(1, instances))


class Responder:
    """The one thread that talks to Triton for the scheduler: it sends the responses the scheduler's
    thread queues (in order), and asks Triton whether each running request was cancelled.

    Every response_sender.send and is_cancelled is an IPC round trip to the server process; made on
    the scheduler's thread they stalled every step for all sequences (16 streams: a send per token
    each). Here they overlap with the next forward, and the scheduler only reads a flag.
    """

    def __init__(self, on_bug: Callable[[BaseException], None]):
        self.queue: queue.Queue = queue.Queue()
        self.on_bug = on_bug
        self.watched: dict[int, tuple[object, threading.Event, list[float]]] = {}  # id -> sender, flag, last poll
        self.thread = threading.Thread(target=self._run, name="gptexport-responder", daemon=True)
        self.thread.start()

    def watch(self, sender) -> threading.Event:
        """A flag set once Triton says the request of `sender` was cancelled."""
        flag = threading.Event()
        self.queue.put(("watch", sender, flag))
        return flag

    def send(self, sender, response=None, final: int = 0, forget: bool = False) -> None:
        self.queue.put(("send", sender, (response, final, forget)))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(10)

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=CANCEL_CHECK_S)
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:
                if item and item[0] == "watch":
                    self.watched[id(item[1])] = (item[1], item[2], [time.monotonic()])
                elif item:
                    _, sender, (response, final, forget) = item
                    if response is None:
                        sender.send(flags=final)
                    else:
                        sender.send(response, flags=final)
                    if forget:
                        self.watched.pop(id(sender), None)
                self._poll()
            except Exception as e:  # a bug must not stop the responses of other requests
                self.on_bug(e)

    def _poll(self) -> None:
        now = time.monotonic()
        for sender, flag, last in list(self.watched.values()):
            if not flag.is_set() and now - last[0] >= CANCEL_CHECK_S:
                last[0] = now
                if sender.is_cancelled():
                    flag.set()


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
        max_batch = int(params.get("max_batch") or DEFAULT_MAX_BATCH)
        chunk = int(params.get("prefill_chunk") or PREFILL_CHUNK)
        backend = params.get("backend", "onnxruntime")
        cache_mb = float(params.get("max_cache_mb") or 0) or default_cache_mb(backend, instances)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.log = pb_utils.Logger
        try:
            self.model: ServedModel = open_served_model(
                version_dir, backend, int(params.get("max_tokens", "1024")), threads, max_batch, chunk, cache_mb)
        except GptExportError as e:  # a tampered file, a missing backend: the model does not load
            raise pb_utils.TritonModelException(f"error: {e}") from None
        on_bug = lambda e: self.log.log_error(f"gptexport: {traceback.format_exc()}")  # noqa: E731
        self.responder = Responder(on_bug)
        self.model.start(on_bug=on_bug)
        self.log.log_info(f"gptexport: {args['model_name']} instance {args.get('model_instance_name')}: "
                          f"{version_dir} on {self.model.runner.name}, {threads} thread(s), "
                          f"up to {max_batch} sequences in flight, prompts prefilled {chunk} tokens per step, "
                          f"KV cache up to {'the max_batch rows' if cache_mb is None else f'{cache_mb:.0f} MB'}")

    def execute(self, requests: list) -> None:
        """Admit each request to the scheduler and return (decoupled: its thread sends the responses)."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._admit(request, sender)
            except UsageError as e:  # a bad value in the request: say what is valid, keep serving
                self._final(sender, self._error(str(e), self.pb.TritonError.INVALID_ARG))
            except GptExportError as e:
                self._final(sender, self._error(str(e), self.pb.TritonError.INTERNAL))
            except Exception as e:  # a bug: the client still gets an answer and the final flag
                self.log.log_error(f"gptexport: {traceback.format_exc()}")
                self._final(sender, self._error(f"internal error: {type(e).__name__}: {e}",
                                                self.pb.TritonError.INTERNAL))
        return None

    def finalize(self) -> None:
        self.model.close()
        self.responder.close()

    def _admit(self, request, sender) -> None:
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        req = self.model.parse(inputs, json.loads(request.parameters() or "{}"))
        request_id, several = request.request_id(), req.num_return_sequences > 1
        left = req.num_return_sequences  # sequences not done yet: the final flag comes after the last
        lock = threading.Lock()
        cancelled = self.responder.watch(sender)

        def done(seq: Sequence, index: int | None) -> None:  # on the scheduler's thread: never raise
            nonlocal left
            try:
                with lock:
                    left -= 1
                    last = left == 0
                self._finish(req, seq, sender, request_id, index, last)
            except Exception:
                self.log.log_error(f"gptexport: {traceback.format_exc()}")

        for i, params in enumerate(req.sequence_params()):
            index = i if several else None
            self.model.submit(req, self._streamer(req, sender, index) if req.stream else None,
                              cancelled=cancelled.is_set, notice=lambda msg: self.log.log_info(f"gptexport: {msg}"),
                              on_done=lambda seq, index=index: done(seq, index), params=params)

    def _streamer(self, req: ServeRequest, sender, index: int | None):
        """on_delta of one streamed sequence: a response per delta, with the log-probs of its tokens
        and their running sum when asked for."""
        cum = 0.0  # the log-probs sent so far, summed

        def emit(seq: Sequence, ids: list[int], text: str | None) -> None:
            nonlocal cum
            sent = len(seq.tokens)  # every token made so far is in this delta or was sent before
            lp = seq.logprobs[sent - len(ids):sent] if seq.params.logprobs else None
            if lp is not None:
                cum += sum(lp)
            self.responder.send(sender, self._response(response_tensors(
                ids, text, len(req.prompt_ids), sent, lp, cum if lp is not None else None, index)))

        return emit

    def _finish(self, req: ServeRequest, seq: Sequence, sender, request_id: str, index: int | None,
                last: bool) -> None:
        """A sequence's last response: its error, its whole output (not streamed), and after the
        request's last sequence the final flag."""
        if seq.finish == "error":
            return self._final(sender, self._error(str(seq.error), self.pb.TritonError.INTERNAL))
        if seq.finish == "cancelled":
            self.log.log_info(f"gptexport: request {request_id!r} cancelled by the client after "
                              f"{len(seq.tokens)} of {req.max_tokens} tokens")
        response = None
        if seq.finish != "cancelled" and not req.stream:
            tokenizer, text = self.model.tokenizer, None
            if tokenizer is not None:
                text = tokenizer.decode(seq.tokens)
                if not req.exclude_input:  # as TensorRT-LLM: a whole (non-streamed) output starts with the prompt
                    prompt = req.prompt_text if req.prompt_text is not None else tokenizer.decode(req.prompt_ids)
                    text = prompt + text
            logprobs = seq.logprobs if seq.params.logprobs else None
            response = self._response(response_tensors(seq.tokens, text, len(req.prompt_ids), len(seq.tokens),
                                                       logprobs, sum(logprobs) if logprobs is not None else None,
                                                       index))
        if last:
            self._final(sender, response)
        elif response is not None:
            self.responder.send(sender, response)

    def _final(self, sender, response) -> None:
        """The request's last response (or the final flag alone), after all it queued before."""
        self.responder.send(sender, response, self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL, forget=True)

    def _response(self, arrays: dict[str, np.ndarray]):
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(k, v) for k, v in arrays.items()])

    def _error(self, message: str, code):
        return self.pb.InferenceResponse(error=self.pb.TritonError(message, code))
