import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import engine_generate, full_forward
from onnx import TensorProto, helper, numpy_helper

from gptexport.artifacts.files import sha256_file
from gptexport.artifacts.modeldir import MANIFEST, load_model_dir
from gptexport.cli import main
from gptexport.convert.quantize import (
    compare_quality,
    cross_entropy,
    evaluate,
    fold_constant_transposes,
    fuse_cpu_ops,
    held_out_ids,
    quantize,
    tokenizer_files,
)
from gptexport.errors import UsageError
from gptexport.runtime.backends.ort import OrtRunner
from gptexport.runtime.sampling import SamplingParams

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n" * 8


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / request.param
    return request.param, quantize(tiny_model_dir, out, request.param, progress=lambda m: None)


def _ops(model_dir) -> set[str]:
    return {n.op_type for n in onnx.load(str(model_dir / "model.onnx")).graph.node}


def test_quantized_dir_is_a_complete_model_dir(quantized, tiny_model_dir):
    method, out = quantized
    md = load_model_dir(out)  # verifies every file's sha256
    src = json.loads((tiny_model_dir / MANIFEST).read_text())
    assert md.manifest["quantization"] == method and md.dtype == "fp32"  # I/O and cache stay fp32
    assert md.manifest["quantization_config"]["source_files"] == {"model.onnx": src["files"]["model.onnx"]["sha256"]}
    assert md.manifest["files"]["model.onnx"]["sha256"] == sha256_file(out / "model.onnx")
    assert md.manifest["io_spec"] == src["io_spec"] and md.manifest["tokenizer"] == src["tokenizer"]
    assert not list(out.parent.glob(".*partial*"))


def test_weights_are_quantized_as_asked(quantized):
    method, out = quantized
    ops = _ops(out)
    if method == "int8":
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "MatMulNBits" not in ops
    else:
        assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    # no MatMul is left reading an fp32 weight: the activation @ activation ones (attention) remain
    model = onnx.load(str(out / "model.onnx"))
    fp32_inits = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and set(n.input) & fp32_inits]


def test_quantized_model_generates(quantized):
    _, out = quantized
    runner = OrtRunner(load_model_dir(out))
    tokens = engine_generate(runner, np.array([[1, 2, 3], [4, 5, 6]]), 20, SamplingParams(0.0))
    assert tokens.shape == (2, 20) and ((0 <= tokens) & (tokens < runner.config.vocab_size)).all()


def test_quality_against_the_source(quantized, tiny_model_dir):
    method, out = quantized
    q = compare_quality(tiny_model_dir, out, TEXT, fraction=1.0)
    assert q.tokens > 0 and 0 <= q.top1_agreement <= 1 and q.max_abs_logit_diff > 0
    assert abs(q.perplexity_increase) < 0.5  # random weights: logits are small, so errors are too
    same = compare_quality(tiny_model_dir, tiny_model_dir, TEXT, fraction=1.0)
    assert same.top1_agreement == 1.0 and same.perplexity == same.perplexity_fp32


def test_refuses_a_quantized_source_and_an_existing_out(quantized, tiny_model_dir, tmp_path):
    _, out = quantized
    with pytest.raises(UsageError, match="quantize an fp32"):
        quantize(out, tmp_path / "again", "int8", progress=lambda m: None)
    before = (out / MANIFEST).read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        quantize(tiny_model_dir, out, "int8", progress=lambda m: None)
    assert (out / MANIFEST).read_bytes() == before


def test_fold_constant_transposes_keeps_the_graph_s_meaning():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)  # (vocab, n_embd), read both ways like a tied weight
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["y"]), helper.make_node("Gather", ["W", "i"], ["e"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                                           helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5]),
                               helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert fold_constant_transposes(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Gather"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(inits["Wt"], w.T)
    assert "W" in inits  # still read by the Gather


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("gelu_tanh", True), ("gelu", False)])
def test_fuse_cpu_ops_keeps_the_graph_s_meaning_and_its_attention(activation, bias, tmp_path):
    """Layer norms and GELUs (exact: nanoGPT's; tanh: GPT-2's) become ONNX Runtime's fused ops, the
    attention stays the explicit mask graph, and the logits and new keys/values are the graph's."""
    from conftest import write_tiny_checkpoint

    from gptexport.convert.export import convert

    md = load_model_dir(convert(write_tiny_checkpoint(tmp_path / "ckpt.pt", activation=activation, bias=bias),
                                tmp_path / "fp32", progress=lambda m: None))
    model = onnx.load(str(md.onnx_path))
    fused, counts = fuse_cpu_ops(onnx.load(str(md.onnx_path)), md.config)
    L = md.config.n_layer
    gelu = "FastGelu" if activation == "gelu_tanh" else "Gelu"
    assert counts["SkipLayerNormalization"] == 2 * L and counts.get(gelu, 0) + counts.get("BiasGelu", 0) == L
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("Softmax") == L and ops.count("Where") >= L and "LayerNormalization" in ops  # ln_1 of block 0
    assert len(ops) < len(model.graph.node) - 6 * L

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    c, P, T = md.config, 5, 3
    feeds = {"input_ids": rng.integers(0, c.vocab_size, (2, T)), "past_length": np.array([5, 2]),
             "logit_positions": np.arange(T)}
    feeds.update({n: rng.standard_normal((2, c.n_head, P, c.head_dim)).astype(np.float32) for n in md.spec.past_names})

    def run(m: onnx.ModelProto) -> list:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    for want, got in zip(run(model), run(fused)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_cross_entropy():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]], np.float32))
    assert cross_entropy(logits, np.array([[0, 2]])) == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2, rel=1e-6)
    assert cross_entropy(np.zeros((1, 4, 7), np.float32), np.zeros((1, 4), np.int64)) == pytest.approx(np.log(7))


