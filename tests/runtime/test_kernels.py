"""Our CPU kernels (runtime/kernels/): Int4MatMul against ONNX Runtime's own MatMulNBits, Int8MatMul
against exact integer math and its DynamicQuantizeLinear + MatMulInteger, the graph
swap, and the CPU runner with `--kernels off|auto|on`.

The library is built (or found built) once for the session; without a compiler or headers these
tests skip, unless GPTEXPORT_TEST_STRICT=1.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import assert_error, cli, engine_generate
from onnx import TensorProto, helper, numpy_helper

from gptexport.convert.quantize import quantize
from gptexport.errors import BackendUnavailable
from gptexport.runtime.backends.kernels import session_model
from gptexport.runtime.backends.ort import OrtRunner
from gptexport.runtime.kernels import build, onnxgraph
from gptexport.runtime.sampling import SamplingParams
from gptexport.verify.tolerance import PRESETS

ROWS = (1, 2, 3, 4, 7, 8, 16)
GPT2_SHAPES = ((768, 768), (768, 2304), (768, 3072), (3072, 768), (768, 50257))  # (K, N)


def quantize_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' symmetric block-32 int4: B [N, K/32, 16] (two k per byte, low nibble first), scales."""
    K, N = w.shape
    blocks = -(-K // 32)
    padded = np.zeros((blocks * 32, N), np.float32)
    padded[:K] = w
    per_block = padded.T.reshape(N, blocks, 32)
    scales = np.abs(per_block).max(-1) / 7.0
    scales[scales == 0] = 1.0
    q = np.clip(np.round(per_block / scales[..., None]), -8, 7).astype(np.int32) + 8
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scales.reshape(-1).astype(np.float32)


def matmul_model(op: str, K: int, N: int, B, scales, bias=None) -> bytes:
    """One MatMulNBits (com.microsoft) or Int4MatMul (ours) node over initializers."""
    if op == "MatMulNBits":
        optional = ["", "", "bias"] if bias is not None else []
        domain, inputs, extra = "com.microsoft", ["A", "B", "scales"] + optional, {
            "accuracy_level": 4}
    else:
        domain, inputs, extra = onnxgraph.DOMAIN, ["A", "B", "scales"] + (["bias"] if bias is not None else []), {}
    node = helper.make_node(op, inputs, ["Y"], domain=domain, K=K, N=N, bits=4, block_size=32, **extra)
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(scales, "scales")]
    inits += [numpy_helper.from_array(bias, "bias")] if bias is not None else []
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)])
    model.ir_version = 9
    return model.SerializeToString()


