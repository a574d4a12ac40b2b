"""The checks of a parity run, each a verdict with its one-line figure and every number behind it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..runtime.backends.base import Runner
from ..runtime.sampling import SamplingParams, logits_to_probs
from .batched import CROP_STEPS, batched_verdict, crop_probe
from .golden import Outputs, Reference
from .measure import generate_recorded, measure, recompute_last
from .metrics import (
    TOPK_OVERLAP,
    Divergence,
    error_stats,
    greedy_divergence,
    kl_divergence,
    needed_tolerance,
    sampled_divergence,
    top1_agreement,
    topk_overlap,
    within_fraction,
)
from .tolerance import Tolerance

SAMPLER_ATOL = 1e-6  # numpy sampler vs nanoGPT's torch code, on probabilities


@dataclass
class Check:
    """One check's verdict: `figure` is the table's one line, `details` every number (for --json)."""

    name: str  # sampler, forward, generation, sampling, cache, batched, or run (the backend crashed)
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

    def probs(x: np.ndarray) -> np.ndarray:
        return logits_to_probs(x, kl_params.temperature, kl_params.top_k, kl_params.top_p)

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
    divs = [greedy_divergence(rt, gt, rl, tol)
            for rt, gt, rl in zip(o.greedy_tokens, got.greedy_tokens, o.greedy_logits)]
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
    return recompute_last(runner, contexts), past


def cache_check(backend: str, runner: Runner, ref: Reference, got: Outputs, tol: Tolerance) -> Check:
    """The generation loop's logits (cached decode, crop) against a full recompute, same backend."""
    block = runner.config.block_size
    # a probe that starts one short of block_size: one decode fills the window, then it slides
    start = crop_probe(ref, block)
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
                sampling_check(backend, ref, got, tol), cache_check(backend, runner, ref, got, tol),
                Check("batched", backend, *batched_verdict(runner, ref, got, tol))]
    except Exception as e:  # any backend failure is a finding to report, not a traceback
        first = (str(e).splitlines() or [""])[0]
        return [Check("run", backend, False, f"failed: {type(e).__name__}: {first}")]
