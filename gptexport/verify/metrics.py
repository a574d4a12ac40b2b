"""The comparison math of a parity run: small pure numpy functions on reference and backend logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tolerance import Tolerance

TOPK_OVERLAP = 5
REL_FLOOR = 1e-6  # relative error is |d| / max(|ref|, REL_FLOOR): logits near 0 stay finite
KL_FLOOR = 1e-12  # q floored so a token one side's top-k drops costs a lot, but stays finite


def error_stats(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max, mean and p99 of the absolute and relative error of got against ref."""
    abs_err = np.abs(np.asarray(got, np.float64) - ref)
    rel_err = abs_err / np.maximum(np.abs(ref), REL_FLOOR)
    out = {}
    for kind, err in (("abs", abs_err), ("rel", rel_err)):
        out.update({f"max_{kind}": float(err.max()), f"mean_{kind}": float(err.mean()),
                    f"p99_{kind}": float(np.quantile(err, 0.99))})
    return out


def needed_tolerance(ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> tuple[float, float]:
    """The smallest atol that passes every logit at tol.rtol, and the smallest rtol at tol.atol."""
    abs_err = np.abs(np.asarray(got, np.float64) - ref)
    mag = np.abs(np.asarray(ref, np.float64))
    atol = float(max(0.0, (abs_err - tol.rtol * mag).max()))
    over = abs_err - tol.atol
    with np.errstate(divide="ignore", invalid="ignore"):
        rtol = np.where(over > 0, over / mag, 0.0)  # |ref| == 0 with an error over atol: inf
    return atol, float(rtol.max())


def within_fraction(ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> float:
    """Fraction of logits with |got - ref| <= atol + rtol * |ref|."""
    return float((np.abs(np.asarray(got, np.float64) - ref) <= tol.bound(ref)).mean())


def near_tie_bound(tol: Tolerance, a, b):
    """Largest gap between two logits that tolerance can reverse: each may move by its own bound."""
    return 2 * tol.atol + tol.rtol * (np.abs(a) + np.abs(b))


def top1_agreement(ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> tuple[int, int]:
    """(rows whose argmax agrees, rows whose argmax differs at a near-tie of ref)."""
    r, g = ref.argmax(-1), got.argmax(-1)
    rows = np.arange(len(r))
    a, b = ref[rows, r], ref[rows, g]
    ties = (r != g) & (a - b <= near_tie_bound(tol, a, b))
    return int((r == g).sum()), int(ties.sum())


def topk_overlap(ref: np.ndarray, got: np.ndarray, k: int = TOPK_OVERLAP) -> float:
    """Mean over rows of |top-k(ref) & top-k(got)| / k."""
    k = min(k, ref.shape[-1])

    def top(x: np.ndarray) -> np.ndarray:
        return np.argpartition(-x, k - 1, axis=-1)[:, :k]

    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(top(ref), top(got))]))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) of each row, in nats; q is floored at KL_FLOOR where p > 0."""
    safe_p = np.where(p > 0, p, 1.0)
    terms = np.where(p > 0, p * (np.log(safe_p) - np.log(np.maximum(q, KL_FLOOR))), 0.0)
    return terms.sum(-1)


@dataclass
class Divergence:
    """The first step where a backend's tokens differ from the reference's.

    Greedy: `gap` is the reference's logit of its token minus its logit of the backend's token,
    `bound` the gap tolerance can reverse (near_tie_bound). Sampling: `gap` is the max |logit
    error| at that step, `bound` atol; `excused` when every logit there was within tolerance.
    """

    step: int
    ref_token: int
    got_token: int
    gap: float
    bound: float
    excused: bool


def greedy_divergence(ref_tokens: np.ndarray, got_tokens: np.ndarray, ref_logits: np.ndarray,
                      tol: Tolerance) -> Divergence | None:
    """None when the tokens are identical; else where they part, excused at a near-tie."""
    diff = np.flatnonzero(np.asarray(ref_tokens) != np.asarray(got_tokens))
    if not len(diff):
        return None
    s = int(diff[0])
    rt, gt = int(ref_tokens[s]), int(got_tokens[s])
    a, b = float(ref_logits[s, rt]), float(ref_logits[s, gt])
    bound = float(near_tie_bound(tol, a, b))
    return Divergence(s, rt, gt, a - b, bound, a - b <= bound)


def sampled_divergence(ref_tokens: np.ndarray, got_tokens: np.ndarray, ref_logits: np.ndarray,
                       got_logits: np.ndarray, tol: Tolerance) -> Divergence | None:
    """None when identical; else where they part, excused if the logits there were within tolerance.

    Both sides drew the same uniform number from the same seed; with logits within tolerance a
    different token means the draw fell within that error of a boundary of the distribution.
    """
    diff = np.flatnonzero(np.asarray(ref_tokens) != np.asarray(got_tokens))
    if not len(diff):
        return None
    s = int(diff[0])
    err = float(np.abs(np.asarray(got_logits[s], np.float64) - ref_logits[s]).max())
    ok = within_fraction(ref_logits[s], got_logits[s], tol) >= tol.within
    return Divergence(s, int(ref_tokens[s]), int(got_tokens[s]), err, tol.atol, ok)