def session(model: bytes, library=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def dequantized(B: np.ndarray, scales: np.ndarray, K: int) -> np.ndarray:
    N = B.shape[0]
    q = np.stack([B & 15, B >> 4], -1).reshape(N, -1)[:, :K].astype(np.float32) - 8
    return (q * np.repeat(scales.reshape(N, -1), 32, axis=1)[:, :K]).T  # [K, N]


def check_against_matmulnbits(library, K: int, N: int, rows: tuple[int, ...], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    B, scales = quantize_weights(rng.standard_normal((K, N)).astype(np.float32) * 0.05)
    bias = rng.standard_normal(N).astype(np.float32)
    theirs, ours = (session(matmul_model("MatMulNBits", K, N, B, scales, bias)),
                    session(matmul_model("Int4MatMul", K, N, B, scales, bias), library))
    exact_w = dequantized(B, scales, K)
    int4 = PRESETS["int4"]
    for M in rows:
        a = rng.standard_normal((M, K)).astype(np.float32)
        got, want = ours.run(None, {"A": a})[0], theirs.run(None, {"A": a})[0]
        assert got.shape == (M, N)
        # both quantize activations to int8 per block of 32: they agree to float rounding ...
        np.testing.assert_allclose(got, want, atol=2e-4 * np.sqrt(K), rtol=1e-4, err_msg=f"{K}x{N}, {M} rows")
        # ... and stay within the int4 preset of the exact product with the int4 weights
        exact = a @ exact_w + bias
        assert np.all(np.abs(got - exact) <= int4.bound(exact)), f"{K}x{N}, {M} rows"


@pytest.mark.parametrize("K,N", GPT2_SHAPES + ((100, 37), (64, 8), (32, 9)))
def test_int4_matmul_matches_matmulnbits(library, K, N):
    rows = (1, 8) if N > 10000 else ROWS  # the output projection: batch 1 and 8 keep it fast
    check_against_matmulnbits(library, K, N, rows)


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_int4_scales_of_every_magnitude(library, monkeypatch, isa):
    """Scales are kept in fp16 relative to the largest: columns from 1e-8 to 1e2 (and zeros) keep
    their relative precision (fp16 rounds a scale by at most 2^-11)."""
    if isa == "generic":
        monkeypatch.setenv("GPTEXPORT_KERNELS_ISA", "generic")
    rng = np.random.default_rng(4)
    K, N = 256, 40
    w = rng.standard_normal((K, N)).astype(np.float32) * np.logspace(-8, 2, N).astype(np.float32)
    w[:, 7] = 0
    B, scales = quantize_weights(w)
    theirs, ours = (session(matmul_model("MatMulNBits", K, N, B, scales)),
                    session(matmul_model("Int4MatMul", K, N, B, scales), library))
    a = rng.standard_normal((3, K)).astype(np.float32)
    got, want = ours.run(None, {"A": a})[0], theirs.run(None, {"A": a})[0]
    scale = np.abs(a) @ np.abs(dequantized(B, scales, K))  # each output's sum of |products|
    others = np.arange(N) != 7
    assert np.all(np.abs(got - want)[:, others] <= 1e-3 * scale[:, others])
    assert np.all(got[:, 7] == 0)  # MatMulNBits leaves float noise there (1.5e-5 in one run)


def test_plain_path_matches_matmulnbits(library, monkeypatch):
    monkeypatch.setenv("GPTEXPORT_KERNELS_ISA", "generic")  # read when a session registers the library
    assert build.isa(library) == "generic"
    check_against_matmulnbits(library, 768, 768, (1, 3, 4, 7))
    check_against_matmulnbits(library, 100, 37, (2, 5))


def cpu_has(*flags: str) -> bool:
    cpuinfo = open("/proc/cpuinfo").read()
    return all(f" {flag} " in cpuinfo or f" {flag}\n" in cpuinfo for flag in flags)


AVX2 = ("avx2", "fma", "f16c")
VNNI = (*AVX2, "avx512f", "avx512bw", "avx512_vnni")  # /proc/cpuinfo's names


def test_the_machine_runs_the_best_path_it_has(library, monkeypatch):
    expected = "avx512vnni" if cpu_has(*VNNI) else "avx2" if cpu_has(*AVX2) else "generic"
    assert build.isa(library) == expected
    monkeypatch.setenv("GPTEXPORT_KERNELS_ISA", "avx2")  # leaves VNNI out, never adds AVX2
    assert build.isa(library) == ("avx2" if cpu_has(*AVX2) else "generic")


# ---- Int8MatMul against ONNX Runtime's dynamic int8 path ----

def quantize_int8_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_dynamic's per-channel int8: B [K, N] int8 (zero points 0), one scale per column."""
    scales = np.abs(w).max(0) / 127.0
    scales[scales == 0] = 1.0
    return np.clip(np.round(w / scales), -127, 127).astype(np.int8), scales.astype(np.float32)


def int8_pattern_model(K: int, N: int, B, scales, bias=None, zero_points=None) -> bytes:
    """One MatMul as quantize_dynamic writes it: DynamicQuantizeLinear, MatMulInteger, Cast, Mul (+ Add)."""
    zero_points = np.zeros(N, np.int8) if zero_points is None else zero_points
    nodes = [helper.make_node("DynamicQuantizeLinear", ["A"], ["Aq", "As", "Az"]),
             helper.make_node("Mul", ["As", "b_scale"], ["s"]),
             helper.make_node("MatMulInteger", ["Aq", "B", "Az", "b_zp"], ["i"]),
             helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "s"], ["Y" if bias is None else "y"])]
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(scales, "b_scale"),
             numpy_helper.from_array(zero_points, "b_zp")]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["y", "bias"], ["Y"]))
        inits.append(numpy_helper.from_array(bias, "bias"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def int8_sessions(library, K: int, N: int, seed: int = 0, zero_points=None):
    """ONNX Runtime's own int8 path and ours on the same random weights, the int8 weights (minus their
    zero points) and their scales, and the bias."""
    rng = np.random.default_rng(seed)
    B, scales = quantize_int8_weights(rng.standard_normal((K, N)).astype(np.float32) * 0.05)
    bias = rng.standard_normal(N).astype(np.float32)
    theirs = int8_pattern_model(K, N, B, scales, bias, zero_points)
    ours, swapped = onnxgraph.swap_model(theirs, ("Int8MatMul",))
    assert swapped == {"Int8MatMul": 1}
    zp = np.zeros(N) if zero_points is None else zero_points.astype(np.float64)
    return session(theirs), session(ours, library), B.astype(np.float64) - zp, scales, bias


def dynamic_quantize_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DynamicQuantizeLinear's formula on each row alone: (q - zero point) and the scale, per row."""
    lo, hi = np.minimum(a.min(1), 0), np.maximum(a.max(1), 0)
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    zp = np.round(np.clip(-lo / scale, 0, 255))
    q = np.clip(np.round(a / scale[:, None]) + zp[:, None], 0, 255) - zp[:, None]
    return q.astype(np.float64), scale


def check_against_matmulinteger(library, K: int, N: int, rows: tuple[int, ...], zero_points=None) -> None:
    theirs, ours, b, scales, bias = int8_sessions(library, K, N, zero_points=zero_points)
    rng = np.random.default_rng(1)
    for M in rows:
        a = rng.standard_normal((M, K)).astype(np.float32)
        got = ours.run(None, {"A": a})[0]
        assert got.shape == (M, N)
        # each row quantized as DynamicQuantizeLinear quantizes a tensor of that one row, the integer
        # products summed exactly (float64 holds these sums exactly), scaled as the graph's Muls do
        q, a_scale = dynamic_quantize_rows(a)
        exact_int = (q @ b).astype(np.float32) * (a_scale[:, None] * scales) + bias
        np.testing.assert_allclose(got, exact_int, atol=1e-5, rtol=1e-5, err_msg=f"{K}x{N}, {M} rows")
        # ONNX Runtime's own path row by row is that too, but for MLAS's AVX2 u8 x s8 kernel, which
        # saturates some pairs of products in int16 (vpmaddubsw): within the int8 preset of each other
        # (its share of values; a saturated sum can be off by more)
        want = np.concatenate([theirs.run(None, {"A": a[r:r + 1]})[0] for r in range(M)])
        within = np.mean(np.abs(got - want) <= PRESETS["int8"].bound(want))
        assert within >= PRESETS["int8"].within, f"{K}x{N}, {M} rows: {within:.4f} within the int8 preset"


@pytest.mark.parametrize("K,N", GPT2_SHAPES + ((100, 37), (64, 8), (30, 9)))
def test_int8_matmul_matches_matmulinteger(library, K, N):
    rows = (1, 8) if N > 10000 else ROWS  # the output projection: batch 1 and 8 keep it fast
    check_against_matmulinteger(library, K, N, rows)


def test_int8_avx2_path_beside_vnni(library, monkeypatch):
    """Where the CPU has VNNI the test above ran its layout and kernel; the AVX2 one too (8 rows
    a load there, 4 here: 9 and 17 rows cross both)."""
    if not cpu_has(*VNNI):
        pytest.skip("this CPU has no AVX-512 VNNI: the test above ran the AVX2 path")
    zero_points = np.random.default_rng(2).integers(-5, 6, 37).astype(np.int8)
    check_against_matmulinteger(library, 100, 37, (1, 9, 17), zero_points)
    monkeypatch.setenv("GPTEXPORT_KERNELS_ISA", "avx2")  # read when a session registers the library
    assert build.isa(library) == "avx2"
    check_against_matmulinteger(library, 768, 768, (1, 3, 4, 7, 9, 17))
    check_against_matmulinteger(library, 100, 37, (2, 5), zero_points)


def test_int8_plain_path_and_zero_points(library, monkeypatch):
    zero_points = np.random.default_rng(2).integers(-5, 6, 37).astype(np.int8)
    check_against_matmulinteger(library, 100, 37, (1, 5), zero_points)
    monkeypatch.setenv("GPTEXPORT_KERNELS_ISA", "generic")  # read when a session registers the library
    assert build.isa(library) == "generic"
    check_against_matmulinteger(library, 768, 768, (1, 3, 4, 7))
    check_against_matmulinteger(library, 100, 37, (2, 5), zero_points)


def test_int8_rows_do_not_depend_on_their_batch(library):
    """A row's result is the same alone or beside a row of a hundred times its range."""
    ours = int8_sessions(library, 768, 768)[1]
    a = np.random.default_rng(3).standard_normal((2, 768)).astype(np.float32)
    a[1] *= 100
    np.testing.assert_array_equal(ours.run(None, {"A": a})[0][:1], ours.run(None, {"A": a[:1]})[0])


# ---- the graph swap and the CPU runner ----

def quantized(tiny_model_dir, tmp_path_factory, precision: str):
    return quantize(tiny_model_dir, tmp_path_factory.mktemp("kernels") / precision, precision, progress=lambda m: None)


def swap_graphs(model_dir) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """(the directory's graph, the graph with our ops swapped in, {op: nodes swapped})."""
    data = (model_dir / "model.onnx").read_bytes()
    swapped_bytes, swapped = onnxgraph.swap_model(data)
    return onnx.load_from_string(data), onnx.load_from_string(swapped_bytes), swapped


@pytest.fixture(scope="module")
def int4_dir(tiny_model_dir, tmp_path_factory):
    return quantized(tiny_model_dir, tmp_path_factory, "int4")


def test_swap_changes_only_the_matmulnbits_nodes_and_their_bias_adds(int4_dir):
    before, after, swapped = swap_graphs(int4_dir)
    nbits = {n.output[0]: n for n in before.graph.node if n.op_type == "MatMulNBits"}
    ours = [n for n in after.graph.node if n.op_type == "Int4MatMul"]
    assert swapped == {"Int4MatMul": len(nbits)} and len(nbits) == len(ours) > 0
    absorbed = {n.output[0] for n in ours} - set(nbits)  # the outputs of the bias Adds taken in
    assert absorbed  # torch's Linear exports its bias as an Add after MatMulNBits
    for n in ours:
        assert n.domain == "gptexport" and len(n.input) in (3, 4)
        assert {a.name for a in n.attribute} >= {"K", "N", "bits", "block_size"}
    for add in (n for n in before.graph.node if n.output[0] in absorbed):
        source = next(i for i in add.input if i in nbits)
        (bias,) = [i for i in add.input if i != source]
        took = next(n for n in ours if n.output[0] == add.output[0])
        assert list(took.input) == [i for i in nbits[source].input if i][:3] + [bias]
    kept = [n for n in before.graph.node if n.op_type != "MatMulNBits" and n.output[0] not in absorbed]
    assert kept == [n for n in after.graph.node if n.op_type != "Int4MatMul"]
    assert after.graph.initializer == before.graph.initializer and after.graph.output == before.graph.output
    opsets = [{(o.domain, o.version) for o in m.opset_import} for m in (after, before)]
    assert opsets[0] == opsets[1] | {("gptexport", 1)}


def test_swap_leaves_what_int4matmul_cannot_run():
    B, scales = quantize_weights(np.ones((64, 8), np.float32))
    plain = matmul_model("MatMulNBits", 64, 8, B, scales)
    assert onnxgraph.swap_model(plain)[1] == {"Int4MatMul": 1}
    with_zero_points = onnx.load_from_string(plain)
    with_zero_points.graph.node[0].input.append("B")
    overridable = onnx.load_from_string(plain)  # B also a graph input: not a constant
    overridable.graph.input.append(helper.make_tensor_value_info("B", TensorProto.UINT8, list(B.shape)))
    eight_bits = onnx.load_from_string(plain)
    next(a for a in eight_bits.graph.node[0].attribute if a.name == "bits").i = 8
    for model in (with_zero_points, overridable, eight_bits):
        data = model.SerializeToString()
        assert onnxgraph.swap_model(data) == (data, {})


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir, tmp_path_factory):
    return quantized(tiny_model_dir, tmp_path_factory, "int8")


def test_swap_takes_every_int8_pattern_and_nothing_else(int8_dir):
    before, after, swapped = swap_graphs(int8_dir)
    matmuls = [n for n in before.graph.node if n.op_type == "MatMulInteger"]
    ours = [n for n in after.graph.node if n.op_type == "Int8MatMul"]
    assert swapped == {"Int8MatMul": len(matmuls)} and len(ours) == len(matmuls) > 0
    assert not {n.op_type for n in after.graph.node} & {"DynamicQuantizeLinear", "MatMulInteger", "Cast"}
    biased = sum(len(n.input) == 5 for n in ours)
    assert biased > 0  # torch's Linear exports its bias as an Add after the pattern's last Mul
    assert len(before.graph.node) - len(after.graph.node) == 4 * len(ours) + biased
    produced = {o for n in before.graph.node for o in n.output}
    for n in ours:
        assert n.domain == "gptexport" and n.output[0] in produced and len(n.input) in (4, 5)
    kept = [n for n in after.graph.node if n.op_type != "Int8MatMul"]
    assert all(n in before.graph.node for n in kept)
    assert after.graph.initializer == before.graph.initializer and after.graph.output == before.graph.output


def test_swap_leaves_an_int8_pattern_it_cannot_run():
    B, scales = quantize_int8_weights(np.ones((64, 8), np.float32))
    plain = int8_pattern_model(64, 8, B, scales)
    assert onnxgraph.swap_model(plain)[1] == {"Int8MatMul": 1}
    shared = onnx.load_from_string(plain)  # the quantized activations also used elsewhere
    shared.graph.output.append(helper.make_tensor_value_info("Aq", TensorProto.UINT8, None))
    overridable = onnx.load_from_string(plain)  # B also a graph input: not a constant
    overridable.graph.input.append(helper.make_tensor_value_info("B", TensorProto.INT8, list(B.shape)))
    unsigned = onnx.load_from_string(int8_pattern_model(64, 8, B.view(np.uint8), scales))
    for model in (shared, overridable, unsigned):
        data = model.SerializeToString()
        assert onnxgraph.swap_model(data) == (data, {})


def test_kernels_need_onnxruntime_1_21(int4_dir, monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.20.1")
    with pytest.raises(BackendUnavailable, match="onnxruntime 1.20.1 is older than the 1.21"):
        session_model(int4_dir / "model.onnx", "on")


def logits(runner: OrtRunner, ids: np.ndarray) -> np.ndarray:
    """(B, T, V) logits at every position of `ids`, prefilled together on the runner's batch cache."""
    with runner:
        cache = runner.new_batch_cache(ids.shape[0], ids.shape[1])
        try:
            return np.array(cache.prefill(0, ids, all_positions=True))
        finally:
            cache.close()


def test_runner_with_kernels_matches_without(library, int4_dir):
    from gptexport.artifacts.modeldir import load_model_dir

    md = load_model_dir(int4_dir)
    assert session_model(md.onnx_path, "on").swapped > 0
    ids = np.random.default_rng(0).integers(0, md.config.vocab_size, (3, 10))
    off, on = logits(OrtRunner(md, kernels="off"), ids), logits(OrtRunner(md, kernels="on"), ids)
    # fp16 scales (rounded by at most 2^-11) move the tiny model's logits by up to ~2.4e-3
    np.testing.assert_allclose(on, off, atol=5e-3, rtol=1e-3)
    tokens = {}
    for mode in ("off", "on"):
        with OrtRunner(md, kernels=mode) as runner:
            tokens[mode] = engine_generate(runner, ids[:1], 20, SamplingParams(0.8, 20), seed=7)
    assert np.array_equal(tokens["on"], tokens["off"])


def test_an_int4_directory_takes_a_flat_batch_too(library, int4_dir):
    """Its position embedding is a GatherBlockQuantized (the table quantized too): rewired to
    position_ids with its scales kept, so prompts fill in the decode's forward (the mixed step), with
    the tokens of each sequence run alone."""
    from gptexport.artifacts.modeldir import load_model_dir
    from gptexport.runtime.params import GenerationParams
    from gptexport.runtime.scheduler import Scheduler, Sequence

    md = load_model_dir(int4_dir)
    with OrtRunner(md, kernels="on") as runner:
        assert runner.flat
        s = Scheduler(runner, 2, prefill_chunk=4)
        first = s.submit(Sequence([1, 2], GenerationParams(10, SamplingParams(0.0), 0)))
        s.step()
        assert s.cache.mixes
        second = s.submit(Sequence(list(range(3, 14)), GenerationParams(6, SamplingParams(0.0), 0)))
        s.run()
        for seq in (first, second):
            alone = Scheduler(runner, 1)
            again = alone.submit(Sequence(seq.prompt_ids, seq.params))
            alone.run()
            assert again.tokens == seq.tokens


def test_runner_with_int8_kernels_matches_without(library, int8_dir):
    from gptexport.artifacts.modeldir import load_model_dir

    md = load_model_dir(int8_dir)
    ops = session_model(md.onnx_path, "on").ops
    assert ops == {"Int8MatMul": 4 * md.config.n_layer + 1, "CachedAttention": md.config.n_layer}
    ids = np.random.default_rng(0).integers(0, md.config.vocab_size, (1, 1))
    # one token: one row per matmul, where our per-row quantization is the graph's own
    off, on = logits(OrtRunner(md, kernels="off"), ids), logits(OrtRunner(md, kernels="on"), ids)
    assert np.mean(np.abs(on - off) <= PRESETS["int8"].bound(off)) >= PRESETS["int8"].within
    assert np.argmax(on[0, -1]) == np.argmax(off[0, -1])


def test_kernels_on_without_library_is_one_line(int4_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTEXPORT_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(BackendUnavailable, match="--kernels on: .*no C\\+\\+ compiler"):
        session_model(int4_dir / "model.onnx", "on")
    r = cli("generate", str(int4_dir), "--prompt-tokens", "1,2", "--max-new-tokens", "3", "--kernels", "on")
    assert "no C++ compiler" in assert_error(r, 1)


def test_auto_without_library_runs_matmulnbits_and_says_why_once(int4_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GPTEXPORT_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with caplog.at_level(logging.INFO, logger="gptexport.kernels"):
        for _ in range(2):
            plan = session_model(int4_dir / "model.onnx", "auto")
            assert plan.library is None and plan.model == str(int4_dir / "model.onnx")
    said = [r.message for r in caplog.records if r.name == "gptexport.kernels"]
    assert len(said) == 1 and "no C++ compiler" in said[0]
    r = cli("generate", str(int4_dir), "--prompt-tokens", "1,2", "--max-new-tokens", "3", "--json")
    assert r.exit_code == 0, r.output


def test_kernels_on_is_for_the_cpu_backend(int4_dir):
    r = cli("generate", str(int4_dir), "--prompt-tokens", "1", "--backend", "ort-cuda", "--kernels", "on")
    assert_error(r, 2, "--kernels on applies to --backend onnxruntime")


def test_parity_passes_on_int4_with_the_kernels(library, int4_dir, tiny_ckpt):
    from gptexport.verify.parity import ParityOptions, run_parity

    assert session_model(int4_dir / "model.onnx", "auto").swapped > 0  # auto, as parity's runner opens it
    report = run_parity(int4_dir, tiny_ckpt, options=ParityOptions(steps=2, backends="onnxruntime"))
    assert report.tolerance == PRESETS["int4"] and report, report.verdict()


def test_parity_passes_on_int8_with_the_kernels(library, int8_dir, tiny_ckpt, monkeypatch):
    from gptexport.runtime.backends import kernels
    from gptexport.verify.parity import ParityOptions, run_parity

    monkeypatch.setitem(kernels.OPS, "auto", kernels.OPS["on"])  # parity's runner opens with auto
    assert session_model(int8_dir / "model.onnx", "auto").ops == {"Int8MatMul": 9, "CachedAttention": 2}
    report = run_parity(int8_dir, tiny_ckpt, options=ParityOptions(steps=2, backends="onnxruntime"))
    assert report.tolerance == PRESETS["int8"] and report, report.verdict()


def test_swapped_model_finds_its_external_weights(library, int4_dir, tmp_path):
    """Loaded from bytes, the swapped graph still finds model.onnx.data beside model.onnx."""
    model = onnx.load(str(int4_dir / "model.onnx"))
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)  # as the exporter: small constants stay in the graph
    assert (tmp_path / "model.onnx.data").is_file()
    swapped = session_model(tmp_path / "model.onnx", "on")
    assert isinstance(swapped.model, bytes) and swapped.swapped > 0
    options = ort.SessionOptions()
    swapped.configure(options)
    ours, theirs = (ort.InferenceSession(swapped.model, options, providers=["CPUExecutionProvider"]),
                    ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]))
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                              np.int64 if "int64" in i.type else np.float32) for i in theirs.get_inputs()}
    feeds["input_ids"] = np.array([[1, 2, 3]])
    feeds["logit_positions"] = np.array([2])
    # the swapped graph takes a flat batch: the positions the original computes (no past: 0..2), no segments
    flat = {"position_ids": np.array([[0, 1, 2]]), "segments": np.zeros((0, 2), np.int64)}
    assert {i.name for i in ours.get_inputs()} == set(feeds) | set(flat)
    np.testing.assert_allclose(ours.run(["logits"], {**feeds, **flat})[0], theirs.run(["logits"], feeds)[0],
                               atol=1e-3, rtol=1e-3)


