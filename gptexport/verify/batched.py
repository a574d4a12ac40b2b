"""The `batched` check: the prompts as rows of one engine, as a server runs them.

Every other check runs each prompt alone. Here the reference's prompts and the cache check's probe
(one short of block_size, so it crosses block_size and slides its window while the others decode)
are submitted to one scheduler one step apart: rows at different lengths, admitted at different
steps, the cache growing under them, decoded together in one forward per step. Each row's tokens
must be those of the same prompt run alone on the same backend (a divergence only at a near-tie of
the alone run's logits) and its logits within tolerance of the alone run's, up to where the tokens
part: a row whose cache was written wrong fails by itself, and the check names every row. The
reference's prompts' logits, pooled over the rows as the forward check pools its positions, must be
within tolerance of the reference's at the preset's share, or, where the prompts alone already fall
short of it (a quantized model's decode steps can: int8 on the shipped model is 98.2 % within alone),
at that share of the alone runs' own: batching may not take the rows further from the reference than
the preset allows of the model itself. (Quantized activations are scaled per tensor, across the
rows, so a quantized batched row is not bit-equal to it alone.)
"""

from __future__ import annotations

import numpy as np

from ..runtime.backends.base import Runner
from ..runtime.sampling import SamplingParams
from ..runtime.scheduler import Scheduler
from .golden import Outputs, Reference
from .measure import generate_recorded, probed, recorded
from .metrics import error_stats, greedy_divergence, within_fraction
from .tolerance import Tolerance

CROP_STEPS = 4  # greedy steps of the probe that starts one short of block_size


def crop_probe(ref: Reference, block_size: int) -> np.ndarray:
    """block_size - 1 tokens (the first prompt and its greedy tokens, repeated): one decode fills the
    window, then it slides."""
    return np.resize(np.concatenate([ref.prompts[0], ref.outputs.greedy_tokens[0]]), max(1, block_size - 1))


def run_together(runner: Runner, prompts: list[np.ndarray], steps: list[int], seed: int) -> list[tuple]:
    """Greedy (tokens, logits) of each prompt as a row of one scheduler, the i-th submitted at step i."""
    scheduler = Scheduler(runner, max_batch=len(prompts))
    try:
        seqs = []
        for prompt, n in zip(prompts, steps):
            seqs.append(scheduler.submit(probed(prompt, n, SamplingParams(0.0), seed)))
            scheduler.step()
        scheduler.run()
    finally:
        scheduler.close()
    return [recorded(s) for s in seqs]


def _compare(label: str, got: tuple, alone: tuple, ref: tuple | None, tol: Tolerance) -> dict:
    """One row against its alone run (and the reference): its verdict and numbers."""
    (tokens, logits), (alone_tokens, alone_logits) = got, alone
    div = greedy_divergence(alone_tokens, tokens, alone_logits, tol)
    upto = len(tokens) if div is None else div.step + 1  # the logits of identical contexts
    vs_alone = within_fraction(alone_logits[:upto].astype(np.float64), logits[:upto], tol)
    row = {"row": label, "steps": len(tokens), "identical_to_alone": div is None,
           "divergence": None if div is None else {"step": div.step, "gap": div.gap, "excused": div.excused},
           "max_abs_vs_alone": error_stats(alone_logits[:upto].astype(np.float64), logits[:upto])["max_abs"],
           "within_vs_alone": vs_alone}
    ok = (div is None or div.excused) and vs_alone >= tol.within
    if ref is not None:
        r, g = reference_rows(got, ref)
        row["max_abs_vs_reference"] = error_stats(r, g)["max_abs"]
    row["ok"] = bool(ok)
    return row


def reference_rows(got: tuple, ref: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The reference's logits and a row's, up to and including the first step where their tokens part."""
    (tokens, logits), (ref_tokens, ref_logits) = got, ref
    parted = np.flatnonzero(ref_tokens[:len(tokens)] != tokens)
    n = len(tokens) if not len(parted) else int(parted[0]) + 1
    return ref_logits[:n].astype(np.float64), logits[:n]


def pooled_vs_reference(runs: list[tuple], refs: list[tuple | None], tol: Tolerance) -> tuple[float, float]:
    """Share of logits within tolerance, and max |d|, of the reference prompts' rows against the reference."""
    pairs = [reference_rows(t, r) for t, r in zip(runs, refs) if r is not None]
    r, g = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    return within_fraction(r, g, tol), error_stats(r, g)["max_abs"]


def batched_verdict(runner: Runner, ref: Reference, got: Outputs, tol: Tolerance) -> tuple[bool, str, dict]:
    """The prompts and the crop probe together on one engine against each alone (see the module):
    (ok, the report's one line, every row's numbers)."""
    block = runner.config.block_size
    probe = crop_probe(ref, block)
    prompts = [ref.prompts[0], probe, *ref.prompts[1:]]  # the probe early: it slides while the others decode
    steps = [ref.steps, CROP_STEPS, *[ref.steps] * (len(ref.prompts) - 1)]
    together = run_together(runner, prompts, steps, ref.seed)
    alone = [(got.greedy_tokens[0], got.greedy_logits[0]),
             generate_recorded(runner, probe, CROP_STEPS, SamplingParams(0.0), ref.seed),
             *zip(got.greedy_tokens[1:], got.greedy_logits[1:])]
    refs = [(ref.outputs.greedy_tokens[i], ref.outputs.greedy_logits[i]) for i in range(len(ref.prompts))]
    refs = [refs[0], None, *refs[1:]]
    labels = ["p0", f"probe crossing block_size {block}", *[f"p{i}" for i in range(1, len(ref.prompts))]]
    rows = [_compare(f"{label} (admitted at step {i})", t, a, r, tol)
            for i, (label, t, a, r) in enumerate(zip(labels, together, alone, refs))]
    bad = [r for r in rows if not r["ok"]]
    vs_ref, worst_ref = pooled_vs_reference(together, refs, tol)
    alone_vs_ref, _ = pooled_vs_reference(alone, refs, tol)
    needed = min(tol.within, alone_vs_ref * tol.within)
    same = sum(r["identical_to_alone"] for r in rows)
    worst = max(r["max_abs_vs_alone"] for r in rows)
    if bad:
        r = bad[0]
        why = (f"tokens diverged from alone at step {r['divergence']['step']}" if r["divergence"] and
               not r["divergence"]["excused"] else f"logits off alone by {r['max_abs_vs_alone']:.1e}")
        figure = f"{len(bad)}/{len(rows)} rows wrong: row {r['row']}: {why}"
    elif vs_ref < needed:
        figure = (f"the rows' logits off the reference: {vs_ref:.2%} within (alone {alone_vs_ref:.2%}), "
                  f"max|d| {worst_ref:.1e}")
    else:
        within = "" if vs_ref == 1.0 else f" ({vs_ref:.2%} within)"
        figure = (f"{len(rows)} rows admitted a step apart, one crossing block_size {block}: {same}/{len(rows)} "
                  f"identical to alone; max|d| vs alone {worst:.1e}, vs reference {worst_ref:.1e}{within}")
    details = {"rows": rows, "block_size": block, "within_vs_reference": vs_ref, "max_abs_vs_reference": worst_ref,
               "alone_within_vs_reference": alone_vs_ref, "needed_within_vs_reference": needed}
    return not bad and vs_ref >= needed, figure, details
