"""Running a runner on the reference's inputs: the Outputs every backend is compared on.
"""

from __future__ import annotations

import numpy as np

from ..runtime.backends.base import HostCache, Runner
from ..runtime.loop import generate
from ..runtime.sampling import SamplingParams
from .golden import Outputs


class Recorder(Runner):
    """Wraps a runner and keeps the last-position logits of each forward the generation loop makes."""

    def __init__(self, inner: Runner):
        self.inner, self.name, self.config, self.spec = inner, inner.name, inner.config, inner.spec
        self.logits: list[np.ndarray] = []

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.infer(feeds)

    def new_cache(self, batch: int, capacity: int) -> HostCache:
        return self.inner.new_cache(batch, capacity)

    def forward(self, input_ids: np.ndarray, cache: HostCache, all_logits: bool = False) -> np.ndarray:
        logits = self.inner.forward(input_ids, cache, all_logits)
        self.logits.append(np.array(logits[0] if not all_logits else logits[0, -1], dtype=np.float32))  # a copy
        return logits


def generate_recorded(runner: Runner, prompt: np.ndarray, steps: int, params: SamplingParams,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The generation loop on one prompt: (steps,) tokens and the (steps, V) logits behind them."""
    rec = Recorder(runner)
    tokens = generate(rec, prompt[None], steps, params, np.random.default_rng(seed), notice=lambda m: None)
    return tokens[0], np.stack(rec.logits)


def teacher_forced(runner: Runner, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Logits at every prompt position (one prefill), then decoding `tokens` one by one with the cache.

    Decoding stops when the context fills block_size: (T + k, V), k = min(len(tokens), block - T).
    """
    k = max(0, min(len(tokens), runner.config.block_size - len(prompt)))
    cache = runner.new_cache(1, len(prompt) + k)
    # copies: a runner may return a view of a buffer it reuses on the next step (ONNX Runtime's IOBinding)
    rows = [np.array(runner.forward(prompt[None], cache, all_logits=True)[0], np.float32)]
    rows += [np.array(runner.forward(np.array([[t]]), cache), np.float32) for t in tokens[:k]]
    return np.concatenate(rows)


def recompute_last(runner: Runner, context: np.ndarray) -> np.ndarray:
    """Last-position logits of `context` (cropped to block_size) from scratch, a fresh empty cache."""
    context = context[-runner.config.block_size:]
    return np.array(runner.forward(context[None], runner.new_cache(1, len(context)))[0], np.float32)


def measure(runner: Runner, prompts: list[np.ndarray], steps: int, params: SamplingParams, seed: int,
            forced: list[np.ndarray] | None = None) -> Outputs:
    """A runner's Outputs; decode steps are fed `forced` tokens (default: its own greedy ones)."""
    out = Outputs()
    greedy = SamplingParams(temperature=0.0)
    for i, prompt in enumerate(prompts):
        tokens, logits = generate_recorded(runner, prompt, steps, greedy, seed)
        out.greedy_tokens.append(tokens)
        out.greedy_logits.append(logits)
        if params.greedy:
            sampled = (tokens, logits)
        else:
            sampled = generate_recorded(runner, prompt, steps, params, seed)
        out.sampled_tokens.append(sampled[0])
        out.sampled_logits.append(sampled[1])
        out.forward_logits.append(teacher_forced(runner, prompt, tokens if forced is None else forced[i]))
    return out
