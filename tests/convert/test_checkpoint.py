"""load_checkpoint / load_model on real files: nanoGPT checkpoints, HF GPT-2 directories, bad inputs."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from gptexport.config import GPTConfig
from gptexport.convert.checkpoint import Checkpoint
from gptexport.convert.loader import load_checkpoint, load_model
from gptexport.convert.model import GPT
from gptexport.errors import CheckpointError

TINY = dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def model_args(model: GPT) -> dict:
    """nanoGPT's model_args: GPTConfig's fields without `activation`, which nanoGPT does not have."""
    args = asdict(model.config)
    args.pop("activation")
    return args


def nanogpt_ckpt(gpt: GPT, **changes) -> dict:
    """The dict nanoGPT's train.py saves, optimizer included; `changes` replace its entries."""
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
    ckpt = {
        "model": gpt.state_dict(),
        "optimizer": opt.state_dict(),
        "model_args": model_args(gpt),
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.5),
        "config": {"dataset": "shakespeare_char", "batch_size": 12},
    }
    ckpt.update(changes)
    return ckpt


def save(obj, path):
    torch.save(obj, path)
    return path


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx, idx)[0]  # with targets: logits at every position


IDX = torch.tensor([[1, 5, 9, 2, 31, 0, 7]])


def error_for(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# nanoGPT checkpoints


def test_nanogpt_roundtrip(tmp_path):
    model = tiny_gpt()
    path = save(nanogpt_ckpt(model), tmp_path / "ckpt.pt")
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint) and ckpt.kind == "nanogpt" and ckpt.path == path
    assert ckpt.config == model.config
    assert ckpt.iter_num == 250 and ckpt.best_val_loss == pytest.approx(1.5)
    assert ckpt.train_config["dataset"] == "shakespeare_char"
    loaded = load_model(path)
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    assert torch.equal(logits(loaded, IDX), logits(model, IDX))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied


def mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `path` (Linux's /proc/self/maps)."""
    out = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_fp32_weights_are_mapped_not_copied(tmp_path):
    """The checkpoint's tensors become the parameters: memory-mapped from the file, never copied."""
    path = save(nanogpt_ckpt(tiny_gpt()), tmp_path / "ckpt.pt")
    model = load_model(path)
    ranges = mapped_ranges(path)
    assert ranges and all(any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_precision_weights_upcast_once(tmp_path, stored):
    model = tiny_gpt()
    sd = {k: v.to(stored) for k, v in model.state_dict().items()}
    path = save(nanogpt_ckpt(model, model=sd), tmp_path / "ckpt.pt")
    ckpt = load_checkpoint(path)
    assert ckpt.precision == {torch.float16: "fp16", torch.bfloat16: "bf16"}[stored]
    loaded = load_model(ckpt)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # one upcast copy for the tied pair
    assert torch.equal(loaded.transformer.wpe.weight, sd["transformer.wpe.weight"].float())
    kept = load_model(ckpt, stored)
    assert kept.transformer.wpe.weight.data_ptr() == ckpt.state_dict["transformer.wpe.weight"].data_ptr()


def test_load_model_accepts_a_checkpoint(tmp_path):
    model = tiny_gpt()
    ckpt = load_checkpoint(save(nanogpt_ckpt(model), tmp_path / "ckpt.pt"))
    assert torch.equal(logits(load_model(ckpt), IDX), logits(model, IDX))


def test_compiled_prefix_and_mask_buffers(tmp_path):
    model = tiny_gpt(bias=True)
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    for i in range(model.config.n_layer):  # old nanoGPT / HF-style causal-mask buffers
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    ckpt = load_checkpoint(save(nanogpt_ckpt(model, model=sd), tmp_path / "ckpt.pt"))
    assert all(not k.startswith("_orig_mod.") for k in ckpt.state_dict)
    assert "transformer.h.0.attn.c_attn.bias" in ckpt.state_dict  # real weights, kept
    assert not any(k.endswith((".attn.bias", ".attn.masked_bias")) for k in ckpt.state_dict)
    assert torch.equal(logits(load_model(ckpt), IDX), logits(model, IDX))


def test_bias_false_model(tmp_path):
    model = tiny_gpt(bias=False)
    path = save(nanogpt_ckpt(model), tmp_path / "ckpt.pt")
    assert torch.equal(logits(load_model(path), IDX), logits(model, IDX))


@pytest.mark.parametrize("keep", ["transformer.wte.weight", "lm_head.weight"])
def test_one_tied_weight_is_enough(tmp_path, keep):
    model = tiny_gpt()
    drop = ({"transformer.wte.weight", "lm_head.weight"} - {keep}).pop()
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != drop}
    path = save(nanogpt_ckpt(model, model=sd), tmp_path / "ckpt.pt")
    assert torch.equal(logits(load_model(path), IDX), logits(model, IDX))


def test_untied_weights_refused(tmp_path):
    model = tiny_gpt()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] += 1
    msg = error_for(save(nanogpt_ckpt(model, model=sd), tmp_path / "ckpt.pt"))
    assert "differ" in msg


