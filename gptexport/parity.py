"""`gptexport parity`: numbers showing that every backend reproduces the PyTorch model.

The reference is the checkpoint's GPT in PyTorch fp32 (backends.torch_ref), or a golden file of
its outputs (golden.py) on a box without torch. Every backend gets exactly the reference's inputs
and is checked four ways (see docs/parity.md):

  forward     logits at every prefill position and at decode steps with the cache
  generation  greedy tokens for `steps` steps; a divergence at a near-tie is not a failure
  sampling    the same seed gives the same sampled tokens
  cache       decode with the cache (and the block_size crop) against a full recompute
plus, once, `sampler`: the numpy sampler's probabilities against nanoGPT's torch code.

The comparison math is small pure numpy functions; torch is imported only to build a reference
from a checkpoint, matplotlib only to plot. This module never imports torch by itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import BACKENDS, open_runner
from .backends.base import HostCache, Runner
from .errors import BackendUnavailable, GptExportError, TokenizerError, UsageError
from .generate import generate
from .golden import Outputs, Reference, load_golden, save_golden
from .modeldir import ModelDir, load_model_dir
from .sampling import SamplingParams, logits_to_probs

DEFAULT_STEPS = 32
DEFAULT_PROMPTS = ("\n", "First Citizen:\n", "The meaning of life is")
DEFAULT_SAMPLING = SamplingParams(temperature=0.8, top_k=200)  # `gptexport generate`'s defaults
DEFAULT_SEED = 1337
SAMPLER_ATOL = 1e-6  # numpy sampler vs nanoGPT's torch code, on probabilities
# sampler settings checked against torch besides the user's: plain, top-k, top-k + top-p, top-p
PROBES = ((1.0, None, None), (0.7, 5, None), (1.3, 40, 0.9), (1.0, None, 0.5))
SAMPLER_ROWS = 16  # reference logit rows the sampler check uses (and the same rows rounded)
TIE_GRID = 0.25  # logits rounded to this grid have many exact ties: top-k must keep them all
TOPK_OVERLAP = 5
CROP_STEPS = 4  # greedy steps of the cache check's probe that starts one short of block_size
REL_FLOOR = 1e-6  # relative error is |d| / max(|ref|, REL_FLOOR): logits near 0 stay finite
KL_FLOOR = 1e-12  # q floored so a token one side's top-k drops costs a lot, but stays finite


# ---- tolerances -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    """Logit tolerance of one precision: |got - ref| <= atol + rtol * |ref|, logit by logit.

    Float presets: every logit within tolerance, every position's argmax the same unless the
    reference has a near-tie there. Quantized presets are so loose that nearly every argmax swap
    would pass as a near-tie, so they allow a few logits beyond tolerance (`within` < 1) and ask
    instead that the argmax agree outright (`ties_excused` off) at a share of positions (`min_top1`).
    """

    name: str
    atol: float
    rtol: float
    within: float = 1.0  # share of logits that must be within atol + rtol * |ref|
    min_top1: float = 1.0  # share of positions whose argmax must agree
    ties_excused: bool = True  # an argmax swap at a near-tie of the reference counts as agreeing

    def bound(self, ref: np.ndarray) -> np.ndarray:
        return self.atol + self.rtol * np.abs(ref)


PRESETS = {
    "fp32": Tolerance("fp32", 1e-4, 1e-3),
    "fp16": Tolerance("fp16", 5e-2, 5e-3),
    "bf16": Tolerance("bf16", 2.5e-1, 2e-2),
    # fp32 with TF32 matmuls (--tf32). Provisional, never measured (no GPU has run it yet): fp16's
    # bounds, an upper bound by construction, since TF32 rounds the same matmul inputs to the same
    # 10-bit mantissa as fp16 and keeps everything else in fp32. scripts/gpu_check.py reports the
    # atol/rtol TF32 needed on a GPU; set the preset from that measurement.
    "tf32": Tolerance("tf32", 5e-2, 5e-3),
    "int8": Tolerance("int8", 0.5, 0.05, within=0.99, min_top1=0.90, ties_excused=False),
    "int4": Tolerance("int4", 1.5, 0.1, within=0.99, min_top1=0.80, ties_excused=False),
}


def tolerance_for(precision: str, preset: str | None = None, atol: float | None = None,
                  rtol: float | None = None) -> Tolerance:
    """The preset named `preset` (default: the model's precision), with atol/rtol overriding it."""
    if preset is not None and (atol is not None or rtol is not None):
        raise UsageError("give either --tolerance or --atol/--rtol, not both")
    name = preset or precision
    if name not in PRESETS:
        raise UsageError(f"--tolerance {name!r} is not a preset; valid: {', '.join(PRESETS)}")
    tol = PRESETS[name]
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} must be a finite number >= 0, got {value}")
    if atol is None and rtol is None:
        return tol
    return replace(tol, name="custom", atol=tol.atol if atol is None else atol,
                   rtol=tol.rtol if rtol is None else rtol)


