"""The loader that picks the reader: a nanoGPT checkpoint file or a local Hugging Face GPT-2
directory -> Checkpoint, and a Checkpoint -> our GPT with its weights.

Memory: weights are memory-mapped, never copied on the way in; `load_model` builds the GPT on the
meta device and assigns the checkpoint's tensors to it, so a model costs its weight bytes once
(plus a converted copy only when its dtype changes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from . import hf_dir
from .checkpoint import TIED, Checkpoint, check_state_dict, empty_model
from .model import GPT
from .nanogpt import load_nanogpt


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a nanoGPT checkpoint file or a local Hugging Face GPT-2 directory (weights on CPU)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if hf_dir.is_hf_dir(path):
            return hf_dir.load_hf_dir(path)
        hint = f"; did you mean {path / 'ckpt.pt'}?" if (path / "ckpt.pt").is_file() else ""
        if (path / "config.json").is_file():
            raise CheckpointError(f"{path}: has config.json but no {hf_dir.WEIGHTS_WANTED}")
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file or a Hugging Face GPT-2 "
                              f"directory (config.json + {hf_dir.WEIGHTS_WANTED}){hint}")
    return load_nanogpt(path)


def _tie_weights(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Fill in whichever of wte/lm_head is absent; refuse two different tensors for the tied pair."""
    wte, head = (sd.get(k) for k in TIED)
    if wte is None and head is None:
        return sd
    sd = dict(sd)
    if wte is None or head is None:
        sd[TIED[0]] = sd[TIED[1]] = head if wte is None else wte
    elif wte.shape != head.shape or not (wte.data_ptr() == head.data_ptr() or torch.equal(wte, head)):
        raise CheckpointError(f"{path}: {TIED[0]} and {TIED[1]} differ, but this model ties them")
    return sd


def load_model(source: str | Path | Checkpoint, dtype: torch.dtype = torch.float32) -> GPT:
    """A GPT with the checkpoint's weights in `dtype` (fp32: fp16/bf16 weights are upcast), in eval mode.

    The checkpoint's tensors become the parameters (memory-mapped, not copied) when they already
    have `dtype`; otherwise each is converted once.
    """
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    model = empty_model(ckpt.config)
    sd = _tie_weights(ckpt.state_dict, ckpt.path)
    check_state_dict(sd, model.state_dict(), ckpt.path)
    converted = {k: v.to(dtype) for k, v in sd.items() if k != TIED[1]}
    converted[TIED[1]] = converted[TIED[0]]  # one tensor for the tied pair, converted once
    model.load_state_dict(converted, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters: tie them again
    return model.eval().requires_grad_(False)
