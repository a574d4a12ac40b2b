"""The PyTorch reference: the checkpoint's GPT in fp32, run through the same graph contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Runner


class TorchRunner(Runner):
    """Runs `GPT.forward_cached` of a checkpoint in fp32, no TF32, no autocast."""

    name = "pytorch"

    def __init__(self, ckpt: str | Path):
        import torch

        from ..checkpoint import load_checkpoint, load_model
        from ..config import io_spec

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
