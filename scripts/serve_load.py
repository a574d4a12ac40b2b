"""Load on a real tritonserver: requests/s, tokens/s, time to first token and inter-token latency.

    python scripts/serve_load.py out/shakespeare --max-batch 1 16 --concurrency 1 4 16
    python scripts/serve_load.py GPT2_DIR --prompt-tokens 64 --max-batch 1 16 --concurrency 1 4 16

For each (--instances, --max-batch) it writes a repository (`gptexport triton`), starts a
tritonserver on 127.0.0.1 (`gptexport serve`'s TritonServer), warms it up, then for each
--concurrency value runs that many clients, each streaming --requests requests back to back over
HTTP generate_stream (different seeds, --max-tokens tokens each, no stop word, so every request
makes exactly that many tokens). The prompt is PROMPT's text, or with --prompt-tokens N that many
random token ids (`input_ids`). TTFT is from sending the request to its first SSE event;
inter-token latency is the time between one request's consecutive events. The baseline, measured in
the same run, is one in-process `generate()` on this machine (the work of `gptexport generate`):
the ratios say what the server layer costs or gains. The load average is printed before and
after: other processes on the machine move every number.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.session import GenerationSession
from gptexport.serve.model import cpu_threads
from gptexport.serve.repository import write_repository
from gptexport.serve.server import TritonServer

PROMPT = "ROMEO:"


def stream_once(port: int, model: str, max_tokens: int, seed: int, prompt_tokens: int, vocab: int
                ) -> tuple[float, int, float, list[float]]:
    """One streamed request: (ttft s, tokens, total s, the gaps between its events in s)."""
    prompt = ({"input_ids": np.random.default_rng(seed).integers(0, vocab, prompt_tokens).tolist()} if prompt_tokens
              else {"text_input": PROMPT})
    body = json.dumps({**prompt, "max_tokens": max_tokens, "seed": seed, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    conn.request("POST", f"/v2/models/{model}/generate_stream", body)
    resp = conn.getresponse()
    ttft, tokens, stamps = None, 0, []
    while line := resp.readline():
        if line.startswith(b"data: "):
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            stamps.append(time.perf_counter())
            ttft = ttft if ttft is not None else stamps[0] - start
            tokens = event["num_output_tokens"]
    conn.close()
    return ttft, tokens, time.perf_counter() - start, list(np.diff(stamps))


def run_threads(clients: int, requests: int, one, timeout_s: float = 600) -> tuple[dict[int, object], float]:
    """`clients` threads, each `requests` calls of one(seed) back to back (seed 1000 * client + request):
    results by seed, and the wall time. Any failure, or a client not done by `timeout_s`, ends the run."""
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            for r in range(requests):
                results[1000 * i + r] = one(1000 * i + r)
        except Exception as e:  # reported below; a load run must not hang on one failure
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if errors or any(t.is_alive() for t in threads):
        raise SystemExit(f"load run failed: {errors[:1] or 'a client did not finish'}")
    return results, time.perf_counter() - start


def run_clients(port: int, model: str, clients: int, requests: int, max_tokens: int, prompt_tokens: int = 0,
                vocab: int = 0) -> dict:
    by_seed, wall = run_threads(clients, requests,
                                lambda seed: stream_once(port, model, max_tokens, seed, prompt_tokens, vocab))
    results = list(by_seed.values())
    ttfts = sorted(r[0] for r in results)
    gaps = [g for r in results for g in r[3]] or [float("nan")]
    return {"requests": len(results), "tokens": sum(r[1] for r in results), "wall_s": wall,
            "req_s": len(results) / wall, "tok_s": sum(r[1] for r in results) / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * float(np.percentile(ttfts, 99)),
            "itl_p50_ms": 1000 * float(np.percentile(gaps, 50)), "itl_p99_ms": 1000 * float(np.percentile(gaps, 99))}


def in_process_baseline(model_dir: Path, max_tokens: int, repeats: int = 15) -> float:
    """Tokens/s of one generate() in this process with the runner of one served instance (its
    threads), the sampling of a request's defaults: what a request costs without the server."""
    def params(seed: int) -> GenerationParams:
        return GenerationParams(max_tokens, SamplingParams(0.8, 200, None), seed)

    with GenerationSession.open(model_dir, threads=cpu_threads(1)) as session:
        prompt = session.encode(PROMPT) if session.tokenizer else [0]
        session.generate(prompt, params(0))  # warm-up
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            session.generate(prompt, params(i))
            times.append(time.perf_counter() - t)
    return max_tokens / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--instances", type=int, nargs="+", default=[1])
    ap.add_argument("--max-batch", type=int, nargs="+", default=[1, 16], help="the repositories' --max-batch")
    ap.add_argument("--threads", type=int, default=0,
                    help="ONNX Runtime threads per instance (0: the server's default)")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="random prompts of this many tokens (0: PROMPT)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    load_before = os.getloadavg()
    baseline = in_process_baseline(args.model_dir, args.max_tokens)
    print(f"load average before: {load_before[0]:.2f} (1 min), {len(os.sched_getaffinity(0))} cores; "
          f"in-process generate(): {baseline:.0f} tok/s", file=sys.stderr)
    rows, vocab = [], load_model_dir(args.model_dir, verify=False).config.vocab_size
    for instances in args.instances:
        for max_batch in args.max_batch:
            with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
                repo = write_repository(args.model_dir, Path(tmp) / "repo", name="m", instances=instances,
                                        max_batch=max_batch)
                if args.threads:
                    config = repo / "m" / "config.pbtxt"
                    default = 'key: "threads" value: { string_value: "0" }'
                    threads = f'key: "threads" value: {{ string_value: "{args.threads}" }}'
                    config.write_text(config.read_text().replace(default, threads))
                with TritonServer(repo, http_port=18700, grpc_port=18701) as server:
                    # warm-up
                    run_clients(server.http_port, "m", instances, 1, args.max_tokens, args.prompt_tokens, vocab)
                    for clients in args.concurrency:
                        row = {"instances": instances, "max_batch": max_batch, "clients": clients,
                               **run_clients(server.http_port, "m", clients, args.requests, args.max_tokens,
                                             args.prompt_tokens, vocab)}
                        rows.append(row)
                        print(f"instances {instances} max-batch {max_batch} clients {clients}: {row['req_s']:.2f} "
                              f"req/s, {row['tok_s']:.0f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms",
                              file=sys.stderr)
    load_after = os.getloadavg()
    baseline_after = in_process_baseline(args.model_dir, args.max_tokens)  # the machine may have changed
    for row in rows:
        row["x_in_process"] = row["tok_s"] / ((baseline + baseline_after) / 2)
    print("| instances | max-batch | clients | requests | req/s | tok/s | × max-batch 1 | × in-process | "
          "TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = next((o for o in rows if o["max_batch"] == 1 and o["clients"] == r["clients"]
                    and o["instances"] == r["instances"]), None)
        vs_one = f"{r['tok_s'] / one['tok_s']:.2f}×" if one else "–"
        print(f"| {r['instances']} | {r['max_batch']} | {r['clients']} | {r['requests']} | {r['req_s']:.2f} | "
              f"{r['tok_s']:.0f} | {vs_one} | {r['x_in_process']:.2f}× | {r['ttft_p50_ms']:.0f} / "
              f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |")
    print(f"\nbaseline: in-process generate() {baseline:.0f} tok/s before, {baseline_after:.0f} after "
          f"({args.max_tokens} tokens, prompt {PROMPT!r}, {cpu_threads(1)} thread(s)); "
          f"load average 1 min: {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if args.json:
        args.json.write_text(json.dumps({"baseline_tok_s": [baseline, baseline_after],
                                         "load": [load_before, load_after], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
