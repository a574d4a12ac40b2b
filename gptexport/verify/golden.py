"""The reference side of a parity run: its inputs and the PyTorch outputs, in memory or in a golden file.

A golden file lets a deployment box without torch check its backends: it is an .npz whose
`header` array holds a small JSON document (the config, prompts, steps, sampling settings) as
UTF-8 bytes, and whose other arrays are the reference logits, tokens and sampler probabilities.
It is read with np.load(allow_pickle=False), so loading one runs no code. Never imports torch.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..artifacts.files import atomic_file
from ..config import GPTConfig
from ..errors import GptExportError, check_format

GOLDEN_FORMAT = "gptexport-golden"
GOLDEN_VERSION = 1


@dataclass
class Outputs:
    """What one runner computed on the reference's inputs, per prompt.

    forward_logits[i]: (T_i + k_i, V) logits of prompt i at every prefill position, then at k_i
    decode steps fed the reference's greedy tokens one by one (while the context fits in
    block_size). greedy_/sampled_tokens[i]: (steps,) generated tokens, greedy and seeded
    sampling; greedy_/sampled_logits[i]: (steps, V) the logits each token was chosen from.
    """

    forward_logits: list[np.ndarray] = field(default_factory=list)
    greedy_tokens: list[np.ndarray] = field(default_factory=list)
    greedy_logits: list[np.ndarray] = field(default_factory=list)
    sampled_tokens: list[np.ndarray] = field(default_factory=list)
    sampled_logits: list[np.ndarray] = field(default_factory=list)


PER_PROMPT = [f.name for f in fields(Outputs)]


@dataclass
class Reference:
    """The PyTorch reference: its inputs, its Outputs, and nanoGPT's torch sampler probabilities.

    sampler_probs[j] are the probabilities nanoGPT's torch code gives `sampler_logits` under the
    j-th (temperature, top_k, top_p) of `probes`.
    """

    config: GPTConfig
    source: str
    prompts: list[np.ndarray]
    steps: int
    sampling: dict  # temperature, top_k, top_p
    seed: int
    outputs: Outputs = field(default_factory=Outputs)
    probes: list[tuple] = field(default_factory=list)  # (temperature, top_k, top_p)
    sampler_logits: np.ndarray | None = None
    sampler_probs: list[np.ndarray] = field(default_factory=list)
    source_precision: str | None = None  # how the checkpoint stored its weights (fp32, fp16, bf16); the
    # reference always runs in fp32. None: unknown (a golden file written before it was recorded)

    def header(self) -> dict:
        return {"format": GOLDEN_FORMAT, "format_version": GOLDEN_VERSION, "config": self.config.to_dict(),
                "source": self.source, "source_precision": self.source_precision,
                "prompts": [p.tolist() for p in self.prompts], "steps": self.steps,
                "sampling": self.sampling, "seed": self.seed, "probes": [list(p) for p in self.probes]}


def save_golden(ref: Reference, path: str | Path) -> Path:
    """Write `ref` to `path` (.npz), atomically: a half-written golden file is never left behind."""
    path = Path(path)
    arrays = {"header": np.frombuffer(json.dumps(ref.header()).encode(), dtype=np.uint8)}
    for name in PER_PROMPT:
        for i, a in enumerate(getattr(ref.outputs, name)):
            arrays[f"{name}.{i}"] = a
    arrays["sampler_logits"] = ref.sampler_logits
    for j, p in enumerate(ref.sampler_probs):
        arrays[f"sampler_probs.{j}"] = p.astype(np.float32)  # float32 keeps 1e-7 of a probability
    try:
        with atomic_file(path) as f:  # a file object: np.savez would append .npz to a bare name
            np.savez_compressed(f, **arrays)
    except OSError as e:
        raise GptExportError(f"{path}: cannot write golden file ({e.strerror})") from None
    return path


def load_golden(path: str | Path) -> Reference:
    """Read a golden file written by save_golden; a wrong or damaged file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise GptExportError(f"{path}: golden file not found "
                             f"(write one with `gptexport parity CKPT OUTDIR --save-golden FILE`)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        header = json.loads(arrays.pop("header").tobytes().decode())
    except (OSError, EOFError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise GptExportError(f"{path}: not a gptexport golden file ({type(e).__name__}: {e})") from None
    check_format(header, path, "golden file", GOLDEN_FORMAT, GOLDEN_VERSION)
    try:
        return _reference_from(header, arrays)
    except (KeyError, TypeError, ValueError) as e:
        raise GptExportError(f"{path}: damaged golden file ({type(e).__name__}: {e})") from None


def _reference_from(header: dict, arrays: dict) -> Reference:
    n = len(header["prompts"])
    ref = Reference(GPTConfig(**header["config"]), header["source"],
                    [np.asarray(p, dtype=np.int64) for p in header["prompts"]], int(header["steps"]),
                    dict(header["sampling"]), int(header["seed"]),
                    probes=[tuple(p) for p in header["probes"]], sampler_logits=arrays["sampler_logits"],
                    source_precision=header.get("source_precision"))
    for name in PER_PROMPT:
        setattr(ref.outputs, name, [arrays[f"{name}.{i}"] for i in range(n)])
    ref.sampler_probs = [arrays[f"sampler_probs.{j}"] for j in range(len(ref.probes))]
    return ref
