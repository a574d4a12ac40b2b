"""Load on a real tritonserver, and on llama.cpp's llama-server on the same weights in the same run:
tokens/s, time to first token (TTFT) and inter-token latency (ITL).

    python scripts/serve_load.py out/shakespeare --max-batch 1 16 --concurrency 1 4 16
    python scripts/serve_load.py GPT2_DIR --prompt-tokens 64 --max-batch 1 16 --concurrency 1 4 16
    python scripts/serve_load.py GPT2_DIR --load ragged burst --concurrency 1 4 16 --llama-gguf model-f32.gguf

Loads (--load, one or more; each gets its own table):
  fixed   (the default) each of --concurrency clients sends --requests requests back to back, each
          PROMPT's text or, with --prompt-tokens N, N random token ids, for --max-tokens tokens.
  ragged  the same clients, but each request's prompt length is drawn log-uniform from 10 to 400
          tokens (many short prompts, some long: chat turns beside documents) and its output length
          uniform from 32 to 256.
  burst   --burst requests (16) sent at once, one per client: prompts uniform from 10 to 900 tokens,
          outputs as ragged.
Ragged and burst prompts are random token ids (`input_ids`); where prompt + output would reach the
model's block_size the output is shortened (prompt + output < block_size), so neither server slides
a window or runs out of context. A request is a function of its seed (1000 * client + request):
every server gets the same requests. Every request samples with temperature 0.8, top-k 200 and its
seed, has no stop word and streams every token; one that does not bring exactly its max tokens
counts as failed (listed; exit status 1).

For each (--instances, --max-batch) it writes a repository (`gptexport triton`) and starts a
tritonserver on 127.0.0.1 (`gptexport serve`'s TritonServer, free ports): requests go to HTTP
generate_stream. With --llama-gguf (the same weights converted by llama.cpp's convert_hf_to_gguf.py,
`--outtype f32` for an fp32 model directory) it also starts `llama-server -np 16 -cb -t THREADS`
(THREADS: ours) from prepare_peers.sh, with no prompt cache (scripts/llama_server.py), and sends each
request to its streaming /completion: the ids as `prompt`, `n_predict`, `ignore_eos`, the same
temperature, top_k and seed, `samplers` top_k then temperature (its default chain adds top-p 0.95
and min-p 0.05), `cache_prompt` false. Its last event must say it stopped at the limit, without
truncation, with nothing taken from a cache and the whole prompt evaluated.
Every server is up for the whole run and each concurrency level goes to each server in turn, so a
change in the machine's load falls on all of them. Measured the same way for every server: TTFT from
sending the request to the event that brings its first token; ITL the gaps between a request's
tokens' arrivals (tokens that come in one event: gaps of 0); tokens/s all tokens of a level over
its wall time. The fixed load also times one in-process generate() (the work of `gptexport
generate`) before and after: what the server layer costs or gains. The load average is printed
before and after: other processes on the machine move every number.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from llama_server import LlamaServer, free_port, llama_server_binary  # noqa: E402 (scripts/ is on sys.path)

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.bench.run import cpu
from gptexport.errors import GptExportError
from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.session import DEFAULT_MAX_BATCH, GenerationSession
from gptexport.serve.model import cpu_threads
from gptexport.serve.repository import write_repository
from gptexport.serve.server import TritonServer

PROMPT = "ROMEO:"
TEMPERATURE, TOP_K = 0.8, 200
LLAMA_SLOTS = 16
REQUEST_TIMEOUT_S = 600


@dataclass(frozen=True)
class Shape:
    prompt: tuple[int, int]  # fewest and most prompt tokens
    log_uniform: bool  # prompt lengths log-uniform (many short, a few long), else uniform
    output: tuple[int, int]  # fewest and most output tokens, uniform


SHAPES = {"ragged": Shape((10, 400), True, (32, 256)), "burst": Shape((10, 900), False, (32, 256))}
LOADS = ("fixed", *SHAPES)


@dataclass(frozen=True)
class Request:
    seed: int
    prompt_ids: tuple[int, ...]  # empty: PROMPT's text
    max_tokens: int


def draw_request(load: str, seed: int, vocab: int, block_size: int, prompt_tokens: int = 0,
                 max_tokens: int = 128) -> Request:
    """The request of `seed` in `load`: the same for every server, in every run."""
    rng = np.random.default_rng(seed)
    if load == "fixed":
        return Request(seed, tuple(rng.integers(0, vocab, prompt_tokens).tolist()) if prompt_tokens else (),
                       max_tokens)
    shape = SHAPES[load]
    (lo, hi), (out_lo, out_hi) = shape.prompt, shape.output
    n = (round(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if shape.log_uniform
         else int(rng.integers(lo, hi + 1)))
    out = int(rng.integers(out_lo, out_hi + 1))
    # prompt + output < block_size: llama-server ends a slot's generation at its context (no shift)
    n = max(1, min(n, block_size - 1 - out_lo))
    out = max(1, min(out, block_size - 1 - n))
    return Request(seed, tuple(rng.integers(0, vocab, n).tolist()), out)


@dataclass
class Result:
    request: Request
    start: float = 0.0  # perf_counter when the request was sent
    token_times: list[float] = field(default_factory=list)  # perf_counter when each token arrived
    error: str | None = None
    held_back: int = 0  # llama-server: tokens counted but not in any event's `tokens` (incomplete UTF-8)

    @property
    def complete(self) -> bool:
        return self.error is None and len(self.token_times) == self.request.max_tokens


def stream_events(port: int, path: str, body: dict, max_lines: int,
                  timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[float, list[tuple[float, dict]]]:
    """POST `body` and read its server-sent events: (send time, [(arrival time, event)]), bounded in
    lines and time."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        start = time.perf_counter()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read(300).decode(errors='replace')}")
        events = []
        for _ in range(max_lines):
            line = resp.readline()
            if not line:
                return start, events
            if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                events.append((time.perf_counter(), json.loads(line[6:])))
            if time.perf_counter() - start > timeout_s:
                raise RuntimeError(f"the stream took more than {timeout_s:.0f} s")
        raise RuntimeError(f"more than {max_lines} lines in the stream")
    finally:
        conn.close()


