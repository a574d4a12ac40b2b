#!/usr/bin/env python
"""Soak test: generate many tokens from one model directory and check that memory stays flat.

    python scripts/soak.py MODEL_DIR [--tokens 10000] [--every 500] [--warmup 1000] [--max-growth-mb 10]

Runs the same engine as `gptexport generate` (ONNX Runtime on CPU, the numpy sampler, streamed
decoding into a null sink), reads this process's resident set size every `--every` tokens, and
exits 1 if RSS grew by more than `--max-growth-mb` after the first `--warmup` tokens (allocator
and session caches settle during warm-up). Torch-free: RSS comes from /proc/self/status.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.session import GenerationSession


def rss_mb() -> float:
    """Current resident set size in MiB (Linux); peak RSS elsewhere, which can only overstate growth."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def soak(model_dir: Path, tokens: int, every: int, warmup: int, backend: str = "onnxruntime",
         seed: int = 1337) -> list[tuple[int, float]]:
    """Generate `tokens` tokens in one sequence; (tokens so far, RSS MiB) every `every` tokens."""
    samples = [(0, rss_mb())]
    count = 0

    def on_delta(_seq, ids: list[int], _text) -> None:  # the session decodes as the CLI does
        nonlocal count
        for _ in ids:
            count += 1
            if count % every == 0 or count == warmup:
                samples.append((count, rss_mb()))

    with GenerationSession.open(model_dir, backend) as session:
        prompt = session.encode("\n") if session.tokenizer else [0]
        session.generate(prompt, GenerationParams(tokens, SamplingParams(0.8, top_k=200), seed), on_delta)
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--every", type=int, default=500, help="sample RSS every N tokens")
    ap.add_argument("--warmup", type=int, default=1000, help="tokens before the baseline RSS is taken")
    ap.add_argument("--max-growth-mb", type=float, default=10.0)
    ap.add_argument("--backend", default="onnxruntime")
    args = ap.parse_args(argv)
    if not 0 < args.warmup < args.tokens:
        ap.error("--warmup must be between 0 and --tokens")

    t0 = time.perf_counter()
    samples = soak(args.model_dir, args.tokens, args.every, args.warmup, args.backend)
    elapsed = time.perf_counter() - t0
    for n, mb in samples:
        print(f"{n:>7} tokens  RSS {mb:8.1f} MiB")
    baseline = next(mb for n, mb in samples if n >= args.warmup)
    after = [mb for n, mb in samples if n >= args.warmup]
    growth = max(after) - baseline
    print(f"start RSS {samples[0][1]:.1f} MiB, after {args.warmup}-token warm-up {baseline:.1f} MiB, "
          f"end {samples[-1][1]:.1f} MiB, max {max(mb for _, mb in samples):.1f} MiB; "
          f"growth after warm-up {growth:+.1f} MiB (limit {args.max_growth_mb}); "
          f"{args.tokens} tokens in {elapsed:.1f}s ({args.tokens / elapsed:.0f} tok/s)")
    if growth > args.max_growth_mb:
        print(f"FAIL: RSS grew {growth:.1f} MiB after warm-up", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
