"""Our CPU kernels (runtime/kernels/): Int4MatMul against ONNX Runtime's own MatMulNBits, the graph
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
from conftest import assert_error, cli, engine_generate, skip_unless_strict
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


@pytest.fixture(scope="module")
def library():
    try:
        return build.ensure_library()
    except build.KernelsUnavailable as e:
        skip_unless_strict(f"the kernel library is unavailable: {e}")


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


def test_plain_path_matches_matmulnbits(library, monkeypatch):
    monkeypatch.setenv("GPTEXPORT_KERNELS_ISA", "generic")  # read when a session registers the library
    assert build.isa(library) == "generic"
    check_against_matmulnbits(library, 768, 768, (1, 3, 4, 7))
    check_against_matmulnbits(library, 100, 37, (2, 5))


def test_the_machine_runs_avx2_when_it_has_it(library):
    flags = open("/proc/cpuinfo").read()
    expected = "avx2" if " avx2 " in flags and " fma " in flags else "generic"
    assert build.isa(library) == expected


# ---- the graph swap and the CPU runner ----

@pytest.fixture(scope="module")
def int4_dir(tiny_model_dir, tmp_path_factory):
    return quantize(tiny_model_dir, tmp_path_factory.mktemp("kernels") / "int4", "int4", progress=lambda m: None)


def test_swap_changes_only_the_matmulnbits_nodes_and_their_bias_adds(int4_dir):
    data = (int4_dir / "model.onnx").read_bytes()
    swapped_bytes, swapped = onnxgraph.swap_model(data)
    before, after = onnx.load_from_string(data), onnx.load_from_string(swapped_bytes)
    nbits = {n.output[0]: n for n in before.graph.node if n.op_type == "MatMulNBits"}
    ours = [n for n in after.graph.node if n.op_type == "Int4MatMul"]
    assert swapped == len(nbits) == len(ours) > 0
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
    assert onnxgraph.swap_model(plain)[1] == 1
    with_zero_points = onnx.load_from_string(plain)
    with_zero_points.graph.node[0].input.append("B")
    overridable = onnx.load_from_string(plain)  # B also a graph input: not a constant
    overridable.graph.input.append(helper.make_tensor_value_info("B", TensorProto.UINT8, list(B.shape)))
    eight_bits = onnx.load_from_string(plain)
    next(a for a in eight_bits.graph.node[0].attribute if a.name == "bits").i = 8
    for model in (with_zero_points, overridable, eight_bits):
        data = model.SerializeToString()
        assert onnxgraph.swap_model(data) == (data, 0)


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
    np.testing.assert_allclose(on, off, atol=1e-3, rtol=1e-3)
    tokens = {}
    for mode in ("off", "on"):
        with OrtRunner(md, kernels=mode) as runner:
            tokens[mode] = engine_generate(runner, ids[:1], 20, SamplingParams(0.8, 20), seed=7)
    assert np.array_equal(tokens["on"], tokens["off"])


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
    np.testing.assert_allclose(ours.run(["logits"], feeds)[0], theirs.run(["logits"], feeds)[0], atol=1e-3, rtol=1e-3)


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
