"""The reference of a parity run: the checkpoint's GPT in PyTorch fp32, and what it computes.

`TorchRunner` runs the checkpoint through the same graph contract as every backend (fp32, no TF32,
no autocast); `build_reference` records its outputs on the parity inputs, and nanoGPT's own torch
sampler's probabilities. torch is imported when a reference is built, never at import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.backends.base import Runner
from ..runtime.sampling import SamplingParams
from .golden import Reference
from .measure import measure

# sampler settings checked against torch besides the user's: plain, top-k, top-k + top-p, top-p
PROBES = ((1.0, None, None), (0.7, 5, None), (1.3, 40, 0.9), (1.0, None, 0.5))
SAMPLER_ROWS = 16  # reference logit rows the sampler check uses (and the same rows rounded)
TIE_GRID = 0.25  # logits rounded to this grid have many exact ties: top-k must keep them all


class TorchRunner(Runner):
    """Runs `GPT.forward_cached` of a checkpoint in fp32, no TF32, no autocast."""

    name = "pytorch"

    def __init__(self, ckpt: str | Path):
        import torch

        from ..config import io_spec
        from ..convert.loader import load_checkpoint, load_model

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.torch = torch
        checkpoint = load_checkpoint(ckpt)
        self.source_precision = checkpoint.precision  # fp16/bf16 weights are upcast: the reference is fp32
        self.model = load_model(checkpoint, torch.float32)
        self.config = self.model.config
        self.spec = io_spec(self.config, "fp32")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        past = [t[name].float() for name in self.spec.past_names]
        with torch.no_grad():
            logits, new = self.model.forward_cached(t["input_ids"], t["past_length"], t["logit_positions"], past)
        out = {"logits": logits.numpy()}
        out.update({name: v.numpy() for name, v in zip(self.spec.new_names, new)})
        return out


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
    runner = TorchRunner(ckpt)
    prompts = [p[-runner.config.block_size:] for p in prompts]
    sampling = {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p}
    ref = Reference(runner.config, str(ckpt), prompts, steps, sampling, seed, source_precision=runner.source_precision)
    ref.outputs = measure(runner, prompts, steps, params, seed)
    ref.probes = probes_for(params)
    ref.sampler_logits = sampler_rows(ref.outputs.forward_logits)
    ref.sampler_probs = [nanogpt_probs(ref.sampler_logits, *probe) for probe in ref.probes]
    return ref