def token_arrivals(events: list[tuple[float, dict]], count: Callable[[dict], int]) -> list[float]:
    """When each token arrived: an event whose running token count rose by k brings k tokens at its time."""
    times: list[float] = []
    for t, event in events:
        if "error" in event:
            raise RuntimeError(f"error event: {event['error']}")
        times += [t] * max(0, count(event) - len(times))
    return times


def measure(req: Request, fetch: Callable[[], tuple[float, list]], count: Callable[[dict], int],
            check: Callable[[Result, list], str | None] = lambda result, events: None) -> Result:
    """One streamed request, its failure (an exception, a wrong token count, `check`'s complaint) kept
    in the result: one bad request never ends the run."""
    result = Result(req)
    try:
        result.start, events = fetch()
        result.token_times = token_arrivals(events, count)
        n = len(result.token_times)
        result.error = check(result, events) or (None if n == req.max_tokens else
                                                 f"{n} tokens, expected {req.max_tokens}")
    except (OSError, http.client.HTTPException, RuntimeError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def max_lines(req: Request) -> int:
    return 4 * req.max_tokens + 100  # an event and a blank line per token, the last events, pings


def send_ours(port: int, model: str, req: Request) -> Result:
    prompt = {"input_ids": list(req.prompt_ids)} if req.prompt_ids else {"text_input": PROMPT}
    body = {**prompt, "max_tokens": req.max_tokens, "seed": req.seed, "temperature": TEMPERATURE, "top_k": TOP_K,
            "stream": True}
    return measure(req, lambda: stream_events(port, f"/v2/models/{model}/generate_stream", body, max_lines(req)),
                   lambda event: int(event.get("num_output_tokens", 0)))


def llama_check(result: Result, events: list[tuple[float, dict]]) -> str | None:
    """What the last event of llama-server's /completion stream says went otherwise than asked."""
    last = events[-1][1] if events else {}
    if last.get("stop") is not True:
        return "the stream ended without its last event"
    result.held_back = last.get("tokens_predicted", 0) - sum(len(e.get("tokens", ())) for _, e in events[:-1])
    said = {**last, "cache_n": last.get("timings", {}).get("cache_n")}  # prompt tokens taken from a cache
    wrong = [f"{key} {said.get(key)!r}, expected {want!r}" for key, want in
             (("stop_type", "limit"), ("truncated", False), ("cache_n", 0),
              ("tokens_evaluated", len(result.request.prompt_ids))) if said.get(key) != want]
    return "; ".join(wrong) or None


def send_llama(port: int, req: Request) -> Result:
    body = {"prompt": list(req.prompt_ids), "n_predict": req.max_tokens, "ignore_eos": True,
            "temperature": TEMPERATURE, "top_k": TOP_K, "samplers": ["top_k", "temperature"], "seed": req.seed,
            "cache_prompt": False, "stream": True}
    return measure(req, lambda: stream_events(port, "/completion", body, max_lines(req)),
                   lambda event: int(event.get("tokens_predicted", 0)), llama_check)


def run_threads(clients: int, requests: int, one, timeout_s: float = 1800) -> tuple[dict[int, object], float]:
    """`clients` threads, each `requests` calls of one(seed) back to back (seed 1000 * client + request),
    all starting at once: results by seed, and the wall time. Any failure, or a client not done by
    `timeout_s`, ends the run."""
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    start_together = threading.Barrier(clients)

    def client(i: int) -> None:
        try:
            start_together.wait(60)
            for r in range(requests):
                results[1000 * i + r] = one(1000 * i + r)
        except Exception as e:  # reported below; a load run must not hang on one failure
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    deadline = start + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    if errors or any(t.is_alive() for t in threads):
        raise SystemExit(f"load run failed: {errors[:1] or 'a client did not finish'}")
    return results, time.perf_counter() - start


def percentile_ms(values: list[float], q: float) -> float:
    return 1000 * float(np.percentile(values, q)) if values else float("nan")


def summarize(results: list[Result], wall: float) -> dict:
    """A level's figures: tokens/s over its wall time, TTFT and ITL percentiles, what failed."""
    ttfts = [r.token_times[0] - r.start for r in results if r.token_times]
    gaps = [g for r in results for g in np.diff(r.token_times).tolist()]
    tokens = sum(len(r.token_times) for r in results)
    failures = [f"seed {r.request.seed} ({len(r.request.prompt_ids)}-token prompt, {r.request.max_tokens} tokens): "
                f"{r.error or f'{len(r.token_times)} tokens'}" for r in results if not r.complete]
    return {"requests": len(results), "complete": len(results) - len(failures), "failures": failures,
            "tokens": tokens, "wall_s": wall, "req_s": len(results) / wall, "tok_s": tokens / wall,
            "ttft_p50_ms": percentile_ms(ttfts, 50), "ttft_p99_ms": percentile_ms(ttfts, 99),
            "itl_p50_ms": percentile_ms(gaps, 50), "itl_p99_ms": percentile_ms(gaps, 99),
            "held_back": sum(r.held_back for r in results)}


@dataclass
class Target:
    name: str
    send: Callable[[Request], Result]
    instances: int = 1
    max_batch: int = 0  # 0: not ours


def start_ours(stack: ExitStack, model_dir: Path, work: Path, instances: int, max_batch: int, threads: int) -> Target:
    repo = write_repository(model_dir, work / f"repo-i{instances}-mb{max_batch}", name="m", instances=instances,
                            max_batch=max_batch)
    if threads:
        config = repo / "m" / "config.pbtxt"
        default = 'key: "threads" value: { string_value: "0" }'
        config.write_text(config.read_text().replace(default, f'key: "threads" value: {{ string_value: "{threads}" }}'))
    server = stack.enter_context(TritonServer(repo, http_port=free_port(), grpc_port=free_port()))
    name = f"gptexport serve{f' --instances {instances}' if instances > 1 else ''} --max-batch {max_batch}"
    return Target(name, lambda req: send_ours(server.http_port, "m", req), instances, max_batch)


def in_process_baseline(model_dir: Path, max_tokens: int, repeats: int = 15) -> float:
    """Tokens/s of one generate() in this process with the runner of one served instance (its
    threads), the sampling of a request's defaults: what a request costs without the server."""
    def params(seed: int) -> GenerationParams:
        return GenerationParams(max_tokens, SamplingParams(TEMPERATURE, TOP_K, None), seed)

    with GenerationSession.open(model_dir, threads=cpu_threads(1)) as session:
        prompt = session.encode(PROMPT) if session.tokenizer else [0]
        session.generate(prompt, params(0))  # warm-up
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            session.generate(prompt, params(i))
            times.append(time.perf_counter() - t)
    return max_tokens / statistics.median(times)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--load", nargs="+", choices=LOADS, default=["fixed"])
    ap.add_argument("--instances", type=int, nargs="+", default=[1])
    ap.add_argument("--max-batch", type=int, nargs="+", default=None,
                    help=f"the repositories' --max-batch [default: 1 16 for fixed alone, else {DEFAULT_MAX_BATCH}]")
    ap.add_argument("--threads", type=int, default=0,
                    help="ONNX Runtime threads per instance and llama-server's -t (0: the server's default)")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="fixed: random prompts of this many tokens "
                                                                 "(0: PROMPT)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per client (fixed, ragged)")
    ap.add_argument("--burst", type=int, default=16, help="requests sent at once in the burst load")
    ap.add_argument("--max-tokens", type=int, default=128, help="fixed: tokens per request")
    ap.add_argument("--llama-gguf", type=Path, default=None,
                    help="also load llama-server on this GGUF (the same weights as MODEL_DIR)")
    ap.add_argument("--peers", type=Path, default=None,
                    help="where prepare_peers.sh put llama.cpp [default: $GPTEXPORT_PEERS or ~/.cache/gptexport-peers]")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.max_batch is None:
        args.max_batch = [1, 16] if args.load == ["fixed"] else [DEFAULT_MAX_BATCH]
    if args.llama_gguf is not None and not args.llama_gguf.is_file():
        ap.error(f"--llama-gguf {args.llama_gguf}: no such file")
    args.llama_binary = llama_server_binary(args.peers) if args.llama_gguf else None  # before any server starts
    if args.llama_gguf is not None and "fixed" in args.load and not args.prompt_tokens:
        ap.error("--llama-gguf with the fixed load needs --prompt-tokens N (llama-server gets token ids)")
    if min(args.concurrency + args.instances + args.max_batch + [args.requests, args.burst]) < 1:
        ap.error("--concurrency, --instances, --max-batch, --requests and --burst must be >= 1")
    return args


