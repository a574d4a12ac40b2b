"""`gptexport check --target tensorrt` on real exports, and on crafted graphs TensorRT would refuse."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.build.check import MAX_ELEMENTS, OPS, check_model_dir, check_onnx, check_path
from gptexport.build.shapeflow import shape_reads
from gptexport.cli import main
from gptexport.profiles import ProfileShapes, profile_shapes

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "shakespeare-char" / "ckpt.pt"


def test_tiny_export_passes_for_tensorrt_10_and_11(tiny_model_dir):
    md = load_model_dir(tiny_model_dir)
    for target in ("10", "11"):
        assert check_model_dir(md, target, max_batch=8, opt_seq=4) == []
    result = CliRunner().invoke(main, ["check", str(tiny_model_dir), "--target", "tensorrt"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"ok: {tiny_model_dir / 'model.onnx'}: ") and "opset 18" in result.output
    # the .onnx file alone finds its directory's profiles
    assert check_path(tiny_model_dir / "model.onnx").profiles_checked


@pytest.mark.skipif(not SHIPPED.is_file(), reason="models/shakespeare-char/ckpt.pt is not trained yet")
def test_shipped_model_passes(tmp_path):
    """(fp16 and bf16 exports are checked in test_dtypes.py.)"""
    from gptexport.convert.export import convert

    out = convert(SHIPPED, tmp_path / "m", validate=False, progress=lambda m: None)
    result = CliRunner().invoke(main, ["check", str(out), "--target", "tensorrt", "--max-batch", "4"])
    assert result.exit_code == 0, result.output


def _value(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _crafted(tmp_path, opset=18) -> Path:
    """A graph with one node of each kind TensorRT's parser refuses, and two nodes it takes."""
    nodes = [
        helper.make_node("StringNormalizer", ["text"], ["normalized"], name="normalize_text",
                         case_change_action="LOWER"),
        helper.make_node("Add", ["small", "small"], ["small2"], name="add_int16"),  # Add has no INT16 in TensorRT
        helper.make_node("LayerNormalization", ["x", "gamma"], ["y", "mean"], name="ln_with_mean", axis=-1),
        helper.make_node("Unsqueeze", ["y", "axes_in"], ["y2"], name="unsqueeze_runtime_axes"),  # axes from an input
        helper.make_node("TopK", ["x", "k"], ["vals", "idx"], name="topk_unsorted", sorted=0),
        helper.make_node("FancyOp", ["x"], ["fancy"], name="custom", domain="com.example"),
        helper.make_node("Relu", ["x"], ["relu"], name="fine_relu"),
        helper.make_node("Unsqueeze", ["relu", "axes_const"], ["relu2"], name="fine_unsqueeze"),
    ]
    graph = helper.make_graph(
        nodes, "crafted",
        inputs=[_value("text", TensorProto.STRING, [3]), _value("small", TensorProto.INT16, [4]),
                _value("x", TensorProto.FLOAT, ["batch", 8]), _value("axes_in", TensorProto.INT64, [1]),
                _value("k", TensorProto.INT64, [1])],
        outputs=[_value(n, t, None) for n, t in (("normalized", TensorProto.STRING), ("small2", TensorProto.INT16),
                                                 ("y2", TensorProto.FLOAT), ("vals", TensorProto.FLOAT),
                                                 ("fancy", TensorProto.FLOAT), ("relu2", TensorProto.FLOAT))],
        initializer=[helper.make_tensor("gamma", TensorProto.FLOAT, [8], np.ones(8)),
                     helper.make_tensor("axes_const", TensorProto.INT64, [1], [0]),
                     helper.make_tensor("codes", TensorProto.UINT16, [2], [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.example", 1)])
    path = tmp_path / "crafted.onnx"
    onnx.save(model, str(path))
    return path


def test_crafted_graph_one_finding_per_offending_node(tmp_path):
    report = check_path(_crafted(tmp_path), "10")
    by_where = {f.where: f for f in report.findings}
    assert str(by_where["normalize_text"]) == \
        "normalize_text (StringNormalizer): StringNormalizer is not supported by TensorRT's ONNX parser"
    assert "input small is int16" in by_where["add_int16"].message
    assert by_where["ln_with_mean"].message == "only the first output (Y) is supported"
    assert by_where["unsqueeze_runtime_axes"].message == "`axes` must be a build-time constant"
    assert by_where["topk_unsorted"].message == "`sorted` must be 1; `K` must be a build-time constant"
    assert "custom op com.example::FancyOp" in by_where["custom"].message
    assert "uint16 weights" in by_where["initializer codes"].message
    assert "string is not a TensorRT I/O type" in by_where["input text"].message
    assert by_where["input x"].message.startswith("dynamic dims [batch, 8] have no profile range")
    assert "fine_relu" not in by_where and "fine_unsqueeze" not in by_where
    assert len(report.findings) == len(by_where)  # one finding per node, input or initializer


def test_cli_names_each_offending_node_and_exits_1(tmp_path):
    path = _crafted(tmp_path)
    result = CliRunner().invoke(main, ["check", str(path), "--target", "tensorrt", "--trt-version", "11"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert f"{path}: normalize_text (StringNormalizer): StringNormalizer is not supported" in lines[0]
    assert lines[-1].startswith(f"error: {path}: ") and "problem(s) for TensorRT 11.x" in lines[-1]


def test_opset_outside_the_parsers_range(tmp_path):
    path = tmp_path / "new.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                              [_value("x", TensorProto.FLOAT, [2])], [_value("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)]), str(path))
    assert [str(f) for f in check_path(path, "10").findings] == [
        "model (opset): ai.onnx opset 22 is outside 9..20, the opsets TensorRT 10.x's ONNX parser reads"]
    assert check_path(path, "11").findings == []


def test_weights_beyond_the_per_tensor_limit(tmp_path):
    """Declared, not stored: the check reads initializer dims without loading external data."""
    big = TensorProto(name="big", data_type=TensorProto.FLOAT16, dims=[2**16, 2**15])
    big.data_location = TensorProto.EXTERNAL
    big.external_data.add(key="location", value="big.bin")
    graph = helper.make_graph([helper.make_node("Gather", ["big", "i"], ["y"], name="g")], "g",
                              [_value("i", TensorProto.INT64, [1])], [_value("y", TensorProto.FLOAT16, [1, 2**15])],
                              initializer=[big])
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    assert [str(f) for f in check_path(path).findings] == [
        f"initializer big (initializer): {2**31} elements, more than TensorRT's per-tensor limit of {MAX_ELEMENTS}"]


def test_profiles_must_cover_the_graphs_inputs(tiny_model_dir):
    md = load_model_dir(tiny_model_dir)
    prefill, decode = profile_shapes(md.config, md.spec)
    shapes = {k: v for k, v in decode.shapes.items() if k != "logit_positions"}
    shapes["past_key.0"] = ((1, 3, 1, 16), (1, 3, 8, 16), (1, 3, 16, 16))  # n_head is fixed at 2 in the graph
    report = check_onnx(md.onnx_path, "10", md.config, md.spec, [prefill, ProfileShapes("decode", shapes)])
    messages = [str(f) for f in report.findings]
    assert "input logit_positions (input): dynamic dims [num_logits] have no range in profile decode" in messages
    assert any(m.startswith("input past_key.0 (input): fixed dims [batch, 2, past_sequence, 16] outside profile decode")
               for m in messages)
    assert any(m.startswith("profiles (profile): decode: ") for m in messages)


def test_tables_transcribe_operators_md():
    assert OPS["10"]["MatMul"] == {"FLOAT", "FLOAT16", "BFLOAT16"}
    assert OPS["10"]["Where"] == {"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL"}
    assert "StringNormalizer" not in OPS["10"] and "Swish" not in OPS["10"] and "Swish" in OPS["11"]
    for op in ("Add", "Cast", "Concat", "Erf", "Gather", "LayerNormalization", "Less", "Softmax", "Range"):
        assert "BFLOAT16" in OPS["10"][op]


# ---- past_length and logit_positions reach device kernels only (CUDA graphs) ----------------------

def test_the_export_reads_step_values_in_kernels_only(tiny_model_dir):
    """The real graph consumes past_length and logit_positions (mask, positions, Gather), but no
    shape is computed from their values; the capacity, a shape, may decide shapes."""
    model = onnx.load(str(tiny_model_dir / "model.onnx"))
    assert shape_reads(model.graph, ("past_length", "logit_positions")) == []
    consumers = {n.op_type for n in model.graph.node if "past_length" in n.input or "logit_positions" in n.input}
    assert consumers  # the check is not vacuous: the values do flow into the graph
    # input_ids' values reach no shape either (only its shape does, through Shape)
    assert shape_reads(model.graph, ("input_ids",)) == []


def _doctored(model_dir: Path, tmp_path: Path) -> Path:
    """The exported graph plus two nodes that compute shapes from step values: Range up to
    past_length, and a Slice of input_ids ending at logit_positions."""
    model = onnx.load(str(model_dir / "model.onnx"))
    g = model.graph
    g.initializer.extend([onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"),
                          onnx.numpy_helper.from_array(np.array(1, np.int64), "one"),
                          onnx.numpy_helper.from_array(np.array([0], np.int64), "start0"),
                          onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    g.node.extend([
        helper.make_node("Squeeze", ["past_length"], ["past_scalar"], name="squeeze_past_length"),
        helper.make_node("Range", ["zero", "past_scalar", "one"], ["seen"], name="range_to_past_length"),
        helper.make_node("Slice", ["input_ids", "start0", "logit_positions", "axis1"], ["cut"],
                         name="slice_to_positions"),
    ])
    g.output.extend([_value("seen", TensorProto.INT64, ["n"]), _value("cut", TensorProto.INT64, ["batch", "m"])])
    path = tmp_path / "doctored.onnx"
    onnx.save(model, str(path))
    return path


def test_a_graph_that_shapes_by_step_values_fails(tiny_model_dir, tmp_path):
    path = _doctored(tiny_model_dir, tmp_path)
    reads = shape_reads(onnx.load(str(path)).graph, ("past_length", "logit_positions"))
    assert [(r.node, r.op_type, r.role, r.sources) for r in reads] == [
        ("range_to_past_length", "Range", "limit", ("past_length",)),
        ("slice_to_positions", "Slice", "ends", ("logit_positions",))]
    result = CliRunner().invoke(main, ["check", str(path), "--target", "tensorrt"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any("range_to_past_length (Range): input 1 (limit) is computed from the value of past_length" in ln
               for ln in lines)
    assert any("slice_to_positions (Slice): input 2 (ends)" in ln for ln in lines)


def test_shape_flow_stops_at_shape_and_follows_subgraphs():
    """Shape(x) ends a value's flow; an If branch reading an outer value carries it out."""
    then_graph = helper.make_graph([helper.make_node("Identity", ["p"], ["then_out"])], "then", [],
                                   [_value("then_out", TensorProto.INT64, [1])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["one"], ["else_out"])], "else", [],
                                   [_value("else_out", TensorProto.INT64, [1])])
    nodes = [
        helper.make_node("Shape", ["p"], ["p_shape"]),
        helper.make_node("Reshape", ["x", "p_shape"], ["fine"], name="reshape_by_shape"),
        helper.make_node("Greater", ["p", "one"], ["cond"]),
        helper.make_node("If", ["cond"], ["branch"], name="if_on_p", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Expand", ["x", "branch"], ["bad"], name="expand_by_branch"),
    ]
    graph = helper.make_graph(nodes, "g", [_value("p", TensorProto.INT64, [1]), _value("x", TensorProto.FLOAT, [1])],
                              [_value("fine", TensorProto.FLOAT, None), _value("bad", TensorProto.FLOAT, None)],
                              initializer=[onnx.numpy_helper.from_array(np.array([1], np.int64), "one")])
    assert [(r.node, r.role) for r in shape_reads(graph, ("p",))] == [("if_on_p", "cond"),
                                                                      ("expand_by_branch", "shape")]
