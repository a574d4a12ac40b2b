"""CTranslate2's side of the benchmark, run as a file by the CTranslate2 venv's python:

    python ct2_worker.py JOB        (JOB: JSON; see bench/peers.py)

It imports ctranslate2 and numpy only (never gptexport: that venv does not have it). Greedy
generate_batch of a random prompt (min_length = max_length: no early stop at the end token),
the prompt forwarded at once (include_prompt_in_result=False), intra_threads = the job's threads.
CTranslate2 hands back whole sequences, not tokens one by one, so the rates come from differences:
  TTFT         the time for 1 new token (the prompt's forward and the first token)
  decode rate  batch * N / (time for BASE + N new tokens - time for BASE)
Prints one JSON line.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Callable


def measure(generate: Callable[[int], None], batch: int, prompt_tokens: int, new_tokens: int, base_tokens: int,
            repeats: int, budget_s: float, clock: Callable[[], float] = time.perf_counter) -> dict:
    """generate(n) generates exactly n new tokens for each of the batch's prompts. Medians over
    `repeats` rounds of (1, base, base + new_tokens) tokens, fewer when budget_s runs out."""
    generate(2)  # warm-up: first-run allocations

    def timed(n: int) -> float:
        t = clock()
        generate(n)
        return clock() - t

    runs: list[tuple[float, float, float]] = []
    start = clock()
    while len(runs) < repeats and (not runs or clock() - start < budget_s):
        runs.append((timed(1), timed(base_tokens), timed(base_tokens + new_tokens)))
    first = statistics.median(r[0] for r in runs)
    step = statistics.median((r[2] - r[1]) / new_tokens for r in runs)
    nan = float("nan")
    return {"prefill_tok_s": batch * prompt_tokens / first, "decode_tok_s": batch / step if step > 0 else nan,
            "ttft_ms": first * 1e3, "ms_per_token": step * 1e3 if step > 0 else nan, "runs": len(runs)}


def main(job: dict) -> dict:
    import os

    import ctranslate2
    import numpy as np

    path = job["path"]
    vocab_file = os.path.join(path, "vocabulary.json")
    if os.path.isfile(vocab_file):
        with open(vocab_file) as f:
            vocab = json.load(f)
    else:
        with open(os.path.join(path, "vocabulary.txt")) as f:
            vocab = [ln.rstrip("\n") for ln in f]
    gen = ctranslate2.Generator(path, device="cpu", intra_threads=job["threads"], inter_threads=1)
    rng = np.random.default_rng(job["seed"])
    ids = rng.integers(0, min(job["vocab_size"], len(vocab)), (job["batch"], job["prompt_tokens"]))
    prompt = [[vocab[i] for i in row] for row in ids]

    def generate(n: int) -> None:
        results = gen.generate_batch(prompt, max_length=n, min_length=n, sampling_topk=1, beam_size=1,
                                     include_prompt_in_result=False)
        got = {len(r.sequences_ids[0]) for r in results}
        if got != {n}:
            raise RuntimeError(f"asked for {n} new tokens, got {sorted(got)}")

    m = measure(generate, job["batch"], job["prompt_tokens"], job["new_tokens"], job["base_tokens"], job["repeats"],
                job["budget_s"])
    m["about"] = f"ctranslate2 {ctranslate2.__version__}, compute type {gen.compute_type}"
    return m


if __name__ == "__main__" and len(sys.argv) == 2:
    print(json.dumps(main(json.loads(sys.argv[1]))))