def test_evaluate_scores_consecutive_windows(tiny_model_dir):
    """evaluate's windows and targets equal a position-by-position computation."""
    runner = OrtRunner(load_model_dir(tiny_model_dir))
    T = runner.config.block_size
    ids = np.random.default_rng(0).integers(0, runner.config.vocab_size, 3 * T + 5)
    loss, logits = evaluate(runner, ids)
    assert logits.shape == (3, T, runner.config.vocab_size)
    want = [cross_entropy(full_forward(runner, ids[None, w * T: (w + 1) * T])["logits"],
                          ids[None, w * T + 1: (w + 1) * T + 1])
            for w in range(3)]
    assert loss == pytest.approx(np.mean(want), rel=1e-5)


def test_held_out_ids_take_the_end_of_the_text(tiny_model_dir):
    tok = load_model_dir(tiny_model_dir).tokenizer()
    assert tok.decode(held_out_ids("abcdefghij", tok, 0.3).tolist()) == "hij"
    with pytest.raises(UsageError, match="eval-fraction"):
        held_out_ids("abc", tok, 0.0)


def test_tokenizer_files_are_the_ones_the_manifest_names(tiny_model_dir):
    md = load_model_dir(tiny_model_dir)
    assert tokenizer_files(md) == []  # a char vocab lives in the manifest
    md.manifest = {**md.manifest, "tokenizer": {"type": "gpt2", "files": {"encoder.json": "encoder.json",
                                                                          "vocab.bpe": "vocab.bpe"}}}
    assert tokenizer_files(md) == ["encoder.json", "vocab.bpe"]


def test_cli_quantize(tiny_model_dir, tmp_path):
    text = tmp_path / "val.txt"
    text.write_text(TEXT)
    r = CliRunner().invoke(main, ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "q"), "--int4",
                                  "--eval-text", str(text), "--eval-fraction", "1.0"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert set(report) >= {"perplexity_fp32", "perplexity", "top1_agreement", "perplexity_increase"}
    r = CliRunner().invoke(main, ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "q2")])
    assert r.exit_code == 2 and "--int8 or --int4" in r.output


def test_quantize_and_evaluate_without_torch(tiny_model_dir, tmp_path):
    """quantize is a runtime module: it must work where torch cannot be imported."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from gptexport.convert.quantize import quantize, compare_quality\n"
            f"quantize({str(tiny_model_dir)!r}, {str(tmp_path / 'q')!r}, 'int8', progress=lambda m: None)\n"
            f"print(compare_quality({str(tiny_model_dir)!r}, {str(tmp_path / 'q')!r}, {TEXT!r}, 1.0).tokens)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) > 0


def test_big_weights_live_beside_the_graph(tiny_ckpt, tmp_path, monkeypatch):
    """Above EXTERNAL_DATA_BYTES, export writes model.onnx.data, which ORT maps; quantize keeps that
    layout; manifests hash the data file; the quantized model records both source files."""
    from gptexport.convert import export

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    src = export.convert(tiny_ckpt, tmp_path / "fp32", progress=lambda m: None)
    out = quantize(src, tmp_path / "int4", "int4", progress=lambda m: None)
    for d in (src, out):
        md = load_model_dir(d)
        assert set(md.manifest["files"]) == {"model.onnx", "model.onnx.data"}
    assert set(load_model_dir(out).manifest["quantization_config"]["source_files"]) == {"model.onnx", "model.onnx.data"}
    tokens = engine_generate(OrtRunner(load_model_dir(out)), np.array([[1, 2]]), 5, SamplingParams(0.0))
    assert tokens.shape == (1, 5)