def test_a_failed_header_fetch_is_one_line_and_not_retried_at_once(tmp_path, monkeypatch):
    import shutil

    if not shutil.which("apt-get") or any((d / build.HEADER).is_file() for d in build.SYSTEM_INCLUDES):
        pytest.skip("needs apt-get and no system ONNX Runtime headers")
    monkeypatch.setenv("GPTEXPORT_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ORT_INCLUDE_DIR", raising=False)
    monkeypatch.setattr(build, "debian_mirror", lambda: "http://127.0.0.1:9/debian")  # nothing listens there
    with pytest.raises(build.KernelsUnavailable, match="no ONNX Runtime headers: apt-get") as first:
        build.ensure_library()
    assert "\n" not in str(first.value)
    with pytest.raises(build.KernelsUnavailable, match="not retried before an hour has passed"):
        build.ensure_library()


def test_the_mirror_is_the_one_this_machines_apt_sources_name(tmp_path, monkeypatch):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# nothing here\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian/\nSuites: bookworm\nComponents: main\n")
    monkeypatch.setattr(build, "APT_SOURCES", (tmp_path / "sources.list", tmp_path / "sources.list.d"))
    assert build.debian_mirror() == "http://mirror.invalid/debian"
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    with pytest.raises(build.KernelsUnavailable, match="no Debian archive"):
        build.debian_mirror()
