"""The generation loop over any Runner: prefill, one-token decode steps, nanoGPT's block_size crop.

Reproduces nanoGPT's `generate`: each new token is sampled from the logits of the last position
of the context, cropped to its last block_size tokens. While the context fits, decode steps reuse
the KV cache; once it no longer fits, the positions shift, so the cache is rebuilt from the
cropped window (a prefill) every step, exactly what nanoGPT computes. Never imports torch.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np

from ..errors import ParameterError, UsageError
from .backends.base import Runner
from .sampling import SamplingParams, check_finite, next_token


def crop_notice(prompt_len: int, block_size: int) -> str:
    return (f"notice: prompt has {prompt_len} tokens, more than block_size {block_size}; "
            f"using its last {block_size} tokens, as nanoGPT does")


def generate(runner: Runner, prompt: np.ndarray, max_new_tokens: int, params: SamplingParams,
             rng: np.random.Generator, on_token: Callable[[np.ndarray], bool | None] | None = None,
             notice: Callable[[str], None] | None = None) -> np.ndarray:
    """Sample `max_new_tokens` after each row of `prompt` (B, T) -> (B, max_new_tokens) int64.

    `on_token` is called with each step's (B,) tokens as soon as they are sampled (streaming); if
    it returns True (a stop word was completed, the client went away), generation ends there and
    the result holds the tokens sampled so far, (B, steps).
    """
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise UsageError("prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ParameterError("max_new_tokens", f"must be an integer >= 0, got {max_new_tokens}")
    block_size = runner.config.block_size
    if prompt.shape[1] > block_size:
        (notice or to_stderr)(crop_notice(prompt.shape[1], block_size))
    B = prompt.shape[0]
    out = np.empty((B, max_new_tokens), dtype=np.int64)
    if max_new_tokens == 0:
        return out
    context = list(prompt.T[-block_size:])  # columns, so appending a step is cheap
    cache = runner.new_cache(B, min(block_size, len(context) + max_new_tokens))
    logits = runner.forward(np.stack(context, axis=1), cache)
    for step in range(max_new_tokens):
        check_finite(logits, runner.name)
        token = next_token(logits, params, rng)
        out[:, step] = token
        if on_token is not None and on_token(token):
            return out[:, :step + 1]
        if step == max_new_tokens - 1:
            break
        context.append(token)
        if len(context) <= block_size:
            logits = runner.forward(token[:, None], cache)
        else:
            del context[0]  # the window slides: every position shifts, so recompute it whole
            cache.reset()
            logits = runner.forward(np.stack(context, axis=1), cache)
    return out


def to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
