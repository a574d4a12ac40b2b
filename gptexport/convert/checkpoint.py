"""What every checkpoint reader shares: the Checkpoint record, torch.load made safe, config and
state-dict checks with one-line errors.

Every pickle is read with torch.load(weights_only=True): a checkpoint is data, and a pickle that
asks to call a function (a `__reduce__` payload) is refused instead of run. Every failure is a
CheckpointError whose one-line message names the file.
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

from ..config import ACTIVATIONS, GPTConfig
from ..errors import CheckpointError, first_line
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


def _refusal_detail(e: BaseException) -> str:
    """What torch's long weights_only message says was refused, without its advice: torch suggests
    allow-listing the class or weights_only=False, i.e. running code from the file."""
    for line in str(e).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            line = line.strip().removeprefix("WeightsUnpickler error: ")
            return re.split(r" was not an allowed global| Please use|\. Please", line)[0].rstrip(".")
    return first_line(e)


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
            raise CheckpointError(f"{path}: file is truncated or corrupt (zip archive: {first_line(e)})") from e
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
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first_line(e)})") from e


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


def _names(keys: list[str]) -> str:
    """Up to MAX_LISTED keys for a one-line message: a key from the file with a newline or another
    unprintable character is shown quoted, escaped (repr), so the message stays one line."""
    more = f" (and {len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return ", ".join(k if k.isprintable() else repr(k) for k in keys[:MAX_LISTED]) + more


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
