"""llama.cpp's `llama-server` for the load scripts: on 127.0.0.1 at a free port, stopped on exit.

The binary is the one `bash scripts/prepare_peers.sh` built (listed in $GPTEXPORT_PEERS/peers.json,
default ~/.cache/gptexport-peers). The server's prompt cache in RAM (`--cache-ram`, on by default:
it saves a reused slot's KV cells to RAM and searches them for each new prompt) is off, and every
request is sent with `cache_prompt: false`, so that it prefills every prompt whole, as our server does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from gptexport.bench.peers import PREPARE, peers_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_binary(peers: str | Path | None = None) -> Path:
    """llama-server's path from peers.json; SystemExit with one line when it is not there."""
    listing = peers_dir(peers) / "peers.json"
    try:
        path = json.loads(listing.read_text()).get("llama-server")
    except (OSError, ValueError, AttributeError) as e:
        raise SystemExit(f"error: {listing}: cannot read it ({e}): run {PREPARE}") from None
    if not path or not os.access(path, os.X_OK):
        raise SystemExit(f"error: {listing}: no runnable llama-server listed (got {path!r}): run {PREPARE}")
    return Path(path)


class LlamaServer:
    """`llama-server -m GGUF -np SLOTS -cb -t THREADS -c SLOTS*SLOT_CTX --cache-ram 0` as a context manager."""

    def __init__(self, binary: Path, gguf: Path, threads: int, log: Path, slots: int = 16, slot_ctx: int = 1024,
                 ready_timeout_s: float = 180):
        self.port = free_port()
        self.log, self.ready_timeout_s = log, ready_timeout_s
        self.cmd = [str(binary), "-m", str(gguf), "-np", str(slots), "-cb", "-t", str(threads),
                    "-c", str(slots * slot_ctx), "--cache-ram", "0", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LlamaServer":
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: llama-server exited with code {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):  # 503 while the model loads, refused before it listens
                pass
            time.sleep(0.3)
        raise SystemExit(f"error: llama-server not ready after {self.ready_timeout_s:.0f} s: {self.tail()}")

    def tail(self, lines: int = 3) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:]) or "no output"
        except OSError:
            return "no log"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