# ---- comparison math: pure numpy ----------------------------------------------------------------

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
    top = lambda x: np.argpartition(-x, k - 1, axis=-1)[:, :k]
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


def nanogpt_probs(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """nanoGPT's generate, its lines verbatim in torch (plus the usual nucleus filter for top-p).

    nanoGPT computes in fp32. Top-p is not nanoGPT's and has a cliff: a token whose preceding mass
    is within rounding of top_p is in or out, a jump of its whole probability. So with top-p it
    is all fp64 here, as in the numpy sampler, and the check compares the rule, not fp32 rounding.
    """
    import torch
    from torch.nn import functional as F

    nucleus = top_p is not None and top_p < 1.0
    logits = torch.from_numpy(np.array(logits, np.float64 if nucleus else np.float32)) / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("Inf")
    probs = F.softmax(logits, dim=-1).double()
    if nucleus:  # not in nanoGPT: keep the smallest set of most likely tokens reaching top_p
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        sorted_probs[torch.cumsum(sorted_probs, -1) - sorted_probs >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs.numpy()


# ---- running a runner on the reference's inputs --------------------------------------------------

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


def sampler_rows(forward_logits: list[np.ndarray]) -> np.ndarray:
    """Up to SAMPLER_ROWS reference rows spread over all positions, then the same rounded (ties)."""
    rows = np.concatenate(forward_logits)
    rows = rows[np.unique(np.linspace(0, len(rows) - 1, min(len(rows), SAMPLER_ROWS)).round().astype(int))]
    return np.concatenate([rows, np.round(rows / TIE_GRID) * TIE_GRID]).astype(np.float32)


def probes_for(params: SamplingParams) -> list[tuple]:
    probes = list(PROBES)
    mine = (params.temperature, params.top_k, params.top_p)
    if not params.greedy and mine not in probes:
        probes.append(mine)
    return probes


def build_reference(ckpt: str | Path, prompts: list[np.ndarray], steps: int, params: SamplingParams,
                    seed: int) -> Reference:
    """Run the checkpoint in PyTorch fp32 on the prompts: the Reference every backend must match."""
    from .backends.torch_ref import TorchRunner  # torch, only here

    runner = TorchRunner(ckpt)
    prompts = [p[-runner.config.block_size:] for p in prompts]
    sampling = {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p}
    ref = Reference(runner.config, str(ckpt), prompts, steps, sampling, seed, source_precision=runner.source_precision)
    ref.outputs = measure(runner, prompts, steps, params, seed)
    ref.probes = probes_for(params)
    ref.sampler_logits = sampler_rows(ref.outputs.forward_logits)
    ref.sampler_probs = [nanogpt_probs(ref.sampler_logits, *probe) for probe in ref.probes]
    return ref


# ---- the checks ---------------------------------------------------------------------------------

@dataclass
class Check:
    """One check's verdict: `figure` is the table's one line, `details` every number (for --json)."""

    name: str  # sampler, forward, generation, sampling, cache, or run (the backend crashed)
    backend: str  # "-" for the sampler check, which involves no backend
    ok: bool
    figure: str
    details: dict = field(default_factory=dict)


def sampler_check(logits: np.ndarray, probes: list[tuple], want: list[np.ndarray],
                  probs_fn: Callable = logits_to_probs) -> Check:
    """The numpy sampler's probabilities (probs_fn) against nanoGPT's torch ones (`want`), per probe."""
    errs = [float(np.abs(probs_fn(logits, *probe) - w).max()) for probe, w in zip(probes, want)]
    worst = max(errs) if errs else 0.0
    ok = bool(worst <= SAMPLER_ATOL)  # NaN fails too
    figure = (f"max |dp| {worst:.1e} vs nanoGPT's torch code (tol {SAMPLER_ATOL:g}); "
              f"{len(probes)} settings x {len(logits)} rows, half with tied logits")
    per_probe = [{"temperature": t, "top_k": k, "top_p": p, "max_abs_error": e} for (t, k, p), e in zip(probes, errs)]
    return Check("sampler", "-", ok, figure, {"max_abs_error": worst, "tolerance": SAMPLER_ATOL, "probes": per_probe})


def position_labels(ref: Reference) -> list[str]:
    """'p0 prefill 3', 'p0 decode 12', ... for the rows of the concatenated forward logits."""
    labels = []
    for i, (prompt, rows) in enumerate(zip(ref.prompts, ref.outputs.forward_logits)):
        labels += [f"p{i} {'prefill' if t < len(prompt) else 'decode'} {t}" for t in range(len(rows))]
    return labels


def forward_check(backend: str, ref: Reference, got: Outputs, tol: Tolerance, params: SamplingParams) -> Check:
    """Logits at every prefill position and decode step: errors, needed tolerance, top-1/top-k, KL."""
    r = np.concatenate(ref.outputs.forward_logits).astype(np.float64)
    g = np.concatenate(got.forward_logits).astype(np.float64)
    n = len(r)
    d = error_stats(r, g)
    d["needed_atol"], d["needed_rtol"] = needed_tolerance(r, g, tol)
    d["within_fraction"] = within_fraction(r, g, tol)
    agree, ties = top1_agreement(r, g, tol)
    d.update(positions=n, top1_agreement=agree / n, top1_near_ties=ties, topk=TOPK_OVERLAP,
             topk_overlap=topk_overlap(r, g))
    # KL between the distributions the sampler would draw from; greedy has none, so T=1 then
    kl_params = SamplingParams(1.0, params.top_k, params.top_p) if params.greedy else params
    probs = lambda x: logits_to_probs(x, kl_params.temperature, kl_params.top_k, kl_params.top_p)
    kl = kl_divergence(probs(r), probs(g))
    d.update(kl_mean=float(kl.mean()), kl_max=float(kl.max()), kl_params=asdict(kl_params))
    d["per_position"] = {"labels": position_labels(ref), "max_abs": np.abs(g - r).max(-1).tolist()}
    agreeing = agree + (ties if tol.ties_excused else 0)
    ok = d["within_fraction"] >= tol.within and agreeing >= tol.min_top1 * n - 1e-9
    within = "" if d["within_fraction"] == 1.0 else f", {d['within_fraction']:.2%} within"
    tie_note = (f" (+{ties} near-tie)" if ties else "") if tol.ties_excused else f" (min {tol.min_top1:.0%})"
    figure = (f"max|d| {d['max_abs']:.1e}, p99 {d['p99_abs']:.1e}, {_needed(d)}{within}; "
              f"top-1 {agree / n:.1%}{tie_note}, top-{TOPK_OVERLAP} {d['topk_overlap']:.1%}, "
              f"KL max {d['kl_max']:.1e}; {n} positions")
    return Check("forward", backend, bool(ok), figure, d)


def _needed(d: dict) -> str:
    return f"needed atol {d['needed_atol']:.0e} / rtol {d['needed_rtol']:.0e}"


def _token_check(name: str, backend: str, divs: list[Divergence | None], steps: int) -> Check:
    """Verdict over prompts: identical, diverged but excused, or diverged (fails)."""
    same = sum(d is None for d in divs)
    bad = [(i, d) for i, d in enumerate(divs) if d is not None and not d.excused]
    excused = [(i, d) for i, d in enumerate(divs) if d is not None and d.excused]
    why = "at a near-tie" if name == "generation" else "with logits within tolerance"
    if bad:
        i, d = bad[0]
        gap = f"gap {d.gap:.2e} > {d.bound:.2e}" if name == "generation" else f"logits off by {d.gap:.2e}"
        figure = f"prompt {i} diverged at step {d.step}: token {d.got_token}, reference {d.ref_token} ({gap})"
    elif excused:
        i, d = excused[0]
        figure = (f"{same}/{len(divs)} identical over {steps} steps; prompt {i} diverged {why} "
                  f"at step {d.step} ({'gap' if name == 'generation' else 'max|d|'} {d.gap:.1e})")
    else:
        figure = f"{same}/{len(divs)} prompts identical over {steps} steps"
    details = {"steps": steps, "prompts": [{"identical": d is None, "divergence": None if d is None else asdict(d)}
                                           for d in divs]}
    return Check(name, backend, not bad, figure, details)


def generation_check(backend: str, ref: Reference, got: Outputs, tol: Tolerance) -> Check:
    """Greedy tokens for `steps` steps; the first divergence is excused at a near-tie only."""
    o = ref.outputs
    divs = [greedy_divergence(rt, gt, rl, tol) for rt, gt, rl in zip(o.greedy_tokens, got.greedy_tokens, o.greedy_logits)]
    return _token_check("generation", backend, divs, ref.steps)


def sampling_check(backend: str, ref: Reference, got: Outputs, tol: Tolerance) -> Check:
    """Seeded sampled tokens; a divergence is excused only where the logits were within tolerance."""
    o = ref.outputs
    divs = [sampled_divergence(rt, gt, rl, gl, tol)
            for rt, gt, rl, gl in zip(o.sampled_tokens, got.sampled_tokens, o.sampled_logits, got.sampled_logits)]
    check = _token_check("sampling", backend, divs, ref.steps)
    check.details.update(seed=ref.seed, sampling=ref.sampling)
    return check


def _recomputed(runner: Runner, prompt: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, int]:
    """Full-recompute logits of each generation step's context, and how many steps were past block_size."""
    contexts = [np.concatenate([prompt, tokens[:s]]) for s in range(len(tokens))]
    past = sum(len(c) > runner.config.block_size for c in contexts)
    return np.stack([recompute_last(runner, c) for c in contexts]), past


def cache_check(backend: str, runner: Runner, ref: Reference, got: Outputs, tol: Tolerance) -> Check:
    """The generation loop's logits (cached decode, crop) against a full recompute, same backend."""
    block = runner.config.block_size
    # a probe that starts one short of block_size: one decode fills the window, then it slides
    start = np.resize(np.concatenate([ref.prompts[0], ref.outputs.greedy_tokens[0]]), max(1, block - 1))
    probe = generate_recorded(runner, start, CROP_STEPS, SamplingParams(0.0), ref.seed)
    cached, full, past = [], [], 0
    for prompt, (tokens, logits) in zip([*ref.prompts, start], [*zip(got.greedy_tokens, got.greedy_logits), probe]):
        recomputed, n_past = _recomputed(runner, prompt, tokens)
        cached.append(logits)
        full.append(recomputed)
        past += n_past
    full_rows, cached_rows = np.concatenate(full).astype(np.float64), np.concatenate(cached)
    d = error_stats(full_rows, cached_rows)
    d["needed_atol"], d["needed_rtol"] = needed_tolerance(full_rows, cached_rows, tol)
    d.update(within_fraction=within_fraction(full_rows, cached_rows, tol), steps=len(full_rows),
             steps_past_block_size=past, block_size=block)
    ok = d["within_fraction"] >= tol.within
    figure = (f"max|d| {d['max_abs']:.1e}, {_needed(d)}; {len(full_rows)} steps, "
              f"{past} past block_size {block}")
    return Check("cache", backend, bool(ok), figure, d)


def backend_checks(backend: str, runner: Runner, ref: Reference, tol: Tolerance) -> list[Check]:
    """All four checks of one backend; a backend that crashes fails a `run` check instead."""
    params = SamplingParams(**ref.sampling)
    try:
        got = measure(runner, ref.prompts, ref.steps, params, ref.seed, forced=ref.outputs.greedy_tokens)
        return [forward_check(backend, ref, got, tol, params), generation_check(backend, ref, got, tol),
                sampling_check(backend, ref, got, tol), cache_check(backend, runner, ref, got, tol)]
    except Exception as e:  # any backend failure is a finding to report, not a traceback
        first = (str(e).splitlines() or [""])[0]
        return [Check("run", backend, False, f"failed: {type(e).__name__}: {first}")]


# ---- the report ---------------------------------------------------------------------------------

@dataclass
class ParityReport:
    """Every check's verdict; truthy when all pass and at least one backend ran."""

    tolerance: Tolerance
    reference: str
    model_dir: str
    settings: dict = field(default_factory=dict)  # prompts, steps, sampling, seed
    checks: list[Check] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it could not run
    notes: list[str] = field(default_factory=list)

    @property
    def backends_run(self) -> list[str]:
        return list(dict.fromkeys(c.backend for c in self.checks if c.backend != "-"))

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def __bool__(self) -> bool:
        return bool(self.backends_run) and not self.failures()

    def verdict(self) -> str:
        if not self.backends_run:
            return "NOT OK: no backend could run here (all skipped), so nothing was checked"
        if self.failures():
            return "NOT OK: failed " + ", ".join(f"{c.name} ({c.backend})" for c in self.failures())
        return (f"OK: {len(self.checks)} checks pass on {', '.join(self.backends_run)} "
                f"(tolerance {self.tolerance.name}: atol {self.tolerance.atol:g}, rtol {self.tolerance.rtol:g})")

    def table(self) -> str:
        """The short human table: one row per check, then the skipped backends, then the verdict."""
        rows = [("backend", "check", "result", "figure")]
        rows += [(c.backend, c.name, "OK" if c.ok else "NOT OK", c.figure) for c in self.checks]
        rows += [(name, "-", "skipped", reason) for name, reason in self.skipped.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        return "\n".join([*lines, *[f"note: {n}" for n in self.notes], self.verdict()])

    def to_json(self) -> dict:
        """Every number, JSON-safe (inf and NaN become strings)."""
        return _json_safe({
            "passed": bool(self), "verdict": self.verdict(), "reference": self.reference,
            "model_dir": self.model_dir, "tolerance": asdict(self.tolerance), "settings": self.settings,
            "checks": [asdict(c) for c in self.checks], "skipped": self.skipped, "notes": self.notes,
        })


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.generic,)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def plot_report(report: ParityReport, path: str | Path) -> Path:
    """A PNG of the per-position max |logit error| of each backend, log scale, decode steps shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise GptExportError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(10, 4))
    forward = [c for c in report.checks if c.name == "forward"]
    for c in forward:
        ax.plot(np.maximum(c.details["per_position"]["max_abs"], 1e-12), lw=1, marker=".", label=c.backend)
    if forward:
        for i, label in enumerate(forward[0].details["per_position"]["labels"]):
            if " decode " in label:
                ax.axvspan(i - 0.5, i + 0.5, color="0.92", lw=0)
            elif label.endswith(" prefill 0") and i:  # where the next prompt starts
                ax.axvline(i - 0.5, color="0.6", lw=0.5, ls=":")
    ax.axhline(report.tolerance.atol, color="tab:red", ls="--", lw=1, label=f"atol {report.tolerance.atol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("position: each prompt's prefill, then its decode steps (shaded)")
    ax.set_ylabel("max |logit - PyTorch|")
    ax.set_title(f"{Path(report.model_dir).name}: logit error against the PyTorch reference"
                 + ("" if forward else " (no backend ran)"))
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as e:
        raise GptExportError(f"{path}: cannot write plot ({e.strerror})") from None
    finally:
        plt.close(fig)
    return Path(path)


# ---- run_parity ---------------------------------------------------------------------------------

@dataclass
class ParityOptions:
    """What to run and how strictly. prompts: texts (encoded with the model's tokenizer) or id lists."""

    prompts: list[str | list[int]] | None = None  # None: DEFAULT_PROMPTS
    steps: int = DEFAULT_STEPS
    sampling: SamplingParams = DEFAULT_SAMPLING
    seed: int = DEFAULT_SEED
    backends: tuple[str, ...] | str = BACKENDS  # names, or "all" / "a,b"
    tolerance: str | None = None  # preset name; None: the model directory's dtype
    atol: float | None = None
    rtol: float | None = None
    threads: int | None = None
    tf32: bool = False  # ort-cuda runs fp32 matmuls in TF32; an fp32 directory's default preset becomes tf32


def parse_backends(backends: tuple[str, ...] | list[str] | str) -> list[str]:
    """Backend names, aliases resolved, duplicates dropped; "all" is every backend gptexport has."""
    from . import backends as backends_pkg

    names = backends.split(",") if isinstance(backends, str) else list(backends)
    names = [n.strip() for n in names if n.strip()]
    if not names or names == ["all"]:
        return list(BACKENDS)
    aliases = getattr(backends_pkg, "_ALIASES", {})
    out = []
    for name in names:
        name = aliases.get(name, name)
        if name not in BACKENDS:
            raise UsageError(f"--backends: unknown backend {name!r}; valid: all, {', '.join(BACKENDS)}")
        if name not in out:
            out.append(name)
    return out


def resolve_prompts(prompts: list[str | list[int]] | None, md: ModelDir) -> list[np.ndarray]:
    """Token id arrays of the prompts; texts go through the model directory's tokenizer."""
    from .tokenizer import check_token_ids

    tok, vocab = md.tokenizer(), md.config.vocab_size
    if not prompts:
        prompts = _default_prompts(tok, vocab)
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tok is None:
                raise UsageError("this model directory has no tokenizer: give prompts with --prompt-tokens")
            p = tok.encode(p)
        if len(p) == 0:
            raise UsageError("a prompt is empty: give at least one token")
        check_token_ids(list(p), vocab)
        out.append(np.asarray(p, dtype=np.int64))
    return out


def _default_prompts(tok, vocab: int) -> list[list[int]]:
    if tok is not None:
        try:
            return [tok.encode(text) for text in DEFAULT_PROMPTS]
        except TokenizerError:
            pass  # a vocabulary without these characters: fall back to token ids
    return [[0], [(7 * i + 3) % vocab for i in range(12)]]


SHAPE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "activation")


def check_same_model(ref: Reference, md: ModelDir) -> None:
    """A reference and a model directory of different architectures cannot be compared at all."""
    a, b = ref.config.to_dict(), md.config.to_dict()
    diff = [f"{k} {a[k]} vs {b[k]}" for k in SHAPE_FIELDS if a.get(k) != b.get(k)]
    if diff:
        raise GptExportError(f"{md.path}: model differs from the reference {ref.source} ({', '.join(diff)}); "
                             "was it converted from another checkpoint?")


def open_backend(name: str, md: ModelDir, threads: int | None, tf32: bool = False) -> Runner:
    """The activated runner; BackendUnavailable when its library, provider, GPU or engine is missing.
    `tf32` applies to ort-cuda (a TensorRT engine's TF32 was chosen at build)."""
    if name == "tensorrt" and "tensorrt" not in md.manifest:  # the manifest records a built engine
        raise BackendUnavailable(f"{md.path} has no TensorRT engine (build one with `gptexport build {md.path}`)")
    if name == "onnxruntime" and md.dtype == "bf16":  # a known gap, not a broken export
        raise BackendUnavailable("ONNX Runtime's CPU provider has no bfloat16 kernels (Add, MatMul, Softmax); "
                                 "check a bf16 model on ort-cuda or tensorrt")
    try:
        runner = open_runner(name, md, threads, tf32=tf32 and name == "ort-cuda")
        runner.activate()
    except ImportError as e:  # e.g. the TensorRT runner or its bindings not installed
        raise BackendUnavailable(f"not installed here ({e})") from e
    return runner


def run_parity(model_dir: str | Path, ckpt: str | Path | None = None, *, golden: str | Path | None = None,
               options: ParityOptions | None = None, save_golden_to: str | Path | None = None,
               progress: Callable[[str], None] | None = None) -> ParityReport:
    """Check every backend of `model_dir` against `ckpt` in PyTorch fp32, or against a golden file.

    With `golden` torch is never imported; prompts, steps and sampling settings then come from
    the file. `save_golden_to` writes the reference built from `ckpt` for later golden runs.
    """
    options, say = options or ParityOptions(), progress or (lambda m: None)
    if (ckpt is None) == (golden is None):
        raise UsageError("give either a checkpoint CKPT or --golden FILE, exactly one")
    if golden is not None and save_golden_to is not None:
        raise UsageError("--save-golden needs CKPT: a golden file is written from the PyTorch reference")
    if options.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {options.steps}")
    backends = parse_backends(options.backends)
    md = load_model_dir(model_dir)
    precision = md.manifest.get("quantization") or md.dtype  # `gptexport quantize` keeps dtype fp32
    if options.tf32 and precision == "fp32":
        precision = "tf32"
    tol = tolerance_for(precision, options.tolerance, options.atol, options.rtol)
    notes: list[str] = []
    ref = _reference(md, ckpt, golden, options, say, notes)
    check_same_model(ref, md)
    if save_golden_to is not None:
        say(f"wrote golden file {save_golden(ref, save_golden_to)}")
    source = ref.source if golden is None else f"{golden} (golden file of {ref.source})"
    settings = {"prompts": [p.tolist() for p in ref.prompts], "steps": ref.steps, "sampling": ref.sampling,
                "seed": ref.seed, "backends": backends, "tf32": options.tf32,
                "source_precision": ref.source_precision}
    if ref.source_precision not in (None, "fp32"):
        notes.append(f"the checkpoint stores its weights in {ref.source_precision}: the reference runs them "
                     "upcast to fp32")
    report = ParityReport(tol, source, str(md.path), settings, notes=notes)
    report.checks.append(sampler_check(ref.sampler_logits, ref.probes, ref.sampler_probs))
    for name in backends:
        check_backend(report, name, md, ref, options.threads, say, options.tf32)
    return report


def check_backend(report: ParityReport, name: str, md: ModelDir, ref: Reference, threads: int | None,
                  say: Callable[[str], None], tf32: bool = False) -> None:
    """Add one backend's checks to `report`, or the reason it cannot run here to report.skipped."""
    try:
        runner = open_backend(name, md, threads, tf32)
    except UsageError:
        raise
    except BackendUnavailable as e:
        report.skipped[name] = str(e)
        say(f"{name}: skipped ({e})")
        return
    except GptExportError as e:  # it could run here but cannot load the model: a failure
        report.checks.append(Check("run", name, False, f"cannot load: {e}"))
        return
    say(f"{name}: checking")
    try:
        report.checks += backend_checks(name, runner, ref, report.tolerance)
    finally:
        runner.deactivate()


def _reference(md: ModelDir, ckpt, golden, options: ParityOptions, say: Callable[[str], None],
               notes: list[str]) -> Reference:
    if golden is not None:
        if options.prompts:
            raise UsageError("--golden: prompts come from the golden file; drop --prompt/--prompts/--prompt-tokens")
        ref = load_golden(golden)
        say(f"reference: golden file {golden} ({len(ref.prompts)} prompts, {ref.steps} steps)")
        return ref
    prompts = resolve_prompts(options.prompts, md)
    block = md.config.block_size
    notes += [f"prompt {i} has {len(p)} tokens, more than block_size {block}: its last {block} are used"
              for i, p in enumerate(prompts) if len(p) > block]
    say(f"reference: {ckpt} in PyTorch fp32 ({len(prompts)} prompts, {options.steps} steps)")
    return build_reference(ckpt, prompts, options.steps, options.sampling, options.seed)


def read_prompts_file(path: str | Path) -> list[str]:
    """--prompts FILE: one prompt per line, blank lines skipped, a literal \\n stands for a newline."""
    from .generate import read_text_file

    path = Path(path)
    lines = read_text_file(path, "prompts file").splitlines()
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise GptExportError(f"{path}: prompts file has no prompts (one per line)")
    return prompts


def write_json_report(report: ParityReport, path: str | Path) -> Path:
    """--json FILE: every number of the report."""
    try:
        Path(path).write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
    except OSError as e:
        raise GptExportError(f"{path}: cannot write JSON report ({e.strerror or e})") from None
    return Path(path)


# ---- command-line helpers (gptexport parity) ----------------------------------------------------

def parity_paths(paths: tuple[Path, ...], golden: Path | None) -> tuple[Path | None, Path]:
    """(CKPT, OUTDIR) from the command line: `CKPT OUTDIR`, or only `OUTDIR` with --golden."""
    usage = "--golden FILE OUTDIR" if golden is not None else "CKPT OUTDIR"
    if len(paths) != (1 if golden is not None else 2):
        raise UsageError(f"expected `gptexport parity {usage}`, got {len(paths)} path(s)")
    return (None, paths[0]) if golden is not None else (paths[0], paths[1])


def prompt_sources(texts: tuple[str, ...], file: Path | None, token_lists: tuple[str, ...]) -> list | None:
    """Prompts from exactly one of --prompt (texts), --prompts FILE and --prompt-tokens; None: defaults."""
    from .tokenizer import parse_token_ids

    if sum([bool(texts), file is not None, bool(token_lists)]) > 1:
        raise UsageError("give prompts with only one of --prompt, --prompts and --prompt-tokens")
    if file is not None:
        return read_prompts_file(file)
    if token_lists:
        return [parse_token_ids(t) for t in token_lists]
    return list(texts) or None


def sampling_params(temperature: float | None, top_k: int | None, top_p: float | None) -> SamplingParams:
    """The sampling settings of the KL and sampling checks; unset ones are `gptexport generate`'s defaults."""
    d = DEFAULT_SAMPLING
    return SamplingParams(d.temperature if temperature is None else temperature, d.top_k if top_k is None else top_k,
                          top_p)
