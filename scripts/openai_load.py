"""The OpenAI front under load, against Triton's own generate_stream endpoint in the same run.

    python scripts/openai_load.py out/shakespeare
    python scripts/openai_load.py GPT2_DIR --prompt-tokens 64 --max-tokens 128 --requests 1
    python scripts/openai_load.py out/shakespeare --ragged   # prompts of 10 to 400 tokens

Starts `gptexport serve` as a user runs it (a subprocess: tritonserver and the front; one
instance, --max-batch 16) on a repository of MODEL_DIR, then:

1. The front's cost: --rounds rounds, each the same --clients streaming clients through Triton's
   HTTP generate_stream, through Triton's gRPC stream (tritonclient's threaded client: the path
   the front takes, without the front), then through the front's /v1/completions (stream,
   include_usage), the same seeds and prompts, --max-tokens tokens each (no stop word): output
   tokens/s and the first token's p50 each way, and their ratios. The kinds alternate, so a
   change in the machine's load falls on all; the HTTP clients are the same plain http.client
   SSE readers.
2. Robustness: the same clients through /v1/completions with 1 request in 10 malformed (a bad
   temperature, an unknown model, n 17, logprobs 5, a body that is not JSON) and 1 in 7 dropped
   after 3 chunks. Every good request must come back with its tokens and the text the native
   endpoint gave for its seed, every bad one with its OpenAI error and status, every dropped one
   cancelled in the model (the server log says so), and afterwards nothing running or waiting
   (/metrics) and the server still serving. Exits 1 if any of it fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from llama_server import free_port  # noqa: E402 (scripts/ is the script's own folder on sys.path)
from serve_load import PROMPT, draw_request, run_threads  # noqa: E402

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.serve.repository import write_repository

MALFORMED = [({"temperature": -1}, 400, "temperature must be"), ({"model": "nope"}, 404, "does not exist"),
             ({"n": 17}, 400, "less than or equal to 16"), ({"logprobs": 5}, 400, "logprobs 5 is not supported"),
             (None, 400, "the body is not valid JSON")]


def prompt_of(seed: int, args, vocab: int) -> str | list[int]:
    """The prompt of `seed`: serve_load.py's ragged draw (--ragged: 10 to 400 tokens, log-uniform),
    --prompt-tokens random ids, or PROMPT's text."""
    if args.ragged:
        return list(draw_request("ragged", seed, vocab, args.block_size).prompt_ids)
    return np.random.default_rng(seed).integers(0, vocab, args.prompt_tokens).tolist() if args.prompt_tokens else PROMPT


def native_once(port: int, max_tokens: int, seed: int, prompt) -> dict:
    """One streamed generate_stream request (as serve_load.py's client), keeping the text."""
    body = {**({"input_ids": prompt} if isinstance(prompt, list) else {"text_input": prompt}),
            "max_tokens": max_tokens, "seed": seed, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v2/models/m/generate_stream", json.dumps(body))
    resp, ttft, tokens, text = conn.getresponse(), None, 0, []
    while line := resp.readline():
        if line.startswith(b"data: "):
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            ttft = ttft if ttft is not None else time.perf_counter() - start
            tokens, text = event["num_output_tokens"], text + [event.get("text_output", "")]
    conn.close()
    return {"ttft": ttft, "tokens": tokens, "text": "".join(text)}


def grpc_once(port: int, max_tokens: int, seed: int, prompt) -> dict:
    """The same request through Triton's gRPC stream with tritonclient's own (threaded) client:
    what a gRPC stream per request costs without the front."""
    import queue

    import tritonclient.grpc as grpcclient

    arrays = {"max_tokens": (np.array([[max_tokens]], np.int32), "INT32"),
              "seed": (np.array([[seed]], np.uint64), "UINT64"),
              "stream": (np.array([[True]]), "BOOL"),
              **({"input_ids": (np.array([prompt], np.int32), "INT32")} if isinstance(prompt, list)
                 else {"text_input": (np.array([[prompt.encode()]], np.object_), "BYTES")})}
    inputs = []
    for name, (array, dtype) in arrays.items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), dtype))
        inputs[-1].set_data_from_numpy(array)
    client, results = grpcclient.InferenceServerClient(f"127.0.0.1:{port}"), queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    start, ttft, tokens = time.perf_counter(), None, 0
    try:
        client.async_stream_infer("m", inputs, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=300)
            if error is not None:
                raise RuntimeError(str(error))
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            ttft = ttft if ttft is not None else time.perf_counter() - start
            tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
    finally:
        client.stop_stream()
        client.close()
    return {"ttft": ttft, "tokens": tokens}


