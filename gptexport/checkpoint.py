"""Load nanoGPT checkpoints and local Hugging Face GPT-2 directories into `GPT`, safely.

Two inputs are accepted:
- a file written by nanoGPT's train.py: {'model', 'model_args', 'optimizer', 'iter_num',
  'best_val_loss', 'config'};
- a local Hugging Face GPT-2 directory, single-file or sharded (hf_dir.py).

Every pickle is read with torch.load(weights_only=True): a checkpoint is data, and a pickle that
asks to call a function (a `__reduce__` payload) is refused instead of run. Every failure is a
CheckpointError whose one-line message names the file.

Memory: weights are memory-mapped, never copied on the way in; `load_model` builds the GPT on the
meta device and assigns the checkpoint's tensors to it, so a model costs its weight bytes once
(plus a converted copy only when its dtype changes). The optimizer state is never read.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from .config import ACTIVATIONS, GPTConfig
from .errors import CheckpointError
from .model import GPT

COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps the model and prefixes every key with this
MASK_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not weights
TIED = ("transformer.wte.weight", "lm_head.weight")
INT_ARGS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
MAX_LISTED = 3  # offending keys named in one error message
PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Checkpoint:
    config: GPTConfig
    state_dict: dict[str, torch.Tensor]  # as stored (dtype, memory-mapped), nanoGPT's names and layout
    path: Path
    kind: str  # "nanogpt" | "hf-gpt2"
    train_config: dict = field(default_factory=dict)  # nanoGPT's ckpt['config'], or {}
    iter_num: int | None = None
    best_val_loss: float | None = None
    precision: str = "fp32"  # of the stored weights: fp32, fp16, bf16 (or e.g. "fp16+fp32" if mixed)
    stamps: dict[Path, tuple] = field(default_factory=dict)  # file_stamp of every file read, taken before reading

    def source_record(self) -> dict:
        """What a model directory's manifest says about where it came from."""
        return {"checkpoint": Path(self.path).name, "kind": self.kind, "precision": self.precision,
                "iter_num": self.iter_num, "best_val_loss": self.best_val_loss}


