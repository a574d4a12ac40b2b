"""Local Hugging Face GPT-2 directories -> Checkpoint: config.json and weights, single-file or sharded.

The weights come as one file (model.safetensors or pytorch_model.bin) or, as `save_pretrained`
writes models over its max_shard_size (5 GB by default), as shards listed by an index
(model.safetensors.index.json or pytorch_model.bin.index.json: a `weight_map` of tensor name ->
shard file). Shards are read one by one, memory-mapped; every shard must exist, hold exactly the
tensors the index gives it, with the config's shapes and the dtype config.json declares
(`torch_dtype`, or `dtype` since transformers 5). fp16 and bf16 weights stay as stored here:
`load_model` converts them to the dtype asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts.files import read_json
from ..config import GPTConfig
from ..errors import CheckpointError, first_line
from .checkpoint import (
    Checkpoint,
    check_state_dict,
    config_from_model_args,
    empty_model,
    file_stamp,
    precision_of,
    renamed_weights,
    torch_load,
)

CONFIG = "config.json"
# in the order transformers prefers them
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
WEIGHTS_WANTED = "model.safetensors or pytorch_model.bin (or their .index.json with shards)"
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_hf_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


# ---------------------------------------------------------------------------------------------
# config.json


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


def hf_config(cfg: dict, cfg_path: Path) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json's contents."""
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


def declared_dtype(cfg: dict, cfg_path: Path) -> torch.dtype | None:
    """The dtype config.json says the weights were saved in, or None when it says nothing."""
    key = "torch_dtype" if "torch_dtype" in cfg else "dtype"  # transformers < 5 wrote torch_dtype
    name = cfg.get(key)
    if name is None:
        return None
    if name not in DTYPES:
        raise CheckpointError(f"{cfg_path}: {key} {name!r} is not supported (valid: {', '.join(DTYPES)})")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------
# Weight files: one file, or the shards of an index


def weight_files(path: Path) -> tuple[dict[Path, list[str] | None], Path]:
    """{file: the tensor names the index puts in it (None for a single file)}, and the file that
    names them all (the single file or the index)."""
    name = next(f for f in WEIGHT_FILES if (path / f).is_file())
    file = path / name
    if not name.endswith(".index.json"):
        return {file: None}, file
    weight_map = read_json(file, "shard index", CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{file}: no 'weight_map' (a JSON object of tensor name -> shard file)")
    shards: dict[Path, list[str]] = {}
    for tensor, shard in weight_map.items():
        if not shard or Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{file}: shard {shard!r} of {tensor} is not a file name in {path}")
        shards.setdefault(path / shard, []).append(tensor)
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard}: missing (a shard listed in {file.name}, "
                                  f"{len(shards)} shards in all)")
    return shards, file


def _is_conv1d(name: object) -> bool:
    return isinstance(name, str) and name.endswith(CONV1D_WEIGHTS)


def read_weights(file: Path) -> dict:
    """One weight file's tensors (safetensors, or a torch.save pickle read weights_only), with HF's
    Conv1D weights, stored (in, out), transposed to nn.Linear's (out, in).

    The others stay memory-mapped. The Conv1D ones (two thirds of GPT-2's weights) are copies: a
    transposed view would change the order of the sums in PyTorch's matmul. From safetensors each
    is read through a mapping of its own, unmapped once copied, so its pages are not held twice;
    a .bin file is one mapping, kept as long as any of its tensors.
    """
    if file.name.endswith(".safetensors"):
        return _read_safetensors(file)
    sd = torch_load(file)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file}: is a {type(sd).__name__}, expected a state dict")
    return {k: v.t().contiguous() if _is_conv1d(k) and isinstance(v, torch.Tensor) else v for k, v in sd.items()}


def _read_safetensors(file: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
            sd = {k: f.get_tensor(k) for k in names if not _is_conv1d(k)}
        for k in filter(_is_conv1d, names):
            with safe_open(str(file), framework="pt") as f:
                sd[k] = f.get_tensor(k).t().contiguous()
    except Exception as e:  # SafetensorError for truncated/corrupt files
        raise CheckpointError(f"{file}: cannot read safetensors, truncated or corrupt ({first_line(e)})") from e
    return {k: sd[k] for k in names}


def _check_listing(sd: dict, listed: list[str], file: Path, index: Path) -> None:
    absent = [k for k in listed if k not in sd]
    if absent:
        raise CheckpointError(f"{file}: has no tensor {absent[0]}"
                              f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}, "
                              f"which {index.name} puts in it")
    unlisted = sorted(set(sd) - set(listed))
    if unlisted:
        raise CheckpointError(f"{file}: holds {unlisted[0]}, which {index.name} does not list in it")


def _check_dtypes(sd: dict, declared: torch.dtype | None, file: Path) -> None:
    for key, value in sd.items():
        if not value.is_floating_point() or value.dtype not in DTYPES.values():
            raise CheckpointError(f"{file}: tensor {key} is {str(value.dtype).removeprefix('torch.')}; "
                                  f"weights must be {', '.join(DTYPES)}")
        if declared is not None and value.dtype != declared:
            raise CheckpointError(f"{file}: tensor {key} is {str(value.dtype).removeprefix('torch.')}, "
                                  f"but {CONFIG} says the weights are {str(declared).removeprefix('torch.')}")


def hf_to_nanogpt(sd: dict, file: Path) -> dict[str, torch.Tensor]:
    """HF GPT-2 names to nanoGPT's, as nanoGPT's GPT.from_pretrained does (read_weights transposed)."""
    return renamed_weights(sd, file, _nanogpt_name)


def _nanogpt_name(key: str) -> str:
    key = key.removeprefix("transformer.")
    return key if key == "lm_head.weight" else "transformer." + key


def load_hf_dir(path: Path) -> Checkpoint:
    """A local Hugging Face GPT-2 directory, single-file or sharded, in the precision it was saved in."""
    cfg_path = path / CONFIG
    cfg = read_json(cfg_path, "config", CheckpointError)
    config, declared = hf_config(cfg, cfg_path), declared_dtype(cfg, cfg_path)
    expected = empty_model(config).state_dict()
    files, names_file = weight_files(path)
    state_dict: dict[str, torch.Tensor] = {}
    stamps = {}
    for file, listed in files.items():
        stamps[file] = file_stamp(file)
        sd = read_weights(file)
        if listed is not None:
            _check_listing(sd, listed, file, names_file)
        part = hf_to_nanogpt(sd, file)
        _check_dtypes(part, declared, file)
        check_state_dict(part, expected, file, complete=False)
        state_dict.update(part)
    return Checkpoint(config=config, state_dict=state_dict, path=path, kind="hf-gpt2",
                      precision=precision_of(state_dict), stamps=stamps)
