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
    if params.top_k is not None and params.top_k <= logits.shape[-1] // SPARSE_TOP_K:
        return np.array([_sample_top_k(row, params, rng) for row in logits], dtype=np.int64)
    return sample(logits_to_probs(logits, params.temperature, params.top_k, params.top_p), rng)


SPARSE_TOP_K = 8  # top-k of at most vocab / 8: sample among the kept tokens only


def _sample_top_k(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One draw from one row, as logits_to_probs + sample compute it, over the kept tokens only.

    The dropped tokens' probabilities are exactly 0, so the kept ones (in vocabulary order) have the
    same cdf values and the draw picks the same token; only the normalising sum is added up in
    another order (a last-bit difference). On GPT-2's 50k vocabulary this costs a fifth of the
    dense computation: finding the kept tokens (top_k_kept) is all that touches every logit.
    """
    # which tokens are kept is found on the logits as they come (float32: half the bytes, no copy):
    # dividing by a temperature > 0 in float64 keeps their order and their ties, so the set is the same
    kept = top_k_kept(logits, params.top_k)
    x = np.asarray(logits[kept], dtype=np.float64) / max(params.temperature, 1e-300)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if params.top_p is not None and params.top_p < 1.0:
        probs = _top_p(probs[None], params.top_p)[0]
    cdf = np.cumsum(probs)
    u = rng.random(1)[0] * cdf[-1]
    return int(kept[min(int((cdf <= u).sum()), len(kept) - 1)])


def top_k_kept(row: np.ndarray, k: int) -> np.ndarray:
    """The indices, ascending, of a row's values >= its k-th largest (ties at it kept, as nanoGPT's
    `logits[logits < v[:, [-1]]] = -inf`): np.flatnonzero(row >= np.partition(row, V - k)[V - k]),
    without partitioning the whole row.

    The row (but for its last few values) is read as `groups` interleaved groups (row[g], row[g +
    groups], ...: their maxima are one elementwise max over contiguous slices). The k-th largest of
    the groups' maxima, t, has at least k values >= it (a maximum each), so the row's k-th largest
    is >= t too: it and every value kept are among the few of the whole row >= t, and the selection
    runs on those. On GPT-2's 50k vocabulary at top-k 200 (AVX2 EPYC): 0.10 ms a row, where the
    partition and the indices took 0.13 ms under numpy 2 and 0.60 ms under numpy 1.26, the Triton
    stub's (whose partition has no SIMD path here): 12 % of the served scheduler thread's samples.
    """
    V = row.shape[-1]
    size = max(1, min(64, V // k))  # values per group; groups = V // size >= k
    groups = V // size
    maxima = row[:size * groups].reshape(size, groups).max(axis=0)
    t = np.partition(maxima, maxima.size - k)[maxima.size - k]
    candidates = np.flatnonzero(row >= t)
    values = row[candidates]
    return candidates[values >= np.partition(values, values.size - k)[values.size - k]]


# Logits processors, TensorRT-LLM's way. Its decoder runs, per step: logits + embedding_bias,
# times 1/temperature, then repetition, presence and frequency penalties (in that order, on the
# temperature-scaled logits), the min_tokens EOS mask, the bad-words ban, and only then top-k/top-p.
# Which tokens have been "seen" is the caller's business: TensorRT-LLM counts the whole sequence,
# prompt included (its prompt_ignore_length drops a prompt prefix from presence/frequency only).


def _token_ids(ids: object, vocab: int, name: str) -> np.ndarray:
    """Token ids as a flat int64 array, each a valid index into a vocabulary of `vocab`."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.dtype.kind not in "iu":
        raise ParameterError(name, f"must be integer token ids, got dtype {ids.dtype}")
    ids = ids.reshape(-1).astype(np.int64)
    if ids.min() < 0 or ids.max() >= vocab:
        raise ParameterError(name, f"must be token ids in [0, {vocab}), got {ids.min()}..{ids.max()}")
    return ids


def _vector(logits: np.ndarray) -> np.ndarray:
    logits = np.array(logits, dtype=np.float64)  # a copy: the caller's logits are never touched
    if logits.ndim != 1:
        raise ParameterError("logits", f"must be one position's (V,) logits, got shape {logits.shape}")
    return logits


