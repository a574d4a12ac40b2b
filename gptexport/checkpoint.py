"""Load nanoGPT checkpoints and local Hugging Face GPT-2 directories into `GPT`, safely.

Two inputs are accepted:
- a file written by nanoGPT's train.py: {'model', 'model_args', 'optimizer', 'iter_num',
  'best_val_loss', 'config'};
- a local Hugging Face GPT-2 directory: config.json + model.safetensors or pytorch_model.bin.

Every pickle is read with torch.load(weights_only=True): a checkpoint is data, and a pickle that
asks to call a function (a `__reduce__` payload) is refused instead of run. Every failure is a
CheckpointError whose one-line message names the file.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .config import ACTIVATIONS, GPTConfig
from .errors import CheckpointError
from .model import GPT

COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps the model and prefixes every key with this
MASK_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not weights
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TIED = ("transformer.wte.weight", "lm_head.weight")
INT_ARGS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
MAX_LISTED = 3  # offending keys named in one error message


@dataclass
class Checkpoint:
    config: GPTConfig
    state_dict: dict[str, torch.Tensor]
    path: Path
    kind: str  # "nanogpt" | "hf-gpt2"
    train_config: dict = field(default_factory=dict)  # nanoGPT's ckpt['config'], or {}
    iter_num: int | None = None
    best_val_loss: float | None = None


# ---------------------------------------------------------------------------------------------
# Reading files


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _refusal_detail(e: BaseException) -> str:
    """The line of torch's long weights_only message that says what was refused."""
    for line in str(e).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().rstrip(".")
    return _first_line(e)


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
    """Strip torch.compile's prefix, drop causal-mask buffers, copy tensors out of the mmap'd file."""
    out = {}
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state dict entry {key!r} is a {type(value).__name__}, expected a tensor")
        if key.startswith(COMPILED_PREFIX):
            key = key[len(COMPILED_PREFIX):]
        # only exact suffixes: attn.c_attn.bias / attn.c_proj.bias are real weights when bias=True
        if key.endswith(MASK_SUFFIXES):
            continue
        out[key] = value.clone()
    return out


def _optional_number(value: object, kind: type) -> int | float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()  # nanoGPT stores best_val_loss as a 0-d tensor
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return kind(value)
    return None


def load_nanogpt(path: Path) -> Checkpoint:
    """A checkpoint written by nanoGPT's train.py (the optimizer state is never used)."""
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
    return Checkpoint(
        config=config,
        state_dict=clean_state_dict(ckpt["model"], path),
        path=path,
        kind="nanogpt",
        train_config=train_config if isinstance(train_config, dict) else {},
        iter_num=_optional_number(ckpt.get("iter_num"), int),
        best_val_loss=_optional_number(ckpt.get("best_val_loss"), float),
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2 directories


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in HF_WEIGHT_FILES)


def _read_hf_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read JSON ({_first_line(e)})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    return cfg


def _hf_activation(act: object, cfg_path: Path) -> str:
    # HF's "gelu_new" and "gelu_pytorch_tanh" are both the tanh approximation that GPT-2 was trained with
    table = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    if act not in table:
        raise CheckpointError(f"{cfg_path}: activation_function {act!r} is not supported "
                              f"(valid: {', '.join(table)})")
    return table[act]


def _check_hf_architecture(cfg: dict, cfg_path: Path) -> None:
    """Refuse GPT-2 options that change the computation, which our GPT does not implement."""
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{cfg_path}: model_type {cfg['model_type']!r} is not supported (only 'gpt2')")
    n_inner = cfg.get("n_inner")
    if n_inner is not None and n_inner != 4 * cfg.get("n_embd", 768):
        raise CheckpointError(f"{cfg_path}: n_inner={n_inner} is not supported (the MLP is 4*n_embd wide)")
    if cfg.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise CheckpointError(f"{cfg_path}: layer_norm_epsilon={cfg['layer_norm_epsilon']} is not supported "
                              "(only 1e-5)")
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
        raise CheckpointError(f"{cfg_path}: non-default attention scaling is not supported")


def hf_config(path: Path) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json."""
    cfg = _read_hf_config(path)
    cfg_path = path / "config.json"
    _check_hf_architecture(cfg, cfg_path)
    args = {
        "n_layer": cfg.get("n_layer", 12),
        "n_head": cfg.get("n_head", 12),
        "n_embd": cfg.get("n_embd", 768),
        "block_size": cfg.get("n_positions", 1024),
        "vocab_size": cfg.get("vocab_size", 50257),
        "bias": True,
        "dropout": 0.0,
        "activation": _hf_activation(cfg.get("activation_function", "gelu_new"), cfg_path),
    }
    return config_from_model_args(args, cfg_path)


def _read_hf_weights(path: Path) -> tuple[dict, Path]:
    file = path / "model.safetensors"
    if file.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu"), file
        except Exception as e:  # SafetensorError for truncated/corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors ({_first_line(e)})") from e
    file = path / "pytorch_model.bin"
    sd = torch_load(file)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file}: is a {type(sd).__name__}, expected a state dict")
    return sd, file


def hf_to_nanogpt(sd: dict, file: Path) -> dict[str, torch.Tensor]:
    """HF GPT-2 names and Conv1D layout to nanoGPT's, as nanoGPT's GPT.from_pretrained does."""
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        if key.endswith(MASK_SUFFIXES):
            continue
        if key.startswith("transformer."):
            key = key[len("transformer."):]
        if key != "lm_head.weight":
            key = "transformer." + key
        # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
        out[key] = value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value.clone()
    return out


def load_hf_dir(path: Path) -> Checkpoint:
    """A local Hugging Face GPT-2 directory: config.json + model.safetensors or pytorch_model.bin."""
    config = hf_config(path)
    sd, file = _read_hf_weights(path)
    return Checkpoint(config=config, state_dict=hf_to_nanogpt(sd, file), path=path, kind="hf-gpt2")


# ---------------------------------------------------------------------------------------------
# Public API


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a nanoGPT checkpoint file or a local Hugging Face GPT-2 directory (weights on CPU)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if is_hf_dir(path):
            return load_hf_dir(path)
        hint = f"; did you mean {path / 'ckpt.pt'}?" if (path / "ckpt.pt").is_file() else ""
        if (path / "config.json").is_file():
            raise CheckpointError(f"{path}: has config.json but no {' or '.join(HF_WEIGHT_FILES)}")
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file or a Hugging Face GPT-2 "
                              f"directory (config.json + {' or '.join(HF_WEIGHT_FILES)}){hint}")
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


def check_state_dict(sd: dict[str, torch.Tensor], model: GPT, path: Path) -> None:
    """strict load_state_dict's checks, with one-line messages naming the file and keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: missing weights: {_names(missing)}")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected weights: {_names(unexpected)}")
    wrong = [f"{k} expected {tuple(expected[k].shape)} got {tuple(sd[k].shape)}"
             for k in expected if sd[k].shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{path}: wrong weight shapes: {_names(wrong)}")


def load_model(source: str | Path | Checkpoint) -> GPT:
    """A GPT with the checkpoint's weights, fp32, in eval mode."""
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    model = GPT(ckpt.config)
    sd = _tie_weights(ckpt.state_dict, ckpt.path)
    check_state_dict(sd, model, ckpt.path)
    model.load_state_dict(sd, strict=True)  # copies into the fp32 parameters, casting fp16/bf16
    return model.float().eval()
