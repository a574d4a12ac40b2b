"""The generation engine against the single-sequence loop it replaced (issue 26), same run, same session.

    python scripts/bench_engine.py DIR [DIR ...] [--batches 1 8 16] [--prompt-tokens 16] [--new-tokens 256]
        [--rounds 5] [--threads 2] [--paired]

For each model directory (fp32, int8, int4 ...) and batch size, greedy decode rate (tokens/s after
the first token) of:
  loop    a frozen copy of the loop gptexport ran before the engine (runtime/loop.py with its
          OrtValue-bound host cache growing in steps of 64 positions, as of commit efc5f5e), kept
          here only to be measured against: B prompts as one batch in one cache
  engine  what `gptexport generate` runs now: B sequences of the scheduler on the batch cache
on one ONNX Runtime session, the two interleaved round by round (each first in every other
round), or with --paired step by step within each round (the machine's drift falls on both alike);
medians, and the median of the per-round ratios engine / loop. Tokens are checked to be the same
both ways.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.bench.run import cpu
from gptexport.runtime.backends import open_runner
from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams, next_token
from gptexport.runtime.scheduler import Scheduler, Sequence

ROOM_STEP = 64


class LoopCache:
    """The old loop's cache (base.HostCache + ort.OrtCache): host arrays that grow in steps of 64
    positions, its one-token step bound once with OrtValues that share the arrays."""

    def __init__(self, runner, batch: int, capacity: int):
        c, self.runner, self.batch, self.capacity = runner.config, runner, batch, capacity
        self.dtype = runner.cache_dtype()
        self.buffers = {n: np.zeros((batch, c.n_head, 0, c.head_dim), self.dtype) for n in runner.spec.past_names}
        self.length, self.binding = 0, None

    def reserve(self, end: int) -> bool:
        room = next(iter(self.buffers.values())).shape[2]
        if end <= room:
            return False
        room = min(self.capacity, -(-end // ROOM_STEP) * ROOM_STEP)
        for name, buf in self.buffers.items():
            grown = np.zeros(buf.shape[:2] + (room,) + buf.shape[3:], self.dtype)
            grown[:, :, :self.length] = buf[:, :, :self.length]
            self.buffers[name] = grown
        return True

    def append(self, new: dict, steps: int) -> None:
        start, end = self.length, self.length + steps
        self.reserve(end)
        for name, buf in self.buffers.items():
            buf[:, :, start:end] = new[name.replace("past_", "new_", 1)]
        self.length = end

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        B, T = ids.shape
        feeds = {"input_ids": ids, "past_length": np.zeros(B, np.int64), "logit_positions": np.array([T - 1]),
                 **{n: b[:, :, :0] for n, b in self.buffers.items()}}
        out = self.runner.infer(feeds)
        self.append(out, T)
        return out["logits"][:, -1]

    def _bind(self) -> None:
        r, c, B = self.runner, self.runner.config, self.batch
        self.ids, self.lengths = np.zeros((B, 1), np.int64), np.zeros(B, np.int64)
        self.logits = np.zeros((B, 1, c.vocab_size), np.float32)
        self.new = {n: np.zeros((B, c.n_head, 1, c.head_dim), self.dtype) for n in r.spec.new_names}
        inputs = {"input_ids": self.ids, "past_length": self.lengths, "logit_positions": np.zeros(1, np.int64),
                  **self.buffers}
        outputs = {"logits": self.logits, **self.new}
        self.values = {n: r.ort.OrtValue.ortvalue_from_numpy(a) for n, a in {**inputs, **outputs}.items()}
        self.binding = r.session.io_binding()
        for name in inputs:
            self.binding.bind_ortvalue_input(name, self.values[name])
        for name in outputs:
            self.binding.bind_ortvalue_output(name, self.values[name])
        # today's graph (our attention) has presents besides new_*: bound to the past's own arrays, so
        # that ONNX Runtime does not allocate and fill a copy of the whole past for them every step
        # (the op then writes the new position into the arrays, which the loop's append writes again)
        for past, present in r.presents.items():
            self.binding.bind_ortvalue_output(present, self.values[past])
        if r.flat:  # and its positions input (a one-token step's: the lengths) and segments (none)
            for name, array in (("position_ids", self.lengths.reshape(B, 1)), ("segments", np.zeros((0, 2), np.int64))):
                self.values[name] = r.ort.OrtValue.ortvalue_from_numpy(array)
                self.binding.bind_ortvalue_input(name, self.values[name])

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        if self.reserve(self.length + 1) or self.binding is None:
            self._bind()
        self.ids[:, 0] = tokens
        self.lengths[:] = self.length
        self.runner.session.run_with_iobinding(self.binding)
        self.append(self.new, 1)
        return self.logits[:, 0]


def loop_generate(runner, prompt: np.ndarray, n: int, stamp) -> np.ndarray:
    """The old loop, greedy, while the context fits block_size (what this benchmark times)."""
    params, rng = SamplingParams(0.0), np.random.default_rng(0)
    cache = LoopCache(runner, len(prompt), min(runner.config.block_size, prompt.shape[1] + n))
    logits, out = cache.prefill(prompt), []
    for step in range(n):
        token = next_token(logits, params, rng)
        out.append(token)
        stamp()
        if step < n - 1:
            logits = cache.decode(token)
    return np.stack(out, axis=1)


def engine_generate(runner, prompt: np.ndarray, n: int, stamp) -> np.ndarray:
    """The engine: each row a sequence of the scheduler, stamped as the first row samples."""
    s = Scheduler(runner, max_batch=len(prompt))
    params = GenerationParams(n, SamplingParams(0.0), 0)
    seqs = [s.submit(Sequence(row.tolist(), params, (lambda seq, ids, text: stamp()) if i == 0 else None))
            for i, row in enumerate(prompt)]
    s.run()
    return np.array([q.tokens for q in seqs])


def paired_rates(runner, prompt: np.ndarray, n: int, flip: bool) -> tuple[float, float, np.ndarray, np.ndarray]:
    """The two side by side, step by step: a decode step of the loop (sample, forward), then one of the
    engine (Scheduler.step: admit, forward, sample, pack), alternating (the engine first with `flip`),
    each timed on its own, so a drift of the machine's speed (this VM's: +-10 % between runs) falls
    on both alike. Decode tokens/s (steps after the first token) of each, and their tokens."""
    params, rng = SamplingParams(0.0), np.random.default_rng(0)
    loop = LoopCache(runner, len(prompt), min(runner.config.block_size, prompt.shape[1] + n))
    s = Scheduler(runner, max_batch=len(prompt))
    seqs = [s.submit(Sequence(row.tolist(), GenerationParams(n, SamplingParams(0.0), 0))) for row in prompt]
    logits, out = loop.prefill(prompt), []
    out.append(next_token(logits, params, rng))
    s.step()  # admit, fill, sample each first token (and, as the engine does, a first decode step)
    times = {"loop": 0.0, "engine": 0.0}
    loop_steps = engine_steps = 0

    def loop_step() -> None:
        nonlocal logits, loop_steps
        if len(out) < n:
            t = time.perf_counter()
            logits = loop.decode(out[-1])
            out.append(next_token(logits, params, rng))
            times["loop"] += time.perf_counter() - t
            loop_steps += 1

    def engine_step() -> None:
        nonlocal engine_steps
        if s.busy:
            t = time.perf_counter()
            s.step()
            times["engine"] += time.perf_counter() - t
            engine_steps += 1

    while len(out) < n or s.busy:
        for one in ((engine_step, loop_step) if flip else (loop_step, engine_step)):
            one()
    # (each timed step is one token a row: the engine's first step, untimed, also made the second)
    return (len(prompt) * loop_steps / times["loop"], len(prompt) * engine_steps / times["engine"],
            np.stack(out, axis=1), np.array([q.tokens for q in seqs]))


def decode_rate(gen, runner, prompt: np.ndarray, n: int) -> tuple[float, np.ndarray]:
    stamps: list[float] = []
    tokens = gen(runner, prompt, n, lambda: stamps.append(time.perf_counter()))
    return len(prompt) * (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dirs", type=Path, nargs="+")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paired", action="store_true",
                    help="alternate the two step by step in one generation (paired_rates), not run by run")
    args = ap.parse_args()
    name, flags = cpu()
    print(f"{name} ({flags}), {args.threads} threads, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new, greedy, {args.rounds} {'paired' if args.paired else 'interleaved'} rounds; "
          "decode tok/s, medians")
    print(f"{'model':<28} {'B':>3} {'loop':>8} {'engine':>8} {'engine/loop':>12} {'[min-max]':>14}")
    for path in args.model_dirs:
        md = load_model_dir(path)
        n = min(args.new_tokens, md.config.block_size - args.prompt_tokens)
        with open_runner("onnxruntime", md, threads=args.threads) as runner:
            for B in args.batches:
                prompt = np.random.default_rng(B).integers(0, md.config.vocab_size, (B, args.prompt_tokens))
                engine_generate(runner, prompt, 4, lambda: None)  # warm-up
                loops, engines, ratios = [], [], []
                for i in range(args.rounds):
                    if args.paired:
                        a, b, want, got = paired_rates(runner, prompt, n, flip=bool(i % 2))
                    elif i % 2:  # each goes first in every other round
                        b, got = decode_rate(engine_generate, runner, prompt, n)
                        a, want = decode_rate(loop_generate, runner, prompt, n)
                    else:
                        a, want = decode_rate(loop_generate, runner, prompt, n)
                        b, got = decode_rate(engine_generate, runner, prompt, n)
                    if not np.array_equal(want, got):
                        print(f"  note: {path.name} B={B}: tokens differ (a near-tie under batched rounding?)")
                    loops.append(a), engines.append(b), ratios.append(b / a)
                print(f"{path.name:<28} {B:>3} {statistics.median(loops):>8.1f} {statistics.median(engines):>8.1f} "
                      f"{statistics.median(ratios):>11.2f}x {min(ratios):>6.2f}-{max(ratios):.2f}", flush=True)


if __name__ == "__main__":
    main()