def test_a_key_with_a_newline_is_named_on_one_line(tmp_path):
    """Found by test_fuzz: a mutated key "t\\nansformer.wte.weight" split the error over two lines."""
    model = tiny_gpt()
    sd = dict(model.state_dict())
    sd["t\nansformer.wte.weight"] = sd["transformer.wpe.weight"]  # an extra, unexpected key
    msg = error_for(save(nanogpt_ckpt(model, model=sd), tmp_path / "ckpt.pt"))  # asserts one line
    assert "'t\\nansformer.wte.weight'" in msg


def test_missing_model_args_keys_use_defaults(tmp_path):
    model = tiny_gpt()  # bias=True and dropout=0.0 are GPTConfig's defaults
    args = {k: v for k, v in model_args(model).items() if k not in ("bias", "dropout")}
    args["some_future_key"] = 1  # unknown keys are ignored
    path = save(nanogpt_ckpt(model, model_args=args), tmp_path / "ckpt.pt")
    assert load_checkpoint(path).config == model.config
    assert torch.equal(logits(load_model(path), IDX), logits(model, IDX))


def test_optional_fields_absent(tmp_path):
    model = tiny_gpt()
    path = save({"model": model.state_dict(), "model_args": model_args(model)}, tmp_path / "ckpt.pt")
    ckpt = load_checkpoint(path)
    assert ckpt.train_config == {} and ckpt.iter_num is None and ckpt.best_val_loss is None


def test_legacy_torch_save_format(tmp_path):
    model = tiny_gpt()
    path = tmp_path / "old.pt"
    torch.save(nanogpt_ckpt(model), path, _use_new_zipfile_serialization=False)
    assert torch.equal(logits(load_model(path), IDX), logits(model, IDX))


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2 directories


