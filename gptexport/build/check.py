"""`gptexport check --target tensorrt`: will TensorRT's ONNX parser take this graph? Answered on a CPU.

Checks, without TensorRT or a GPU, what `gptexport build` would otherwise find out on the GPU box:
- every node's op is in the ONNX-TensorRT operator table of the targeted version, with its
  tensors in the dtypes that table lists and the restrictions it states that apply to our graphs;
- the model's opset is one the parser reads;
- every dynamic dim of every input has a range in the optimization profiles `build` would use;
- weights are of types TensorRT takes and within its per-tensor element limit;
- no shape computation reads the values of past_length or logit_positions (shapeflow.py), so a
  CUDA graph may replay decode steps (ONNX Runtime's CUDA provider and TensorRT alike).
It returns findings, one per offending node (or input, or initializer); none means buildable as
far as a static check can tell.

The tables transcribe onnx-tensorrt's docs/operators.md for TensorRT 10.15 (the latest 10.x),
and for 11.x the same plus Swish (TensorRT 11.0 release notes: "Added support for Swish").
Never imports TensorRT or torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..artifacts.modeldir import MANIFEST, ModelDir, load_model_dir
from ..config import GPTConfig, IOSpec
from ..errors import ModelDirError, UsageError
from ..profiles import profile_problems, profile_shapes
from .shapeflow import shape_reads

# inputs that change every decode step: their values must reach device kernels only (shapeflow.py)
STEP_VALUES = ("past_length", "logit_positions")

# Opsets each major version's parser reads. 10.0 reads 9..20, 10.15 9..24: 20 holds for every
# 10.x. 11.x: 9..25 (TensorRT's ONNX opset guide).
OPSETS = {"10": (9, 20), "11": (9, 25)}
TARGETS = tuple(OPSETS)
MAX_ELEMENTS = 2**31 - 1  # TensorRT's per-tensor volume limit (int32 volumes; NVIDIA/TensorRT#3815)

_ABBREV = {"FP32": "FLOAT", "FP16": "FLOAT16", "BF16": "BFLOAT16", "INT32": "INT32", "INT64": "INT64",
           "BOOL": "BOOL", "UINT8": "UINT8", "INT8": "INT8", "FP8": "FLOAT8E4M3FN", "FP4": "FLOAT4E2M1",
           "INT4": "INT4"}
F = "FP32 FP16 BF16"
FI = F + " INT32 INT64"
FIB = FI + " BOOL"
# Op: supported types, from onnx-tensorrt docs/operators.md (TensorRT 10.15), ops marked Y
_TABLE_10 = f"""
Abs: {FI}
Acos Acosh Asin Asinh Atan Atanh: {F}
Add: {FI}
And Or Xor Not: BOOL
ArgMax ArgMin: {FI}
Attention: {F} INT8 FP8
AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos Cosh CumSum: {F}
BlackmanWindow HammingWindow HannWindow DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign: FP32 FP16
Cast CastLike: {FI} UINT8 BOOL
Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape: {FIB}
ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where: {FIB}
Constant ConstantOfShape: {FIB} FP8 FP4 INT4
DepthToSpace SpaceToDepth Div Equal Greater GreaterOrEqual Less LessOrEqual IsNaN Max Min Mod Mul Neg: {FI}
Pad Pow Range Relu Scatter ScatterElements ScatterND Shrink Sign Sub Sum TopK: {FI}
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd: {FI}
ReduceSum ReduceSumSquare: {FI}
DequantizeLinear: INT8 FP8 FP4 INT4
Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool: {F}
GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf: {F}
LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool: {F}
MeanVarianceNormalization ParametricSoftplus PRelu QuantizeLinear RandomNormal RandomNormalLike: {F}
RandomUniform RandomUniformLike Reciprocal Resize RMSNormalization RNN RotaryEmbedding Round: {F}
ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample: {F}
Gelu: {FI} INT8
Mean: {FI} FP8
STFT: FP32
TensorScatter: {F} INT32
"""
_TABLE_11_EXTRA = f"""
Swish: {F}
"""
# Quantize/dequantize mix quantized and float types in ways the one-list table does not express
_NO_TYPE_CHECK = {"QuantizeLinear", "DequantizeLinear"}
# Types TensorRT has at all (DOUBLE is cast down to FLOAT by the parser, so it passes)
_TRT_TYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL", "UINT8", "INT8", "FLOAT8E4M3FN",
              "FLOAT4E2M1", "INT4", "DOUBLE"}
_IO_TYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL", "UINT8", "INT8"}


def _parse_table(text: str) -> dict[str, frozenset[str]]:
    table = {}
    for line in filter(None, text.splitlines()):
        ops, types = line.split(":")
        for op in ops.split():
            table[op] = frozenset(_ABBREV[t] for t in types.split())
    return table


OPS = {"10": _parse_table(_TABLE_10), "11": _parse_table(_TABLE_10 + _TABLE_11_EXTRA)}


@dataclass(frozen=True)
class Finding:
    """One node (or input, initializer, the model) TensorRT would refuse, and why."""

    where: str  # node name, "input X", "initializer X" or "model"
    what: str  # the node's op type, or the kind of thing
    message: str

    def __str__(self) -> str:
        return f"{self.where} ({self.what}): {self.message}"


@dataclass
class CheckReport:
    onnx_path: Path
    target: str
    findings: list[Finding]
    nodes: int
    op_types: int
    opset: int | None
    profiles_checked: bool


# ---- entry points ------------------------------------------------------------------------------

def check_path(path: str | Path, target: str = "10", max_batch: int = 1, opt_seq: int | None = None) -> CheckReport:
    """Check a model directory or an .onnx file (with its directory's profiles, if it is in one)."""
    path = Path(path)
    if path.is_dir():
        return check_onnx(*_dir_args(load_model_dir(path, verify=False), target, max_batch, opt_seq))
    if not path.is_file():
        raise UsageError(f"{path}: no such file or directory (give a model directory or an .onnx file)")
    md = _model_dir_of(path)
    if md is not None:
        return check_onnx(*_dir_args(md, target, max_batch, opt_seq))
    return check_onnx(path, target)


def check_model_dir(md: ModelDir, target: str = "10", max_batch: int = 1, opt_seq: int | None = None) -> list[Finding]:
    """Findings for a model directory's ONNX with the profiles `gptexport build` would use."""
    return check_onnx(*_dir_args(md, target, max_batch, opt_seq)).findings


def _dir_args(md: ModelDir, target: str, max_batch: int, opt_seq: int | None):
    return md.onnx_path, target, md.config, md.spec, profile_shapes(md.config, md.spec, max_batch, opt_seq)


def _model_dir_of(onnx_path: Path) -> ModelDir | None:
    """The model directory an .onnx file is the graph of, if it is one."""
    manifest = onnx_path.parent / MANIFEST
    try:
        if json.loads(manifest.read_text()).get("onnx") != onnx_path.name:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    return load_model_dir(onnx_path.parent, verify=False)


def check_onnx(path: Path, target: str = "10", config: GPTConfig | None = None, spec: IOSpec | None = None,
               profs: list | None = None) -> CheckReport:
    """Check one ONNX file for TensorRT `target` ("10" or "11"); profiles, if given, for its inputs."""
    import onnx

    if target not in OPSETS:
        raise UsageError(f"--trt-version must be one of {', '.join(TARGETS)}, got {target!r}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise ModelDirError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if model.functions:  # the parser expands model-local functions; check what they expand to
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    model = _with_types(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    findings = _opset_findings(opset, target)
    findings += graph_findings(model.graph, OPS[target], opset or OPSETS[target][1])
    findings += io_findings(model.graph)
    findings += initializer_findings(model.graph)
    findings += [Finding(r.node, r.op_type, str(r)) for r in shape_reads(model.graph, STEP_VALUES)]
    if profs is not None:
        findings += profile_findings(model.graph, spec, profs, config)
    else:
        findings += unprofiled_findings(model.graph)
    ops = {n.op_type for n in model.graph.node}
    return CheckReport(Path(path), target, findings, len(model.graph.node), len(ops), opset, profs is not None)


# ---- the checks --------------------------------------------------------------------------------

def _with_types(model):
    """The model with inferred types for intermediate tensors (where ONNX's inference can tell)."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a help, not a requirement: keep what the file declares
        return model


def _opset_findings(opset: int | None, target: str) -> list[Finding]:
    lo, hi = OPSETS[target]
    if opset is None or lo <= opset <= hi:
        return []
    return [Finding("model", "opset", f"ai.onnx opset {opset} is outside {lo}..{hi}, the opsets TensorRT "
                                      f"{target}.x's ONNX parser reads")]


def graph_findings(graph, table: dict[str, frozenset[str]], opset: int,
                   outer_types: dict | None = None) -> list[Finding]:
    """One finding per node the parser would refuse, subgraphs (If/Loop/Scan bodies) included."""
    types = dict(outer_types or {})
    types.update(_tensor_types(graph))
    constants = _constant_tensors(graph)
    findings = []
    for i, node in enumerate(graph.node):
        problems = _node_problems(node, table, opset, types, constants)
        if problems:
            findings.append(Finding(node.name or f"node #{i}", node.op_type, "; ".join(problems)))
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == attr.GRAPH else list(attr.graphs):
                findings += graph_findings(sub, table, opset, types)
    return findings


def _node_problems(node, table, opset: int, types: dict, constants: set) -> list[str]:
    if node.domain not in ("", "ai.onnx"):
        return [f"custom op {node.domain}::{node.op_type} is not an ONNX op TensorRT's parser knows "
                f"(it would need a TensorRT plugin)"]
    if node.op_type not in table:
        return [f"{node.op_type} is not supported by TensorRT's ONNX parser"]
    problems = [] if node.op_type in _NO_TYPE_CHECK else _dtype_problems(node, table[node.op_type], opset, types)
    rule = RESTRICTIONS.get(node.op_type)
    if rule is not None:
        problems += rule(node, constants)
    return problems


def _dtype_problems(node, allowed: frozenset[str], opset: int, types: dict) -> list[str]:
    """Tensors bound to the op's data type constraint must be in the table's types; others in TensorRT's."""
    import onnx

    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return [f"{node.op_type} does not exist at opset {opset}"]
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    problems = []
    for names, params, kind in ((node.input, schema.inputs, "input"), (node.output, schema.outputs, "output")):
        for i, name in enumerate(names):
            if not name or name not in types or not params:
                continue
            elem = types[name]
            type_str = params[min(i, len(params) - 1)].type_str
            data_typed = "tensor(float)" in constraints.get(type_str, ())  # T of Add, not Tind of Gather
            ok = (elem in allowed or (elem == "DOUBLE" and "FLOAT" in allowed)) if data_typed else elem in _TRT_TYPES
            if not ok:
                problems.append(f"{kind} {name} is {elem.lower()}, TensorRT's {node.op_type} takes "
                                f"{', '.join(sorted(t.lower() for t in (allowed if data_typed else _TRT_TYPES)))}")
    return problems


def _tensor_types(graph) -> dict[str, str]:
    """Element type name (FLOAT, INT64, ...) of every tensor whose type the graph declares or infers."""
    import onnx

    name_of = onnx.TensorProto.DataType.Name
    types = {}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = name_of(v.type.tensor_type.elem_type)
    for t in graph.initializer:
        types[t.name] = name_of(t.data_type)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = name_of(value.data_type)
    return types


def _constant_tensors(graph) -> set[str]:
    """Tensors known at build time: initializers, Constant outputs, and what is computed from only those."""
    constants = {t.name for t in graph.initializer}
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type == "Constant" or (
                node.input and all(not i or i in constants for i in node.input)
                and not node.op_type.startswith("Random")):
            constants.update(o for o in node.output if o)
    return constants


# ---- restrictions of operators.md that our kind of graph can hit --------------------------------

def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input_constant(index: int, what: str, initializer_only: bool = False):
    def rule(node, constants):
        if len(node.input) > index and node.input[index] and node.input[index] not in constants:
            return [f"`{what}` must be {'an initializer' if initializer_only else 'a build-time constant'}"]
        return []

    return rule


def _layer_norm(node, constants):
    return ["only the first output (Y) is supported"] if any(node.output[1:]) else []


def _dropout(node, constants):
    return _input_constant(2, "training_mode", True)(node, constants)


def _topk(node, constants):
    problems = [] if _attr(node, "sorted", 1) == 1 else ["`sorted` must be 1"]
    return problems + _input_constant(1, "K")(node, constants)


def _scatter_nd(node, constants):
    reduction = _attr(node, "reduction", b"none")
    return [] if reduction in (b"none", "none") else [f"reduction {reduction!r} is not supported (only none)"]


def _constant(node, constants):
    bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
    return [f"attribute {bad[0]} is not supported"] if bad else []


def _resize(node, constants):
    problems = []
    if _attr(node, "mode", b"nearest") not in (b"nearest", b"linear"):
        problems.append("only modes nearest and linear are supported")
    if _attr(node, "antialias", 0):
        problems.append("antialiasing is not supported")
    return problems


RESTRICTIONS = {
    "LayerNormalization": _layer_norm,
    "Squeeze": _input_constant(1, "axes"),
    "Unsqueeze": _input_constant(1, "axes"),
    "CumSum": _input_constant(1, "axis"),
    "OneHot": _input_constant(1, "depth"),
    "Dropout": _dropout,
    "TopK": _topk,
    "ScatterND": _scatter_nd,
    "Constant": _constant,
    "Resize": _resize,
    **{op: _input_constant(1, "axes", True) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                                                     "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
                                                     "ReduceSum", "ReduceSumSquare")},
}


# ---- inputs, weights, profiles -------------------------------------------------------------------

def io_findings(graph) -> list[Finding]:
    """Graph inputs and outputs must have types TensorRT can bind."""
    types = _tensor_types(graph)
    findings = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            elem = types.get(v.name)
            if elem is not None and elem not in _IO_TYPES:
                findings.append(Finding(f"{kind} {v.name}", kind, f"{elem.lower()} is not a TensorRT I/O type "
                                        f"({', '.join(sorted(t.lower() for t in _IO_TYPES))})"))
    return findings


def initializer_findings(graph) -> list[Finding]:
    """Weights TensorRT cannot hold: an unsupported type, or more elements than one tensor may have."""
    import onnx

    findings = []
    for t in graph.initializer:
        elem = onnx.TensorProto.DataType.Name(t.data_type)
        count = 1
        for d in t.dims:
            count *= d
        if elem not in _TRT_TYPES:
            findings.append(Finding(f"initializer {t.name}", "initializer",
                                    f"{elem.lower()} weights are not supported"))
        elif count > MAX_ELEMENTS:
            findings.append(Finding(f"initializer {t.name}", "initializer",
                                    f"{count} elements, more than TensorRT's per-tensor limit of {MAX_ELEMENTS}"))
    return findings


def _graph_dims(value) -> list:
    """Each dim of a graph input: an int if fixed, None if dynamic (named or unknown)."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def profile_findings(graph, spec: IOSpec, profs: list, config: GPTConfig) -> list[Finding]:
    """Every dynamic dim of every input must have a range in every profile, fixed dims must match."""
    findings = [Finding("profiles", "profile", p) for p in profile_problems(config, spec, profs)]
    initializers = {t.name for t in graph.initializer}
    for value in graph.input:
        if value.name in initializers:
            continue  # old-style graphs list weights as inputs
        dims = _graph_dims(value)
        for p in profs:
            if value.name not in p.shapes:
                if None in dims:
                    findings.append(Finding(f"input {value.name}", "input",
                                            f"dynamic dims {_show(value)} have no range in profile {p.name}"))
                continue
            lo, _, hi = p.shapes[value.name]
            if len(lo) != len(dims):
                findings.append(Finding(f"input {value.name}", "input",
                                        f"rank {len(dims)}, profile {p.name} gives rank {len(lo)}"))
            elif any(d is not None and not a == b == d for d, a, b in zip(dims, lo, hi)):
                findings.append(Finding(f"input {value.name}", "input",
                                        f"fixed dims {_show(value)} outside profile {p.name}'s {list(lo)}..{list(hi)}"))
    return findings


def unprofiled_findings(graph) -> list[Finding]:
    """Without a model directory there are no profiles: every dynamic input dim is a finding."""
    initializers = {t.name for t in graph.initializer}
    return [Finding(f"input {v.name}", "input", f"dynamic dims {_show(v)} have no profile range "
                                                f"(check the model directory, whose config gives them)")
            for v in graph.input if v.name not in initializers and None in _graph_dims(v)]


def _show(value) -> str:
    dims = value.type.tensor_type.shape.dim
    return "[" + ", ".join(d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in dims) + "]"
