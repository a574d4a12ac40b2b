"""Running a runner on the reference's inputs through the generation engine: the Outputs every backend
is compared on.

Everything here submits sequences to the scheduler (runtime/scheduler.py) on the runner's batch
cache, the engine `gptexport generate` and the server run; a `Probe` on each sequence records the
logits behind its tokens, the prefill's logits at every position, or feeds given tokens instead of
sampled ones. Nothing here calls a runner's forward itself.
"""

from __future__ import annotations

import numpy as np

from ..runtime.backends.base import Runner
from ..runtime.params import GenerationParams
from ..runtime.sampling import SamplingParams
from ..runtime.scheduler import Probe, Sequence, run_to_end
from .golden import Outputs


def quiet(_message: str) -> None:
    """Parity crops its prompts itself and says so in its report: no notice on stderr."""


def probed(prompt, steps: int, params: SamplingParams, seed: int, probe: Probe | None = None) -> Sequence:
    """`prompt` for `steps` tokens with a probe (default: one recording the logits)."""
    return Sequence(list(map(int, prompt)), GenerationParams(steps, params, seed), notice=quiet, probe=probe or Probe())


def recorded(seq: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """A finished probed sequence's (steps,) tokens and the (steps, V) logits behind them."""
    if seq.finish == "error":
        raise seq.error
    return np.array(seq.tokens, np.int64), np.stack(seq.probe.logits)


def generate_recorded(runner: Runner, prompt: np.ndarray, steps: int, params: SamplingParams,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One prompt alone on the engine: (steps,) tokens and the (steps, V) logits behind them."""
    return recorded(run_to_end(runner, [probed(prompt, steps, params, seed)])[0])


def teacher_forced(runner: Runner, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Logits at every prompt position (one prefill), then at each of `tokens` fed one by one with the
    cache. Feeding stops when the context fills block_size: (T + k, V), k = min(len(tokens), block - T)."""
    k = max(0, min(len(tokens), runner.config.block_size - len(prompt)))
    probe = Probe(all_positions=True, forced=[int(t) for t in tokens[:k]])
    run_to_end(runner, [probed(prompt, k + 1, SamplingParams(0.0), 0, probe)])
    return np.concatenate([probe.prefill_logits, *[row[None] for row in probe.logits[1:]]])


def recompute_last(runner: Runner, contexts: list[np.ndarray]) -> np.ndarray:
    """Last-position logits of each context (cropped to block_size) from scratch: one fresh prefill each,
    (len(contexts), V)."""
    seqs = [probed(c[-runner.config.block_size:], 1, SamplingParams(0.0), 0) for c in contexts]
    return np.concatenate([recorded(s)[1] for s in run_to_end(runner, seqs, max_batch=8)])


def measure(runner: Runner, prompts: list[np.ndarray], steps: int, params: SamplingParams, seed: int,
            forced: list[np.ndarray] | None = None) -> Outputs:
    """A runner's Outputs, each prompt alone on the engine; the forward check's decode steps are fed
    `forced` tokens (default: its own greedy ones)."""
    out = Outputs()
    greedy = SamplingParams(temperature=0.0)
    for i, prompt in enumerate(prompts):
        tokens, logits = generate_recorded(runner, prompt, steps, greedy, seed)
        out.greedy_tokens.append(tokens)
        out.greedy_logits.append(logits)
        sampled = (tokens, logits) if params.greedy else generate_recorded(runner, prompt, steps, params, seed)
        out.sampled_tokens.append(sampled[0])
        out.sampled_logits.append(sampled[1])
        out.forward_logits.append(teacher_forced(runner, prompt, tokens if forced is None else forced[i]))
    return out