def file_stamp(path: Path) -> tuple:
    """What changes when a file is rewritten: device, inode, size and modification time (ns)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_unchanged(stamps: dict[Path, tuple]) -> None:
    """Refuse weights read from a file that was rewritten while they were in use.

    The weights stay memory-mapped until they are no longer read, and a rewrite in place (nanoGPT's
    train.py saves ckpt.pt over the old one) shows through the mapping: the export could mix two
    checkpoints' weights, quietly.
    """
    for path, stamp in stamps.items():
        try:
            same = file_stamp(path) == stamp
        except OSError:
            same = False
        if not same:
            raise CheckpointError(f"{path}: changed while it was being converted (its weights are read in place; "
                                  "is training still writing it?); nothing was written: convert it again")


def precision_of(sd: dict[str, torch.Tensor]) -> str:
    """fp32 / fp16 / bf16 (other dtypes by torch's name), '+'-joined when the tensors disagree."""
    names = {PRECISIONS.get(v.dtype, str(v.dtype).removeprefix("torch.")) for v in sd.values()}
    return "+".join(sorted(names)) or "fp32"


# ---------------------------------------------------------------------------------------------
# Reading files


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _refusal_detail(e: BaseException) -> str:
    """What torch's long weights_only message says was refused, without its advice: torch suggests
    allow-listing the class or weights_only=False, i.e. running code from the file."""
    for line in str(e).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            line = line.strip().removeprefix("WeightsUnpickler error: ")
            return re.split(r" was not an allowed global| Please use|\. Please", line)[0].rstrip(".")
    return _first_line(e)


def _pickle_globals(path: Path) -> list[str]:
    """The classes and functions a torch.save pickle names, read with pickletools: nothing is run."""
    try:
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    except (zipfile.BadZipFile, OSError, StopIteration, ValueError):
        try:
            data = path.read_bytes()  # the legacy format: the pickle comes first
        except OSError:
            return []
    names, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a corrupt or truncated pickle: whatever was read so far
        pass
    return names


def _pickled_module(path: Path) -> str | None:
    """The class of the nn.Module pickled into `path` (torch.save(model)), or None."""
    names = _pickle_globals(path)
    if not any(n.startswith("torch.nn.modules.") for n in names):
        return None
    return next((n for n in names if not n.startswith(("torch.", "collections.", "builtins.", "__builtin__."))),
                next(n for n in names if n.startswith("torch.nn.modules.")))


def _sniff(path: Path) -> None:
    """Reject files that are plainly not torch.save output before handing them to the unpickler."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from e
    if not head:
        raise CheckpointError(f"{path}: file is empty (0 bytes); expected a torch.save checkpoint")
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: file is truncated or corrupt (incomplete zip archive)")
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:  # is_zipfile only checks the end
            raise CheckpointError(f"{path}: file is truncated or corrupt (zip archive: {_first_line(e)})") from e
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(f"{path}: is a zip archive but not a torch.save checkpoint (no data.pkl)")
        return
    if head.startswith(b"\x80"):  # pickle protocol >= 2: torch's legacy format
        return
    try:
        head.decode("utf-8")
        looks = "it looks like a text/JSON file"
    except UnicodeDecodeError:
        looks = f"unrecognised format, starts with {head[:8]!r}"
    raise CheckpointError(f"{path}: not a PyTorch checkpoint: {looks}")


def torch_load(path: Path) -> object:
    """torch.load with weights_only=True, every failure turned into a one-line CheckpointError."""
    _sniff(path)
    # mmap: the optimizer state (2x the model) is never read into memory; callers copy what they keep
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        module = _pickled_module(path)
        if module is not None:
            raise CheckpointError(
                f"{path}: holds a pickled model object ({module}, saved with torch.save(model)), not its weights; "
                "unpickling it would run code, so it is not loaded. Save a state dict instead, as nanoGPT's "
                "train.py does: torch.save({'model': model.state_dict(), 'model_args': {...}}, 'ckpt.pt'), "
                "or a Hugging Face model with model.save_pretrained(DIR)") from e
        raise CheckpointError(
            f"{path}: refused to unpickle: not plain tensors/containers (weights_only): {_refusal_detail(e)}"
        ) from e
    except EOFError as e:
        raise CheckpointError(f"{path}: file is truncated (unexpected end of file)") from e
    except Exception as e:  # torch raises RuntimeError, KeyError, ValueError... for corrupt files
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {_first_line(e)})") from e


# ---------------------------------------------------------------------------------------------
# nanoGPT checkpoints


def config_from_model_args(model_args: object, path: Path) -> GPTConfig:
    """GPTConfig from nanoGPT's model_args; missing keys take GPTConfig defaults, unknown ones are ignored."""
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{path}: model_args is a {type(model_args).__name__}, expected a dict")
    known = {f.name for f in fields(GPTConfig)}
    args = {k: v for k, v in model_args.items() if k in known}
    for k in INT_ARGS:
        v = args.get(k, getattr(GPTConfig, k))
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CheckpointError(f"{path}: model_args {k}={v!r} is not a positive integer")
    config = GPTConfig(**args)
    if config.n_embd % config.n_head:
        raise CheckpointError(
            f"{path}: model_args n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    if not isinstance(config.bias, bool):
        raise CheckpointError(f"{path}: model_args bias={config.bias!r} is not True or False")
    if isinstance(config.dropout, bool) or not isinstance(config.dropout, (int, float)) or not 0 <= config.dropout < 1:
        raise CheckpointError(f"{path}: model_args dropout={config.dropout!r} is not a number in [0, 1)")
    if config.activation not in ACTIVATIONS:
        raise CheckpointError(
            f"{path}: model_args activation={config.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    return config


def clean_state_dict(sd: dict, path: Path) -> dict[str, torch.Tensor]:
    """Strip torch.compile's prefix, drop causal-mask buffers; tensors stay memory-mapped (no copy)."""
    return renamed_weights(sd, path, lambda key: key.removeprefix(COMPILED_PREFIX))


def renamed_weights(sd: dict, path: Path, rename: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """The tensors of a state dict under our names (`rename`), causal-mask buffers dropped, nothing
    copied; an entry that is not a name and a tensor is refused, naming the file."""
    out = {}
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state dict entry {key!r} is a {type(value).__name__}, expected a tensor")
        # only exact suffixes: attn.c_attn.bias / attn.c_proj.bias are real weights when bias=True
        if not key.endswith(MASK_SUFFIXES):
            out[rename(key)] = value
    return out


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


# ---------------------------------------------------------------------------------------------
# Public API


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a nanoGPT checkpoint file or a local Hugging Face GPT-2 directory (weights on CPU)."""
    from . import hf_dir  # imports this module: imported here, not at the top

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


def _names(keys: list[str]) -> str:
    more = f" (and {len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


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


def empty_model(config: GPTConfig) -> GPT:
    """The GPT on the meta device: shapes only, no memory, no random initialisation."""
    with torch.device("meta"):
        return GPT(config)


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path,
                     complete: bool = True) -> None:
    """strict load_state_dict's checks, with one-line messages naming the file and keys.

    `complete=False` checks a part (one shard): no unexpected keys, no wrong shapes."""
    missing = [k for k in expected if k not in sd] if complete else []
    if missing:
        raise CheckpointError(f"{path}: missing weights: {_names(missing)}")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected weights: {_names(unexpected)}")
    wrong = [f"{k} expected {tuple(expected[k].shape)} got {tuple(sd[k].shape)}"
             for k in sd if sd[k].shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{path}: wrong weight shapes: {_names(wrong)}")


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
