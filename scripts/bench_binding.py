"""Decode-step cost of the CPU provider's two bindings, measured in one run: why the CPU keeps "ortvalue".

  ortvalue  OrtValues sharing numpy arrays, bound once per cache (the CPU provider's default)
  pointer   raw pointers into the host memory core, the code path the GPU providers run

Both runners use the same model directory and one intra-op thread; rounds alternate which goes
first; each round times steady-state decode steps (a full cache of block_size positions) by the
process's CPU time, which a busy machine disturbs less than wall time. Prints the median per-step
time of each and their ratio.

Usage: python scripts/bench_binding.py OUTDIR [--batch 1] [--rounds 7] [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.runtime.backends.ort import OrtRunner


def step_ms(runner: OrtRunner, batch: int, steps: int) -> float:
    """CPU milliseconds per decode step: `steps` steps after a 4-token prompt, in a block_size cache."""
    cache = runner.new_cache(batch, runner.config.block_size)
    runner.forward(np.ones((batch, 4), np.int64), cache)
    token = np.ones((batch, 1), np.int64)
    t = time.process_time()
    for _ in range(steps):
        runner.forward(token, cache)
    return (time.process_time() - t) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=None, help="Decode steps per round [default: to block_size].")
    args = p.parse_args()
    md = load_model_dir(args.model_dir)
    steps = min(args.steps or md.config.block_size, md.config.block_size - 4)
    runners = {b: OrtRunner(md, threads=1, binding=b) for b in ("ortvalue", "pointer")}
    for r in runners.values():
        step_ms(r, args.batch, min(steps, 8))  # warm-up: sessions, first bindings
    times = {b: [] for b in runners}
    for i in range(args.rounds):
        for b in (list(runners) if i % 2 == 0 else list(runners)[::-1]):
            times[b].append(step_ms(runners[b], args.batch, steps))
    med = {b: statistics.median(t) for b, t in times.items()}
    print(f"{args.model_dir}: batch {args.batch}, {md.config.n_layer} layers, {args.rounds} rounds of {steps} steps, "
          f"CPU ms per decode step "
          f"(median): ortvalue {med['ortvalue']:.4f}, pointer {med['pointer']:.4f}; "
          f"pointer / ortvalue {med['pointer'] / med['ortvalue']:.3f} (+{(med['pointer'] - med['ortvalue']) * 1e3:.0f} us)")


if __name__ == "__main__":
    main()
