"""`GET /metrics` of the OpenAI front: the scheduler's series as the front sees its requests, in
Prometheus' text format (prometheus_client), followed by Triton's own metrics re-exported.

The series are named as vLLM names its own (`vllm:num_requests_running` -> `gptexport:...`), so
dashboards built for it need only the prefix changed. They count requests made through the
front; Triton's `nv_inference_*` series (appended) count every request, the native endpoints'
included. A request is waiting until its first token comes back (queued in the model's scheduler
or in its prefill), running after.
"""

from __future__ import annotations

import time
import urllib.request

PREFIX = "gptexport:"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class FrontMetrics:
    """The front's series in a registry of its own (not the process-wide default one)."""

    def __init__(self, triton_metrics_url: str | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no `_created` twin of every series (Triton's and vLLM's have none)

        self.registry = CollectorRegistry()
        self.triton_metrics_url = triton_metrics_url

        def labelled(kind, name, doc, labels=("model_name",), **kw):
            return kind(PREFIX + name, doc, labels, registry=self.registry, **kw)

        self.running = labelled(Gauge, "num_requests_running", "Requests generating tokens.")
        self.waiting = labelled(Gauge, "num_requests_waiting", "Requests not yet given their first token.")
        self.prompt_tokens = labelled(Counter, "prompt_tokens", "Prompt tokens of the requests (prefill).")
        self.generation_tokens = labelled(Counter, "generation_tokens", "Tokens generated.")
        self.ttft = labelled(Histogram, "time_to_first_token_seconds", "From a request's arrival to its first token.",
                             buckets=TTFT_BUCKETS)
        self.tpot = labelled(Histogram, "time_per_output_token_seconds", "Between a sequence's tokens after the first.",
                             buckets=TPOT_BUCKETS)
        self.finished = labelled(Counter, "request_success", "Sequences (choices) finished, by finish_reason.",
                                 ("model_name", "finished_reason"))
        self.errors = labelled(Counter, "request_errors", "Requests answered with an error, by HTTP status.",
                               ("model_name", "status"))
        self.cancelled = labelled(Counter, "request_cancelled", "Requests whose client went away before the end.")

    def text(self) -> bytes:
        """The exposition: our series, then Triton's (if it serves metrics and answers)."""
        from prometheus_client import generate_latest

        ours = generate_latest(self.registry)
        if not self.triton_metrics_url:
            return ours
        try:
            with urllib.request.urlopen(self.triton_metrics_url, timeout=2) as r:
                return ours + r.read()
        except OSError:
            return ours  # Triton stopping or restarting: ours are still true


class RequestTimer:
    """One request's passage through the metrics: waiting, then running, then finished."""

    def __init__(self, metrics: FrontMetrics, model: str):
        self.m, self.model = metrics, model
        self.start = time.perf_counter()
        self.last: dict[int, float] = {}  # sequence (choice) -> when its last tokens came
        self.first = False
        metrics.waiting.labels(model).inc()

    def tokens(self, count: int, sequence: int = 0) -> None:
        now = time.perf_counter()
        if not self.first:
            self.first = True
            self.m.ttft.labels(self.model).observe(now - self.start)
            self.m.waiting.labels(self.model).dec()
            self.m.running.labels(self.model).inc()
        elif count and sequence in self.last:
            self.m.tpot.labels(self.model).observe((now - self.last[sequence]) / count)
        self.last[sequence] = now
        self.m.generation_tokens.labels(self.model).inc(count)

    def end(self, prompt_tokens: int | None = None, reasons: list[str] = (), status: int | None = None,
            cancelled: bool = False) -> None:
        (self.m.running if self.first else self.m.waiting).labels(self.model).dec()
        if prompt_tokens:
            self.m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        for reason in reasons:
            self.m.finished.labels(self.model, reason).inc()
        if status is not None:
            self.m.errors.labels(self.model, str(status)).inc()
        if cancelled:
            self.m.cancelled.labels(self.model).inc()
