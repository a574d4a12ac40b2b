"""The `batched` check: the prompts as rows of one engine, as a server runs them.

Every other check runs each prompt alone. Here the reference's prompts and the cache check's probe
(one short of block_size, so it crosses block_size and slides its window while the others decode)
are submitted to one scheduler one step apart: rows at different lengths, admitted at different
steps, the cache growing under them, decoded together in one forward per step. Each row's tokens
must be those of the same prompt run alone on the same backend (a divergence only at a near-tie of
the alone run's logits), and its logits within tolerance of the alone run's and, for the reference's
prompts, of the reference's, up to where the tokens part. A row whose cache was written wrong fails
by itself: the check reports every row.
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
            seqs.append(probed(scheduler, prompt, n, SamplingParams(0.0), seed))
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
        ref_tokens, ref_logits = ref
        parted = np.flatnonzero(ref_tokens[:len(tokens)] != tokens)
        n = len(tokens) if not len(parted) else int(parted[0]) + 1
        r = ref_logits[:n].astype(np.float64)
        row.update(max_abs_vs_reference=error_stats(r, logits[:n])["max_abs"],
                   within_vs_reference=within_fraction(r, logits[:n], tol))
        ok = ok and row["within_vs_reference"] >= tol.within
    row["ok"] = bool(ok)
    return row


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
    same = sum(r["identical_to_alone"] for r in rows)
    worst = max(r["max_abs_vs_alone"] for r in rows)
    if bad:
        r = bad[0]
        why = (f"tokens diverged from alone at step {r['divergence']['step']}" if r["divergence"] and
               not r["divergence"]["excused"] else
               f"logits off alone by {r['max_abs_vs_alone']:.1e}" if r["within_vs_alone"] < tol.within else
               f"logits off the reference by {r.get('max_abs_vs_reference', 0):.1e}")
        figure = f"{len(bad)}/{len(rows)} rows wrong: row {r['row']}: {why}"
    else:
        vs_ref = max(r.get("max_abs_vs_reference", 0.0) for r in rows)
        figure = (f"{len(rows)} rows admitted a step apart, one crossing block_size {block}: {same}/{len(rows)} "
                  f"identical to alone; max|d| vs alone {worst:.1e}, vs reference {vs_ref:.1e}")
    return not bad, figure, {"rows": rows, "block_size": block}
