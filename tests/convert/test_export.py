import json
import os

import numpy as np
import onnx
import pytest
import torch

from gptexport.artifacts.modeldir import MANIFEST, load_model_dir
from gptexport.convert.export import convert, validation_feeds
from gptexport.errors import UsageError
from gptexport.runtime.backends.ort import OrtRunner
from gptexport.verify.reference import TorchRunner


def test_model_dir_describes_itself(tiny_model_dir):
    manifest = json.loads((tiny_model_dir / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["opset"] == 18 and manifest["dtype"] == "fp32"
    assert set(manifest["files"]) == {"model.onnx"}
    assert manifest["tokenizer"]["type"] == "char"
    assert manifest["versions"]["torch"] == torch.__version__
    md = load_model_dir(tiny_model_dir)
    assert md.config.block_size == 16 and md.tokenizer().decode(md.tokenizer().encode("Hi there")) == "Hi there"
    assert not list(tiny_model_dir.parent.glob(".*partial*"))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_convert_frees_the_weights_before_onnx_runtime_loads_them(tmp_path):
    """Peak memory: by validation, the checkpoint (whose mapped tensors were the model's weights)
    is unmapped, although the exporter's leftovers outlive the export (export.release_weights)."""
    from conftest import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "run" / "ckpt.pt")
    mapped_at_validation = []

    def progress(msg: str) -> None:
        if msg.startswith("validated"):
            mapped_at_validation.append(any(line.rstrip().endswith(str(ckpt)) for line in open("/proc/self/maps")))

    convert(ckpt, tmp_path / "m", progress=progress)
    assert mapped_at_validation == [False]


def test_a_checkpoint_rewritten_mid_convert_is_refused(tmp_path):
    """Training saves ckpt.pt over the old one; the weights are memory-mapped, so a rewrite during the
    convert would show through and could mix two checkpoints: refused, and nothing written."""
    from conftest import assert_nothing_written, write_tiny_checkpoint

    from gptexport.errors import CheckpointError

    ckpt = write_tiny_checkpoint(tmp_path / "run" / "ckpt.pt")

    def progress(msg: str) -> None:
        if msg.startswith("exported"):
            write_tiny_checkpoint(ckpt, seed=1)  # the next save of a training run, in place

    out = tmp_path / "m"
    with pytest.raises(CheckpointError, match="changed while it was being converted"):
        convert(ckpt, out, progress=progress)
    assert_nothing_written(out)
    convert(ckpt, out, progress=lambda m: None)  # the new, complete checkpoint converts


def test_attention_is_an_explicit_mask_graph(tiny_model_dir):
    ops = {n.op_type for n in onnx.load(str(tiny_model_dir / "model.onnx")).graph.node}
    assert {"MatMul", "Softmax", "Where"} <= ops
    assert not ops & {"Attention", "MultiHeadAttention", "GroupQueryAttention", "ScaledDotProductAttention"}


@pytest.mark.parametrize("batch,seq,past,capacity", [(1, 1, 0, 0), (1, 16, 0, 0), (3, 7, 0, 0), (2, 1, 9, 9),
                                                     (2, 1, 15, 15), (1, 4, 5, 12), (4, 2, 3, 3)])
def test_onnxruntime_matches_pytorch_at_every_position(tiny_ckpt, tiny_model_dir, batch, seq, past, capacity):
    torch_runner, ort_runner = TorchRunner(tiny_ckpt), OrtRunner(load_model_dir(tiny_model_dir))
    feeds = validation_feeds(torch_runner.config, torch_runner.spec, batch, seq, past, capacity,
                             np.random.default_rng(seq))
    want, got = torch_runner.infer(feeds), ort_runner.infer(feeds)
    assert got["logits"].shape == (batch, seq, torch_runner.config.vocab_size)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=0, err_msg=name)


def test_cached_forward_matches_nanogpt_forward(tiny_ckpt):
    """Prefill then decode with the cache equals nanoGPT's full forward, position by position."""
    runner = TorchRunner(tiny_ckpt)
    idx = torch.randint(0, runner.config.vocab_size, (2, 12))
    full = [runner.model(idx[:, : t + 1])[0][:, -1].numpy() for t in range(12)]
    cache = runner.new_batch_cache(2, 12)
    logits = cache.prefill(0, idx[:, :5].numpy(), all_positions=True)
    for t in range(5):
        np.testing.assert_allclose(logits[:, t], full[t], atol=1e-5)
    for t in range(5, 12):
        np.testing.assert_allclose(cache.decode(idx[:, t].numpy()), full[t], atol=1e-5)


def test_refuses_existing_out_dir(tiny_ckpt, tiny_model_dir):
    before = (tiny_model_dir / MANIFEST).read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        convert(tiny_ckpt, tiny_model_dir, progress=lambda m: None)
    assert (tiny_model_dir / MANIFEST).read_bytes() == before


def test_force_replaces(tiny_ckpt, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert(tiny_ckpt, out, force=True, progress=lambda m: None)
    assert not (out / "stale.txt").exists() and (out / MANIFEST).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
