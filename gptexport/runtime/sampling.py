"""Sampling in numpy with nanoGPT's semantics: logits / temperature, top-k, softmax, one draw.

Shared by every backend, so the same seed gives the same tokens whatever produced the logits.
Never imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import GptExportError, ParameterError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int | None = None  # keep every logit >= the k-th largest, ties included; 0 or None: no top-k
    top_p: float | None = None  # nucleus sampling on top of top-k; None or 1.0 keeps all

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ParameterError("temperature", f"must be a finite number >= 0 (0 is greedy), got {t}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ParameterError("top_k", f"must be an integer >= 0 (0: no top-k), got {k}")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0):
            raise ParameterError("top_p", f"must be in (0, 1], got {p}")
        if k == 0:
            object.__setattr__(self, "top_k", None)  # one meaning, one value: "no top-k" is None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# The defaults of `gptexport generate` (nanoGPT's sample.py, with 200 new tokens): the CLI, the
# Python API, the server and parity all take them from here.
DEFAULT_SAMPLING = SamplingParams(temperature=0.8, top_k=200)
DEFAULT_SEED = 1337
DEFAULT_MAX_NEW_TOKENS = 200


def check_finite(logits: np.ndarray, source: str) -> None:
    """A backend that returns NaN or inf is broken; sampling from it would be silently wrong."""
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).sum())
        raise GptExportError(f"{source}: returned {bad} NaN/inf logits; the model or backend is broken")


def logits_to_probs(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> np.ndarray:
    """(B, V) logits -> (B, V) float64 probabilities, exactly as nanoGPT's generate (plus top-p)."""
    logits = np.asarray(logits, dtype=np.float64) / max(temperature, 1e-300)
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        # the k-th largest value per row; everything below it is dropped, ties at it are kept
        kth = np.partition(logits, V - top_k, axis=-1)[..., V - top_k, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        probs = _top_p(probs, top_p)
    return probs


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p  # the first token always has mass_before 0
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum(axis=-1, keepdims=True)


def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of (B, V) probabilities -> (B,) int64 token ids."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    tokens = (cdf <= u[:, None]).sum(axis=-1)  # first index whose cdf exceeds u
    return np.minimum(tokens, probs.shape[-1] - 1).astype(np.int64)


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """(B, V) last-position logits -> (B,) next tokens."""
    if params.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    return sample(logits_to_probs(logits, params.temperature, params.top_k, params.top_p), rng)
