"""Our CPU kernels on and off, interleaved in one run, through the scheduler (the path of
`gptexport generate --prompts` and the server): decode tokens per second, wall and CPU time.

    python scripts/bench_kernels.py MODEL_DIR [--batch 1 --batch 8] [--rounds 5] [--threads 2]
        [--prompt-tokens 16] [--long-prompt N] [--new-tokens 64]
    python scripts/bench_kernels.py --ops [int4|int8] [--threads 2]   # one matmul alone: GPT-2's shapes

MODEL_DIR is an fp32 (its attention: our CachedAttention), int4 (MatMulNBits: our Int4MatMul, and
CachedAttention) or int8 (quantize_dynamic's pattern: our Int8MatMul, and CachedAttention)
directory; "off" runs ONNX Runtime's own ops, "on" ours. `--prompt-tokens 900` measures decode at a
long context; `--long-prompt 900` a ragged batch (the first row long, the others short).

Both sessions stay open; each round runs every (batch, kernels) pair once, off before on, so drift
and other tenants hit both alike. Per pair: B random prompts of --prompt-tokens, greedy, then the
time of the decode steps (after every sequence's first token) over the tokens they sampled. Besides
wall time it reports the process's CPU seconds per decode token (all threads): on a shared machine
that is the steadier figure, since other processes slow wall time but do not add to our CPU time.
Ratios (on ÷ off) come from the medians of the rounds. Prints the machine's CPU and vector flags.

--ops times one matmul alone in a session, ONNX Runtime's op against ours on the same random weights
(int4: MatMulNBits vs Int4MatMul; int8: the quantize_dynamic pattern, which ONNX Runtime fuses into
DynamicQuantizeMatMul, vs Int8MatMul; GPT-2's shapes, 1 to 8 rows; microseconds per call, the
fastest of interleaved repeats).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from gptexport.bench.run import cpu
from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.session import GenerationSession


def decode_rate(session: GenerationSession, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(decode tokens per wall second, CPU seconds per decode token) of one batch through the scheduler."""
    params = GenerationParams(new_tokens, SamplingParams(0.0), 0)
    seqs = [session.submit(row, params) for row in prompts]
    while not all(s.tokens or s.done.is_set() for s in seqs):
        session.scheduler.step()  # admits and prefills every prompt (and may decode): not timed
    done = sum(len(s.tokens) for s in seqs)
    wall, cpu = time.perf_counter(), time.process_time()
    session.scheduler.run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(len(s.tokens) for s in seqs) - done
    return tokens / wall, cpu / tokens


def op_sessions(kind: str, K: int, N: int, threads: int, rng) -> dict:
    """{name: session} of one matmul on the same random weights: ONNX Runtime's own op (first) and ours.
    int4: MatMulNBits and Int4MatMul; int8: quantize_dynamic's pattern (which ONNX Runtime fuses into
    DynamicQuantizeMatMul) and Int8MatMul. Imports the tests' model builders."""
    import onnxruntime as ort

    tests = Path(__file__).resolve().parents[1] / "tests"
    sys.path[:0] = [str(tests / "runtime"), str(tests)]  # test_kernels imports conftest
    from test_kernels import int8_pattern_model, matmul_model, quantize_int8_weights, quantize_weights

    from gptexport.runtime.kernels import onnxgraph
    from gptexport.runtime.kernels.build import ensure_library

    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    if kind == "int4":
        B, scales = quantize_weights(w)
        models = {"MatMulNBits": matmul_model("MatMulNBits", K, N, B, scales),
                  "Int4MatMul": matmul_model("Int4MatMul", K, N, B, scales)}
    else:
        theirs = int8_pattern_model(K, N, *quantize_int8_weights(w), rng.standard_normal(N).astype(np.float32))
        models = {"DynamicQuantizeMatMul": theirs, "Int8MatMul": onnxgraph.swap_model(theirs, ("Int8MatMul",))[0]}
    sessions = {}
    for op, model in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if op in ("Int4MatMul", "Int8MatMul"):
            options.register_custom_ops_library(str(ensure_library()))
        sessions[op] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return sessions