def levels(load: str, args: argparse.Namespace) -> list[tuple[int, int]]:
    """(clients, requests per client) of each level of `load`."""
    return [(args.burst, 1)] if load == "burst" else [(c, args.requests) for c in args.concurrency]


def run_loads(args: argparse.Namespace, vocab: int, block_size: int, work: Path) -> tuple[list[dict], list[str]]:
    """Start every server, send each level of each load to each in turn: the rows, and each llama-server's command."""
    rows, commands = [], []
    with ExitStack() as stack:
        targets = [start_ours(stack, args.model_dir, work, i, mb, args.threads)
                   for i in args.instances for mb in args.max_batch]
        if args.llama_gguf:
            llama = stack.enter_context(LlamaServer(args.llama_binary, args.llama_gguf,
                                                    args.threads or cpu_threads(1), work / "llama-server.log",
                                                    LLAMA_SLOTS, block_size))
            commands.append(" ".join(llama.cmd))
            targets.append(Target(f"llama-server -np {LLAMA_SLOTS}", lambda req: send_llama(llama.port, req)))
        for load in args.load:
            def draw(seed: int, load: str = load) -> Request:
                return draw_request(load, seed, vocab, block_size, args.prompt_tokens, args.max_tokens)

            for target in targets:  # warm-up: one request a instance
                run_threads(target.instances, 1, lambda seed, t=target: t.send(draw(10**6 + seed)))
            for clients, per_client in levels(load, args):
                for target in targets:
                    by_seed, wall = run_threads(clients, per_client, lambda seed, t=target: t.send(draw(seed)))
                    row = {"load": load, "server": target.name, "instances": target.instances,
                           "max_batch": target.max_batch, "clients": clients,
                           **summarize(list(by_seed.values()), wall)}
                    rows.append(row)
                    print(f"{load}, {target.name}, {clients} clients: {row['tok_s']:.1f} tok/s, TTFT p50 "
                          f"{row['ttft_p50_ms']:.0f} ms, {row['complete']}/{row['requests']} complete",
                          file=sys.stderr)
    return rows, commands


