"""Ragged load on the engine in-process: how the prefill chunk shares steps with decode (issue 23).

    python scripts/bench_prefill.py OUTDIR [--clients 1 4 16] [--chunks 0 32 64 128 256 128:fixed]
        [--requests 3] [--rounds 2] [--threads 2]

Each of --clients closed-loop clients sends --requests requests one after another (the next as soon
as the last is done, as serve_load.py's clients do): serve_load.py's ragged requests (prompts of
random token ids, their lengths log-uniform in 10..400 tokens, outputs uniform in 32..256 tokens,
every token made: no end id; temperature 0.8, top-k 200, a seed each); the same requests for every
setting. One scheduler per
setting (--chunks: prompt tokens prefilled per step; 0: every prompt whole in the step that admits
it, the engine before issue 23; N:fixed, chunks of N with a cache that never shrinks when its long
rows leave, to weigh the copy a shrink costs against the attention it saves; N:separate, chunks of
N in forwards of their own beside the decode's, where the engine would run both as one; N:stepM, a
mixed step of M tokens (StepBudget.tokens, prompts at most N; add :rowR, each decode row counting R
tokens of it, and :burstB, B prompts filling get N a step: 128:step64:row1:burst99 is the rule
before 2026-12-07's last change), max_batch 16, on one
runner, settings interleaved round by round.
Reports, per clients and setting, medians over rounds of: output tokens/s (all tokens / wall time),
time to first token p50/p99 (submit to first token) and inter-token gap p50/p99, plus the largest
cache capacity a step used. No server: what the engine itself does with the load (serve_load.py
measures it through Triton).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import numpy as np
from serve_load import TEMPERATURE, TOP_K, draw_request  # scripts/ is on sys.path

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.bench.run import cpu
from gptexport.runtime.backends import open_runner
from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.scheduler import Scheduler, Sequence, StepBudget


def ragged_requests(n: int, vocab: int, block: int, seed: int = 0) -> list[tuple[list[int], GenerationParams]]:
    """n requests of serve_load.py's ragged load (its draw_request, seeds 1000 * seed + i), with its
    sampling settings: what the served measurement sends, run in-process."""
    out = []
    for i in range(n):
        req = draw_request("ragged", 1000 * seed + i, vocab, block)
        params = GenerationParams(req.max_tokens, SamplingParams(TEMPERATURE, TOP_K), req.seed)
        out.append((list(req.prompt_ids), params))
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_load(runner, clients: list[list], setting: str, max_batch: int = 16) -> dict:
    """Every client's requests through one scheduler, closed loop; the load's figures."""
    chunk, *how = setting.split(":")
    fields = {"step": "tokens", "row": "row_tokens", "burst": "burst"}
    step = {fields[m[1]]: int(m[2]) for m in (re.fullmatch(r"(step|row|burst)(\d+)", h) for h in how) if m}
    s = Scheduler(runner, max_batch, prefill_chunk=int(chunk) or None, mix="separate" not in how,
                  budget=StepBudget(**step))
    if "fixed" in how:
        s._cache = lambda positions, make=s._cache: fixed_cache(make(positions))
    ttft, gaps, tokens, most = [], [], 0, 0
    stamps: dict[int, list[float]] = {}

    def submit(client: int, k: int) -> None:
        if k == len(clients[client]):
            return
        ids, params = clients[client][k]
        sent = time.perf_counter()
        key = len(stamps)
        stamps[key] = [sent]

        def done(seq, client=client, k=k):
            submit(client, k + 1)

        s.submit(Sequence(ids, params, lambda seq, i, t, key=key: stamps[key].append(time.perf_counter()),
                          on_done=done))

    t0 = time.perf_counter()
    for c in range(len(clients)):
        submit(c, 0)
    while s.busy:
        s.step()
        if s.cache is not None:
            most = max(most, s.cache.capacity)
    wall = time.perf_counter() - t0
    for st in stamps.values():
        ttft.append(st[1] - st[0])
        gaps += list(np.diff(st[1:]))
        tokens += len(st) - 1
    return {"tok_s": tokens / wall, "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "itl50": pct(gaps, 50),
            "itl99": pct(gaps, 99), "capacity": most}


def fixed_cache(cache):
    cache.fit = lambda needed: None  # this cache only grows
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--chunks", nargs="+", default=["0", "32", "64", "128", "256", "128:fixed"])
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    md = load_model_dir(args.model_dir)
    name, flags = cpu()
    print(f"{md.path} on {name} ({flags}), {args.threads} threads; ragged: prompts 10..400 tokens "
          f"(log-uniform), outputs 32..256, {args.requests} requests per client; medians of {args.rounds} rounds")
    print("| clients | prefill chunk | tok/s | TTFT p50 / p99 ms | inter-token p50 / p99 ms | largest capacity |")
    print("|---|---|---|---|---|---|")
    with open_runner("onnxruntime", md, threads=args.threads) as runner:
        for n in args.clients:
            reqs = ragged_requests(n * args.requests, md.config.vocab_size, md.config.block_size, seed=n)
            clients = [reqs[c::n] for c in range(n)]
            results: dict[str, list[dict]] = {c: [] for c in args.chunks}
            for r in range(args.rounds):
                order = args.chunks if r % 2 == 0 else args.chunks[::-1]
                for chunk in order:
                    results[chunk].append(run_load(runner, clients, chunk))
            for chunk in args.chunks:
                med = {k: statistics.median(x[k] for x in results[chunk]) for k in results[chunk][0]}
                label = "whole" if chunk == "0" else chunk
                print(f"| {n} | {label} | {med['tok_s']:.1f} | {med['ttft50'] * 1e3:.0f} / "
                      f"{med['ttft99'] * 1e3:.0f} | {med['itl50'] * 1e3:.1f} / {med['itl99'] * 1e3:.1f} | "
                      f"{med['capacity']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