def check_penalties(repetition: float, presence: float, frequency: float,
                    names: tuple[str, str, str] = ("repetition", "presence", "frequency")) -> None:
    """Each penalty a finite number, the repetition penalty > 0; errors call them by `names`."""
    for name, value in zip(names, (repetition, presence, frequency)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ParameterError(name, f"must be a finite number, got {value}")
    if repetition <= 0:  # TensorRT-LLM's SamplingConfig checks the same
        raise ParameterError(names[0], f"must be > 0 (1: no penalty), got {repetition}")


def apply_penalties(logits: np.ndarray, history: np.ndarray, repetition: float = 1.0,
                    presence: float = 0.0, frequency: float = 0.0) -> np.ndarray:
    """(V,) logits -> new (V,) float64 logits, penalized for the tokens in `history` (may repeat).

    repetition: Hugging Face's RepetitionPenaltyLogitsProcessor, once per distinct seen token
    (positive logits divided, negative ones multiplied, so > 1 always discourages).
    presence / frequency: OpenAI's, `- presence` once per distinct seen token, `- frequency * count`.
    Applied in TensorRT-LLM's order: repetition, presence, frequency. TensorRT-LLM applies them to
    logits already divided by the temperature: to match it, pass `logits / temperature` and sample
    with temperature 1 (the repetition penalty commutes with temperature; the other two do not).
    At 1.0 / 0 / 0 the logits come back exactly equal.
    """
    check_penalties(repetition, presence, frequency)
    logits = _vector(logits)
    seen, counts = np.unique(_token_ids(history, logits.shape[0], "history"), return_counts=True)
    if seen.size == 0:
        return logits
    # each stage only when asked for, so the defaults cannot change a value (not even -0.0)
    if repetition != 1.0:
        picked = logits[seen]
        logits[seen] = np.where(picked < 0, picked * repetition, picked / repetition)
    if presence != 0.0:
        logits[seen] -= presence
    if frequency != 0.0:
        logits[seen] -= frequency * counts
    return logits


def banned_tokens(history: np.ndarray, bad_words: list[list[int]]) -> np.ndarray:
    """The token ids that `bad_words` (each a list of token ids) forbid as the next token.

    TensorRT-LLM's rule (banBadWords): a one-token word is always banned; a longer word bans its
    last token only when the sequence so far (prompt included) ends with the rest of the word, so
    a multi-token word is stopped at its last token, never at its first. Empty words are skipped,
    as the Triton preprocessing model drops words that encode to nothing.
    """
    seq = np.asarray(history).reshape(-1).tolist()
    banned = set()
    for word in bad_words:
        word = [int(t) for t in word]
        if word and len(word) - 1 <= len(seq) and seq[len(seq) - (len(word) - 1):] == word[:-1]:
            banned.add(word[-1])
    return np.array(sorted(banned), dtype=np.int64)


def token_logprob(logits: np.ndarray, params: SamplingParams, token: int) -> float:
    """log P(token) under the distribution `token` was drawn from: (V,) logits -> float.

    Sampling: logits_to_probs with params (temperature, then top-k and top-p, renormalized), so a
    token that top-k or top-p dropped has -inf. Greedy (temperature 0): the draw is a point mass on
    the argmax, as next_token picks it, so 0.0 for that token and -inf for any other. TensorRT-LLM
    reports the same at temperature 0: it scales the logits by 1/(0 + 1e-6), which leaves all the
    mass on the argmax, and with its default normalize_log_probs a top-1 draw is log 1 = 0.
    (Its sampling log-probs differ from ours: normalized over the top-k set only, ignoring top-p;
    with normalize_log_probs false, or top-p alone, they are over the whole vocabulary.)
    """
    logits = _vector(logits)
    if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)) \
            or not 0 <= token < logits.shape[0]:
        raise ParameterError("token", f"must be a token id in [0, {logits.shape[0]}), got {token!r}")
    if params.greedy:
        return 0.0 if int(np.argmax(logits)) == token else -math.inf
    p = logits_to_probs(logits[None, :], params.temperature, params.top_k, params.top_p)[0, token]
    return math.log(p) if p > 0 else -math.inf