def write_hf_dir(directory, model: GPT, prefix: str = "", safetensors: bool = True, activation="gelu_new"):
    """The inverse of from_pretrained's mapping: HF names, Conv1D (in, out) weights, mask buffers."""
    directory.mkdir()
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # HF ties it to wte and does not store it
        name = prefix + k.removeprefix("transformer.")
        sd[name] = (v.t() if k.endswith(CONV1D) else v).contiguous().clone()
    for i in range(model.config.n_layer):
        sd[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        sd[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    c = model.config
    config = {"model_type": "gpt2", "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
              "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
              "activation_function": activation, "layer_norm_epsilon": 1e-5, "n_inner": None}
    (directory / "config.json").write_text(json.dumps(config))
    if safetensors:
        save_file(sd, str(directory / "model.safetensors"))
    else:
        torch.save(sd, directory / "pytorch_model.bin")
    return directory


@pytest.mark.parametrize("prefix,safetensors", [("", True), ("transformer.", True), ("", False)])
def test_hf_dir_same_logits(tmp_path, prefix, safetensors):
    model = tiny_gpt(activation="gelu_tanh")
    hf = write_hf_dir(tmp_path / "gpt2", model, prefix=prefix, safetensors=safetensors)
    ckpt = load_checkpoint(hf)
    assert ckpt.kind == "hf-gpt2" and ckpt.config == model.config and ckpt.train_config == {}
    assert torch.equal(logits(load_model(ckpt), IDX), logits(model, IDX))


def test_hf_dir_exact_gelu(tmp_path):
    model = tiny_gpt(activation="gelu")
    hf = write_hf_dir(tmp_path / "gpt2", model, activation="gelu")
    assert load_checkpoint(hf).config.activation == "gelu"
    assert torch.equal(logits(load_model(hf), IDX), logits(model, IDX))


def test_hf_dir_unsupported_activation(tmp_path):
    hf = write_hf_dir(tmp_path / "gpt2", tiny_gpt(), activation="relu")
    msg = error_for(hf)
    assert "activation_function 'relu'" in msg


# ---------------------------------------------------------------------------------------------
# Errors: each a one-line CheckpointError naming the file


class MkdirOnLoad:
    """A pickle payload: unpickling it with plain pickle would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_malicious_pickle_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = save({"model": MkdirOnLoad(marker), "model_args": {}}, tmp_path / "ckpt.pt")
    msg = error_for(path)
    assert "refused to unpickle" in msg and "weights_only" in msg
    assert not marker.exists()


def test_malicious_plain_pickle_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    path.write_bytes(pickle.dumps({"model": MkdirOnLoad(marker)}, protocol=2))
    error_for(path)
    assert not marker.exists()


def test_malicious_hf_bin_not_run(tmp_path):
    marker = tmp_path / "pwned"
    hf = tmp_path / "gpt2"
    write_hf_dir(hf, tiny_gpt(), safetensors=False)
    save({"wte.weight": MkdirOnLoad(marker)}, hf / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused to unpickle"):
        load_checkpoint(hf)
    assert not marker.exists()


def test_missing_path(tmp_path):
    assert "no such file" in error_for(tmp_path / "nope.pt")


def test_directory_not_hf(tmp_path):
    (tmp_path / "out").mkdir()
    save({}, tmp_path / "out" / "ckpt.pt")
    msg = error_for(tmp_path / "out")
    assert "Hugging Face" in msg and "ckpt.pt" in msg  # hints at the file inside


def test_hf_dir_without_weights(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text("{}")
    assert "model.safetensors" in error_for(tmp_path / "gpt2")


def test_empty_file(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert "empty" in error_for(tmp_path / "ckpt.pt")


def test_truncated_zip(tmp_path):
    full = save(nanogpt_ckpt(tiny_gpt()), tmp_path / "full.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(full[: len(full) // 2])
    assert "truncated" in error_for(tmp_path / "ckpt.pt")


def test_truncated_legacy(tmp_path):
    torch.save(nanogpt_ckpt(tiny_gpt()), tmp_path / "full.pt", _use_new_zipfile_serialization=False)
    full = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(full[: len(full) // 2])
    error_for(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("text", ['{"model": 1}', "hello world\n"])
def test_text_file(tmp_path, text):
    (tmp_path / "ckpt.pt").write_text(text)
    assert "text" in error_for(tmp_path / "ckpt.pt")


def test_other_zip(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "ckpt.pt", "w") as z:
        z.writestr("x.txt", "hi")
    assert "not a torch.save" in error_for(tmp_path / "ckpt.pt")


def test_not_a_dict(tmp_path):
    assert "list" in error_for(save([1, 2, 3], tmp_path / "ckpt.pt"))


@pytest.mark.parametrize("drop", ["model", "model_args"])
def test_dict_without_required_key(tmp_path, drop):
    ckpt = nanogpt_ckpt(tiny_gpt())
    del ckpt[drop]
    assert repr(drop) in error_for(save(ckpt, tmp_path / "ckpt.pt"))


def test_plain_state_dict_is_not_a_checkpoint(tmp_path):
    assert "not a nanoGPT checkpoint" in error_for(save(tiny_gpt().state_dict(), tmp_path / "ckpt.pt"))


def test_inconsistent_model_args(tmp_path):
    ckpt = nanogpt_ckpt(tiny_gpt(), model_args={**TINY, "n_embd": 100, "n_head": 3})
    msg = error_for(save(ckpt, tmp_path / "ckpt.pt"))
    assert "model_args n_embd=100 is not divisible by n_head=3" in msg


@pytest.mark.parametrize("key,value", [("n_layer", 0), ("vocab_size", "32"), ("block_size", 1.5)])
def test_non_positive_int_model_args(tmp_path, key, value):
    ckpt = nanogpt_ckpt(tiny_gpt(), model_args={**TINY, key: value})
    assert f"{key}={value!r}" in error_for(save(ckpt, tmp_path / "ckpt.pt"))


def test_missing_weights(tmp_path):
    model = tiny_gpt()
    sd = {k: v for k, v in model.state_dict().items() if ".h.1." not in k}
    msg = error_for(save(nanogpt_ckpt(model, model=sd), tmp_path / "ckpt.pt"))
    assert "missing weights: transformer.h.1." in msg and "more" in msg


def test_unexpected_weights(tmp_path):
    model = tiny_gpt()
    sd = {**model.state_dict(), "transformer.h.2.ln_1.weight": torch.ones(16)}
    msg = error_for(save(nanogpt_ckpt(model, model=sd), tmp_path / "ckpt.pt"))
    assert "unexpected weights: transformer.h.2.ln_1.weight" in msg


def test_wrong_shapes(tmp_path):
    big = tiny_gpt(vocab_size=64)
    ckpt = nanogpt_ckpt(big, model_args={**model_args(big), "vocab_size": 32})
    msg = error_for(save(ckpt, tmp_path / "ckpt.pt"))
    assert "transformer.wte.weight expected (32, 16) got (64, 16)" in msg


def test_bias_mismatch_reports_missing_biases(tmp_path):
    model = tiny_gpt(bias=False)
    ckpt = nanogpt_ckpt(model, model_args={**model_args(model), "bias": True})
    assert "missing weights" in error_for(save(ckpt, tmp_path / "ckpt.pt"))
