"""Checkpoints written by nanoGPT's train.py: {'model', 'model_args', 'optimizer', 'iter_num',
'best_val_loss', 'config'}. The optimizer state is never read: the file is memory-mapped and
only the model's tensors are used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .checkpoint import (
    COMPILED_PREFIX,
    Checkpoint,
    config_from_model_args,
    file_stamp,
    precision_of,
    renamed_weights,
    torch_load,
)


def clean_state_dict(sd: dict, path: Path) -> dict[str, torch.Tensor]:
    """Strip torch.compile's prefix, drop causal-mask buffers; tensors stay memory-mapped (no copy)."""
    return renamed_weights(sd, path, lambda key: key.removeprefix(COMPILED_PREFIX))


def _optional_number(value: object, kind: type) -> int | float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()  # nanoGPT stores best_val_loss as a 0-d tensor
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return kind(value)
    return None


def load_nanogpt(path: Path) -> Checkpoint:
    """A checkpoint written by nanoGPT's train.py (the optimizer state is never used)."""
    stamp = file_stamp(path)
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: checkpoint is a {type(ckpt).__name__}, expected nanoGPT's dict "
                              "with 'model' and 'model_args'")
    missing = [k for k in ("model", "model_args") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a nanoGPT checkpoint: no {' or '.join(repr(k) for k in missing)} "
                              f"key (has: {', '.join(sorted(map(str, ckpt)))[:200]})")
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: 'model' is a {type(ckpt['model']).__name__}, expected a state dict")
    config = config_from_model_args(ckpt["model_args"], path)
    train_config = ckpt.get("config")
    sd = clean_state_dict(ckpt["model"], path)
    return Checkpoint(
        config=config,
        state_dict=sd,
        path=path,
        kind="nanogpt",
        train_config=train_config if isinstance(train_config, dict) else {},
        iter_num=_optional_number(ckpt.get("iter_num"), int),
        best_val_loss=_optional_number(ckpt.get("best_val_loss"), float),
        precision=precision_of(sd),
        stamps={path: stamp},
    )