def openai_once(port: int, max_tokens: int, seed: int, prompt, fields: dict | None = None,
                cancel_after: int | None = None) -> dict:
    """One streamed /v1/completions request: status, ttft, tokens (from the usage chunk), text, error.
    `fields` None: a body that is not JSON."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}, **(fields or {})}
    raw = b"{not json" if fields is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", raw, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = {"status": resp.status, "ttft": None, "tokens": 0, "text": "", "error": None, "chunks": 0}
    if resp.status != 200:
        out["error"] = json.loads(resp.read())["error"]
        conn.close()
        return out
    while line := resp.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        event = json.loads(line[6:])
        if "error" in event:
            out["error"] = event["error"]
            break
        out["chunks"] += 1
        for choice in event["choices"]:
            if choice["text"] and out["ttft"] is None:
                out["ttft"] = time.perf_counter() - start
            out["text"] += choice["text"]
        if event.get("usage"):
            out["tokens"] = event["usage"]["completion_tokens"]
        if cancel_after is not None and out["chunks"] == cancel_after:
            conn.sock.shutdown(socket.SHUT_RDWR)  # as a killed client
            break
    conn.close()
    return out


def run(clients: int, requests: int, one) -> tuple[dict[int, dict], float]:
    """`clients` threads, each `requests` calls of one(seed) back to back: results by seed, wall time."""
    return run_threads(clients, requests, one, timeout_s=900)


def summary(results: dict[int, dict], wall: float) -> dict:
    return {"tok_s": sum(r["tokens"] for r in results.values()) / wall,
            "ttft_p50_ms": 1000 * statistics.median(r["ttft"] for r in results.values())}


def overhead(args, ports: dict, vocab: int) -> tuple[list[dict], dict[int, dict]]:
    rows, native_texts = [], {}
    clients = {"native": lambda s: native_once(ports["http"], args.max_tokens, s,
                                               prompt_of(s, args, vocab)),
               "grpc": lambda s: grpc_once(ports["grpc"], args.max_tokens, s, prompt_of(s, args, vocab)),
               "openai": lambda s: openai_once(ports["openai"], args.max_tokens, s,
                                               prompt_of(s, args, vocab), {})}
    for round_ in range(args.rounds):
        for kind, one in clients.items():
            results, wall = run(args.clients, args.requests, one)
            if kind == "native":
                native_texts = {s: r["text"] for s, r in results.items()}
            elif any(r["tokens"] != args.max_tokens or r.get("error") for r in results.values()):
                raise SystemExit("an OpenAI request of the overhead run did not get its tokens")
            rows.append({"round": round_, "kind": kind, **summary(results, wall)})
            print(f"round {round_} {kind}: {rows[-1]['tok_s']:.1f} tok/s, TTFT p50 {rows[-1]['ttft_p50_ms']:.0f} ms",
                  file=sys.stderr)
    return rows, native_texts


def robustness(args, ports: dict, vocab: int, native_texts: dict[int, dict], log: Path) -> list[str]:
    """The mixed run; the problems found (none: it passed)."""
    plan = {}
    for i, seed in enumerate(sorted(1000 * c + r for c in range(args.clients) for r in range(args.requests))):
        plan[seed] = ("bad", MALFORMED[(i // 10) % len(MALFORMED)]) if i % 10 == 3 else \
            ("drop", None) if i % 7 == 5 else ("good", None)
    cancels_before = log.read_text(errors="replace").count("cancelled by the client")

    def one(seed: int) -> dict:
        kind, bad = plan[seed]
        prompt = prompt_of(seed, args, vocab)
        if kind == "bad":
            return openai_once(ports["openai"], args.max_tokens, seed, prompt, bad[0])
        return openai_once(ports["openai"], args.max_tokens, seed, prompt, {}, 3 if kind == "drop" else None)

    results, wall = run(args.clients, args.requests, one)
    problems = []
    for seed, (kind, bad) in plan.items():
        r = results[seed]
        if kind == "good" and (r["error"] or r["tokens"] != args.max_tokens or r["text"] != native_texts[seed]):
            problems.append(f"good request {seed}: {r['error'] or 'tokens/text differ from the native endpoint'}")
        if kind == "bad" and (r["status"] != bad[1] or bad[2] not in r["error"]["message"]):
            problems.append(f"malformed request {seed}: status {r['status']}, {r['error']}")
    dropped = sum(kind == "drop" for kind, _ in plan.values())
    deadline = time.monotonic() + 30
    while log.read_text(errors="replace").count("cancelled by the client") - cancels_before < dropped and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    cancelled = log.read_text(errors="replace").count("cancelled by the client") - cancels_before
    if cancelled < dropped:
        problems.append(f"{dropped} requests dropped, {cancelled} cancelled in the model")
    problems += after_load(ports, args.max_tokens, vocab, args)
    counts = {k: sum(kind == k for kind, _ in plan.values()) for k in ("good", "bad", "drop")}
    print(f"mixed run: {counts['good']} good, {counts['bad']} malformed, {counts['drop']} dropped "
          f"({cancelled} cancels logged) in {wall:.1f} s: {'OK' if not problems else 'NOT OK'}", file=sys.stderr)
    return problems


def after_load(ports: dict, max_tokens: int, vocab: int, args) -> list[str]:
    """Nothing left running or waiting, and the server still serves."""
    conn = http.client.HTTPConnection("127.0.0.1", ports["openai"], timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    left = [m for m in re.findall(r'gptexport:num_requests_(?:running|waiting)\{[^}]*\} ([0-9.]+)', text)
            if float(m) != 0]
    again = openai_once(ports["openai"], 4, 7, prompt_of(7, args, vocab), {})
    return ([f"after the run: requests still running or waiting ({left})"] if left else []) + \
        ([] if again["tokens"] == 4 else [f"after the run the server did not serve: {again}"])


def start_serve(repo: Path, log: Path) -> tuple[subprocess.Popen, dict]:
    ports = {"http": free_port(), "grpc": free_port(), "openai": free_port()}
    proc = subprocess.Popen([sys.executable, "-m", "gptexport", "serve", str(repo), "--http-port", str(ports["http"]),
                             "--grpc-port", str(ports["grpc"]), "--openai-port", str(ports["openai"]), "--verbose"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while "Ctrl-C to stop" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gptexport serve did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    return proc, ports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=0, help="random prompts of this many tokens (0: PROMPT)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ragged", action="store_true",
                    help="each request's prompt drawn as serve_load.py's ragged load draws it (10 to 400 tokens)")
    args = ap.parse_args()
    config = load_model_dir(args.model_dir, verify=False).config
    vocab, args.block_size = config.vocab_size, config.block_size
    with tempfile.TemporaryDirectory(prefix="openai-load-") as tmp:
        repo = write_repository(args.model_dir, Path(tmp) / "repo", name="m", max_batch=16, max_tokens=4096)
        log = Path(tmp) / "serve.log"
        load_before = os.getloadavg()[0]
        proc, ports = start_serve(repo, log)
        try:
            native_once(ports["http"], 4, 1, prompt_of(1, args, vocab))  # warm-up
            rows, native_texts = overhead(args, ports, vocab)
            problems = robustness(args, ports, vocab, native_texts, log)
        finally:
            proc.send_signal(2)
            proc.wait(60)
    report(args, rows, load_before)
    for p in problems:
        print(f"NOT OK: {p}")
    sys.exit(1 if problems else 0)


def report(args, rows: list[dict], load_before: float) -> None:
    names = {"native": "HTTP generate_stream", "grpc": "gRPC stream (tritonclient)", "openai": "/v1/completions"}
    print("| round | endpoint | output tok/s | TTFT p50 ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {names[r['kind']]} | {r['tok_s']:.1f} | {r['ttft_p50_ms']:.0f} |")
    mean = {k: statistics.mean(r["tok_s"] for r in rows if r["kind"] == k) for k in names}
    ttft = {k: statistics.mean(r["ttft_p50_ms"] for r in rows if r["kind"] == k) for k in names}
    print(f"\n/v1/completions: {mean['openai'] / mean['native']:.2f}× the native endpoint's tokens/s "
          f"({mean['grpc'] / mean['native']:.2f}× for the plain gRPC client), TTFT p50 {ttft['openai']:.0f} ms "
          f"against {ttft['native']:.0f} ms ({ttft['grpc']:.0f} ms over gRPC) ({args.clients} clients, "
          f"{args.requests} requests each per round, {args.max_tokens} tokens, {args.rounds} rounds; "
          f"load average 1 min before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