def bench_ops(kind: str, threads: int, rows: tuple[int, ...] = (1, 2, 4, 8), repeats: int = 7, calls: int = 50) -> None:
    """ONNX Runtime's op vs ours alone, per GPT-2 shape and row count (`kind`: int4 or int8)."""
    rng = np.random.default_rng(0)
    first = True
    for K, N in ((768, 768), (768, 2304), (768, 3072), (3072, 768), (768, 50257)):
        sessions = op_sessions(kind, K, N, threads, rng)
        theirs_name, ours_name = sessions
        if first:
            print(f"| K × N | rows | {theirs_name} µs | {ours_name} µs | ÷ |")
            print("|---|---|---|---|---|")
            first = False
        for M in rows:
            feed = {"A": rng.standard_normal((M, K)).astype(np.float32)}
            best = {op: float("inf") for op in sessions}
            for _ in range(repeats):
                for op, sess in sessions.items():
                    t = time.perf_counter()
                    for _ in range(calls):
                        sess.run(None, feed)
                    best[op] = min(best[op], (time.perf_counter() - t) / calls * 1e6)
            theirs, ours = best[theirs_name], best[ours_name]
            print(f"| {K} × {N} | {M} | {theirs:.0f} | {ours:.0f} | {theirs / ours:.2f}× |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, nargs="?",
                   help="a model directory (fp32, or int4/int8 from gptexport quantize)")
    p.add_argument("--ops", nargs="?", const="int4", choices=("int4", "int8"),
                   help="time one matmul alone instead, GPT-2's shapes (int4: the default, or int8)")
    p.add_argument("--batch", type=int, action="append", help="batch sizes [1 and 8]")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--long-prompt", type=int, default=None,
                   help="the first row's prompt this long, the others --prompt-tokens (a ragged batch)")
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    batches = args.batch or [1, 8]
    cpu_name, flags = cpu()
    print(f"CPU: {cpu_name}, flags: {flags}; {args.threads} threads; {args.rounds} rounds, interleaved")
    if args.ops:
        return bench_ops(args.ops, args.threads)
    if args.model_dir is None:
        p.error("give a model directory, or --ops")
    sessions = {k: GenerationSession.open(args.model_dir, threads=args.threads, max_batch=max(batches), kernels=k)
                for k in ("off", "on")}
    rng = np.random.default_rng(0)
    vocab = sessions["off"].vocab_size
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for b in batches:
            prompts = rng.integers(0, vocab, (b, args.prompt_tokens)).tolist()
            if args.long_prompt:
                prompts[0] = rng.integers(0, vocab, args.long_prompt).tolist()
            for k, session in sessions.items():
                results.setdefault((b, k), []).append(decode_rate(session, prompts, args.new_tokens))
        print(f"round {r + 1}: " + ", ".join(f"B={b} {k} {results[(b, k)][-1][0]:.1f} tok/s"
                                             for b in batches for k in sessions), flush=True)
    print("| batch | kernels | decode tok/s (median, min-max) | CPU ms per token | on ÷ off (wall) | on ÷ off (CPU) |")
    print("|---|---|---|---|---|---|")
    for b in batches:
        med = {k: (statistics.median(x[0] for x in results[(b, k)]), statistics.median(x[1] for x in results[(b, k)]))
               for k in sessions}
        for k in sessions:
            rates = [x[0] for x in results[(b, k)]]
            ratio = ((f"{med['on'][0] / med['off'][0]:.2f}×", f"{med['off'][1] / med['on'][1]:.2f}×") if k == "on"
                     else ("", ""))
            print(f"| {b} | {k} | {med[k][0]:.1f} ({min(rates):.1f}–{max(rates):.1f}) | {med[k][1] * 1e3:.2f} "
                  f"| {ratio[0]} | {ratio[1]} |")
    for s in sessions.values():
        s.close()


if __name__ == "__main__":
    main()