def pair(ours: float, theirs: float, digits: int = 0) -> str:
    ratio = f" ({ours / theirs:.2f}×)" if theirs and not math.isnan(theirs) else ""
    return f"{ours:.{digits}f} / {theirs:.{digits}f}{ratio}"


def print_comparison(load: str, rows: list[dict], ours: str, llama: str) -> None:
    print(f"\n**{load}**: {ours} against {llama} (ratios: ours ÷ llama-server)\n")
    print("| clients | requests | gptexport tok/s | llama-server tok/s | ratio | TTFT p50 ours / llama ms | "
          "TTFT p99 ours / llama ms | ITL p50 ours / llama ms | ITL p99 ours / llama ms | complete (ours, llama) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for a in (r for r in rows if r["load"] == load and r["server"] == ours):
        b = next(r for r in rows if r["load"] == load and r["server"] == llama and r["clients"] == a["clients"])
        print(f"| {a['clients']} | {a['requests']} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | "
              f"**{a['tok_s'] / b['tok_s']:.2f}×** | {pair(a['ttft_p50_ms'], b['ttft_p50_ms'])} | "
              f"{pair(a['ttft_p99_ms'], b['ttft_p99_ms'])} | {pair(a['itl_p50_ms'], b['itl_p50_ms'], 1)} | "
              f"{pair(a['itl_p99_ms'], b['itl_p99_ms'], 1)} | {a['complete']}/{a['requests']}, "
              f"{b['complete']}/{b['requests']} |")


def print_fixed(rows: list[dict], baseline: float, baseline_after: float, args: argparse.Namespace) -> None:
    """The fixed load's table of our servers, against max-batch 1 and the in-process generate()."""
    ours = sorted((r for r in rows if r["load"] == "fixed" and r["max_batch"]),
                  key=lambda r: (r["instances"], r["max_batch"], r["clients"]))
    print("\n| instances | max-batch | clients | requests | req/s | tok/s | × max-batch 1 | × in-process | "
          "TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ours:
        one = next((o for o in ours if o["max_batch"] == 1 and o["clients"] == r["clients"]
                    and o["instances"] == r["instances"]), None)
        vs_one = f"{r['tok_s'] / one['tok_s']:.2f}×" if one else "–"
        print(f"| {r['instances']} | {r['max_batch']} | {r['clients']} | {r['requests']} | {r['req_s']:.2f} | "
              f"{r['tok_s']:.0f} | {vs_one} | {r['tok_s'] / ((baseline + baseline_after) / 2):.2f}× | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |")
    print(f"\nbaseline: in-process generate() {baseline:.0f} tok/s before, {baseline_after:.0f} after "
          f"({args.max_tokens} tokens, prompt {PROMPT!r}, {cpu_threads(1)} thread(s))")


def print_tables(rows: list[dict], args: argparse.Namespace) -> None:
    servers = list(dict.fromkeys(r["server"] for r in rows))
    llama = next((s for s in servers if s.startswith("llama-server")), None)
    for load in args.load:
        if llama:
            for ours in (s for s in servers if s != llama):
                print_comparison(load, rows, ours, llama)
        elif load != "fixed":
            print(f"\n**{load}**\n\n| server | clients | requests | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
                  f"| complete |\n|---|---|---|---|---|---|---|")
            for r in (r for r in rows if r["load"] == load):
                print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | "
                      f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / "
                      f"{r['itl_p99_ms']:.1f} | {r['complete']}/{r['requests']} |")


def describe(args: argparse.Namespace, block_size: int) -> str:
    parts = []
    for load in args.load:
        if load == "fixed":
            prompt = f"{args.prompt_tokens} random token ids" if args.prompt_tokens else repr(PROMPT)
            parts.append(f"fixed: prompt {prompt}, {args.max_tokens} tokens")
        else:
            s = SHAPES[load]
            parts.append(f"{load}: prompts {'log-uniform' if s.log_uniform else 'uniform'} {s.prompt[0]}–{s.prompt[1]} "
                         f"random token ids, outputs uniform {s.output[0]}–{s.output[1]} (prompt + output < "
                         f"{block_size})")
    return "; ".join(parts) + f"; temperature {TEMPERATURE}, top-k {TOP_K}, seeds 1000 × client + request, streamed"


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on kill, as on Ctrl-C
    args = parse_args()
    try:
        config = load_model_dir(args.model_dir, verify=False).config
    except GptExportError as e:
        raise SystemExit(f"error: {e}") from None
    cpu_name, flags = cpu()
    load_before = os.getloadavg()
    baseline = in_process_baseline(args.model_dir, args.max_tokens) if "fixed" in args.load else 0.0
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        rows, commands = run_loads(args, config.vocab_size, config.block_size, Path(tmp))
    load_after = os.getloadavg()
    print(f"CPU: {cpu_name} ({flags}), {len(os.sched_getaffinity(0))} cores; load average 1 min: "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"model: {args.model_dir}; {describe(args, config.block_size)}")
    for cmd in commands:
        print(f"llama-server: {cmd}")
    print_tables(rows, args)
    if "fixed" in args.load:
        baseline_after = in_process_baseline(args.model_dir, args.max_tokens)  # the machine may have changed
        print_fixed(rows, baseline, baseline_after, args)
    held_back = sum(r["held_back"] for r in rows)
    if held_back:
        print(f"\nllama-server held back {held_back} tokens (an incomplete UTF-8 character) and sent them with the "
              f"next token's event: counted from its tokens_predicted")
    failures = [f"{r['load']}, {r['server']}, {r['clients']} clients: {f}" for r in rows for f in r["failures"]]
    if args.json:
        args.json.write_text(json.dumps({"load_average": [load_before, load_after], "cpu": [cpu_name, flags],
                                         "llama_server": commands, "rows": rows}, indent=2))
    if failures:
        print(f"\n{len(failures)} request(s) failed:\n" + "\n".join(failures[:20]), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the servers were stopped on the way out
        print("interrupted: every server stopped", file=sys.stderr)
        sys.exit(130)
