"""The scheduler in-process (no server): N sequences at once against the same N one after another.

    python scripts/bench_scheduler.py OUTDIR [--sequences 16] [--new-tokens 128] [--threads 2]

Both runs are the same scheduler on the same runner, with max_batch N and with max_batch 1
(one sequence at a time, what the Triton model did before in-flight batching), on the same
prompts (random token ids of different lengths, 8 up to --prompt-tokens) and seeds, interleaved
over --rounds; medians. Every sequence's tokens are checked to be the same in both runs.

It also times the two ways of prefilling N prompts that docs/serving.md weighs: one padded
forward of all of them (N x T tokens at once) against N forwards of one prompt, and the time to
first token each gives the i-th prompt when they arrive together.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.runtime.backends import open_runner
from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.scheduler import Scheduler, Sequence


def requests(n: int, prompt_tokens: int, new_tokens: int, vocab: int) -> list[tuple[list[int], GenerationParams]]:
    rng = np.random.default_rng(0)
    lengths = np.linspace(8, prompt_tokens, n).round().astype(int)
    return [(rng.integers(0, vocab, int(T)).tolist(), GenerationParams(new_tokens, SamplingParams(0.8, 200), 100 + i))
            for i, T in enumerate(lengths)]


def run(runner, reqs, max_batch: int) -> tuple[float, list[list[int]], list[float]]:
    """(seconds, every sequence's tokens, every sequence's time to first token)."""
    s = Scheduler(runner, max_batch)
    first: dict[int, float] = {}
    t0 = time.perf_counter()
    seqs = []
    for i, (ids, params) in enumerate(reqs):
        on_delta = lambda _seq, _ids, _text, i=i: first.setdefault(i, time.perf_counter())  # noqa: E731
        seqs.append(s.submit(Sequence(ids, params, on_delta)))
    s.run()
    seconds = time.perf_counter() - t0
    return seconds, [q.tokens for q in seqs], [first[i] - t0 for i in range(len(reqs))]


def prefill_ways(runner, n: int, T: int, vocab: int, repeats: int = 3) -> dict:
    """One padded (n, T) forward against n forwards of (1, T): seconds, and TTFT of the i-th prompt."""
    ids = np.random.default_rng(1).integers(0, vocab, (n, T))
    together, alone = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        runner.new_batch_cache(n, T).prefill(0, ids)
        together.append(time.perf_counter() - t)
        t = time.perf_counter()
        cache = runner.new_batch_cache(n, T)
        for i, row in enumerate(ids):
            cache.prefill(i, row)
        alone.append(time.perf_counter() - t)
    together, alone = statistics.median(together), statistics.median(alone)
    return {"together_s": together, "one_at_a_time_s": alone,
            "ttft_p50_together_s": together, "ttft_p50_one_at_a_time_s": alone * (n + 1) / (2 * n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    md = load_model_dir(args.model_dir)
    reqs = requests(args.sequences, min(args.prompt_tokens, md.config.block_size - args.new_tokens),
                    args.new_tokens, md.config.vocab_size)
    with open_runner("onnxruntime", md, threads=args.threads) as runner:
        run(runner, reqs[:2], 2)  # warm-up
        batched, alone = [], []
        for _ in range(args.rounds):
            b = run(runner, reqs, args.sequences)
            a = run(runner, reqs, 1)
            if b[1] != a[1]:
                diverged = sum(x != y for x, y in zip(b[1], a[1]))
                print(f"note: {diverged} of {len(reqs)} sequences differ between the runs (near-ties?)")
            batched.append(b)
            alone.append(a)
        prefill = prefill_ways(runner, args.sequences, args.prompt_tokens, md.config.vocab_size)
    tokens = args.sequences * args.new_tokens

    def med(runs: list) -> float:
        return statistics.median(r[0] for r in runs)

    def ttft(runs: list) -> float:
        return statistics.median(statistics.median(r[2]) for r in runs)

    print(f"{md.path}: {args.sequences} sequences, prompts 8..{len(reqs[-1][0])} tokens, {args.new_tokens} new "
          f"tokens each, {args.threads} threads, medians of {args.rounds} interleaved rounds")
    print("| run | seconds | tokens/s | TTFT p50 s | × one after another |")
    print("|---|---|---|---|---|")
    for name, runs in ((f"max_batch {args.sequences}", batched), ("one after another (max_batch 1)", alone)):
        print(f"| {name} | {med(runs):.2f} | {tokens / med(runs):.0f} | {ttft(runs):.2f} | "
              f"{med(alone) / med(runs):.2f}× |")
    print(f"\nprefill of {args.sequences} prompts of {args.prompt_tokens} tokens: one padded forward "
          f"{prefill['together_s']:.2f} s (every prompt's first token then), one at a time "
          f"{prefill['one_at_a_time_s']:.2f} s (median prompt's first token after "
          f"{prefill['ttft_p50_one_at_a_time_s']:.2f} s)")


if __name__ == "__main__":
    main()
