"""The OpenAI front as `gptexport serve` runs it: uvicorn in a thread of the serve process.

So the front and tritonserver are one process tree: the serve process (the front in it) and its
child tritonserver. Uvicorn installs no signal handlers off the main thread: Ctrl-C / SIGTERM
reach serve, which stops the front (`stop`) and Triton. The front's port is bound before Triton
starts, so /health answers 503 while the model loads and 200 once it is ready.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from ..errors import GptExportError

START_TIMEOUT_S = 30
GRACE_S = 3  # open streams are given this long when stopping, then closed


class OpenAIFront:
    """The front of `repo`'s models on `address:port`, forwarding to Triton's gRPC at `grpc_url`."""

    def __init__(self, repo: Path, grpc_url: str, address: str, port: int, triton_metrics_url: str | None = None):
        # the front's gRPC channel is open when serve forks tritonserver: no fork handlers (and no warning)
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        import uvicorn

        from .openai_api import create_app, front_models
        from .openai_metrics import FrontMetrics

        self.models = front_models(repo)
        self.address, self.port = address, port
        app = create_app(self.models, grpc_url, FrontMetrics(triton_metrics_url))
        config = uvicorn.Config(app, host=address, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=GRACE_S, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        _log_to_stderr()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Serve from a thread; returns once the port listens (GptExportError if it cannot)."""
        self.thread = threading.Thread(target=self._run, name="gptexport-openai", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise GptExportError(f"the OpenAI front could not start on {self.address}:{self.port}: "
                                     f"{self.error or 'no answer'}")
            time.sleep(0.05)

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as e:  # uvicorn exits with SystemExit when it cannot bind
            self.error = e

    def failed(self) -> str | None:
        """Why the front stopped, if it stopped without being asked to."""
        if self.thread is not None and not self.thread.is_alive() and not self.server.should_exit:
            return f"the OpenAI front stopped ({self.error or 'its server exited'})"
        return None

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(GRACE_S + 5)
            if self.thread.is_alive():
                self.server.force_exit = True
                self.thread.join(5)


def _log_to_stderr() -> None:
    log = logging.getLogger("gptexport.openai")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("openai front: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
