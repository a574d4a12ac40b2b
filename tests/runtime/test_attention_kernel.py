"""CachedAttention (runtime/kernels/attention.cc): the op against numpy's attention over each row's
visible keys, the swap of each layer's attention subgraph (attention_pattern.py), and a model with it
against the same model without: logits and the engine's tokens.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from conftest import engine_generate
from onnx import TensorProto, helper, numpy_helper

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.runtime.backends.kernels import session_model
from gptexport.runtime.backends.ort import OrtRunner
from gptexport.runtime.kernels import onnxgraph
from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.scheduler import Sequence, run_to_end

INPUTS = ("q", "k_new", "v_new", "k_past", "v_past", "past_length", "scale")


def attention_session(library, outputs=("y",)):
    import onnxruntime as ort

    types = {"past_length": TensorProto.INT64}
    node = helper.make_node("CachedAttention", list(INPUTS), list(outputs), domain=onnxgraph.DOMAIN)
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in INPUTS]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                    for n in outputs])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(onnxgraph.DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def reference(q, k_new, v_new, k_past, v_past, past_length, scale) -> np.ndarray:
    """Row b, head h, query t: softmax over past keys j < past_length[b] and new keys 0..t, in float64;
    (B, T, heads, head_dim) as the op returns it."""
    B, H, T, D = q.shape
    y = np.zeros((B, T, H, D))
    for b in range(B):
        L = min(max(int(past_length[b]), 0), k_past.shape[2])
        for t in range(T):
            keys = np.concatenate([k_past[b, :, :L], k_new[b, :, :t + 1]], axis=1).astype(np.float64)
            values = np.concatenate([v_past[b, :, :L], v_new[b, :, :t + 1]], axis=1).astype(np.float64)
            scores = np.einsum("hd,hjd->hj", q[b, :, t], keys) * scale
            p = np.exp(scores - scores.max(-1, keepdims=True))
            y[b, t] = np.einsum("hj,hjd->hd", p / p.sum(-1, keepdims=True), values)
    return y


# (B, T, P, past lengths, head_dim): decode, ragged rows, an empty row, chunks after a past, a
# prefill from nothing, lengths past the buffer, head sizes off the 8- and 16-lane vectors
CASES = [(1, 1, 64, [40], 64), (3, 1, 128, [5, 128, 77], 64), (2, 7, 64, [0, 30], 16), (1, 33, 0, [0], 64),
         (4, 1, 20, [20, 1, 0, 17], 13), (2, 19, 9, [9, 3], 8), (1, 2, 4, [99], 3)]


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_cached_attention_matches_attention_over_the_visible_keys(library, monkeypatch, isa):
    if isa == "generic":
        monkeypatch.setenv("GPTEXPORT_KERNELS_ISA", "generic")  # read when a session registers the library
    rng = np.random.default_rng(1)
    session = attention_session(library)
    for B, T, P, lengths, D in CASES:
        new = [rng.standard_normal((B, 3, T, D)).astype(np.float32) for _ in range(3)]
        past = [rng.standard_normal((B, 3, P, D)).astype(np.float32) * 3 for _ in range(2)]
        for a in past:  # a masked slot is never read: a NaN there cannot reach the output
            for b, L in enumerate(lengths):
                a[b, :, L:] = np.nan
        feeds = dict(zip(INPUTS, [*new, *past, np.array(lengths, np.int64), np.array(1 / math.sqrt(D), np.float32)]))
        got = session.run(None, feeds)[0]
        np.testing.assert_allclose(got, reference(**feeds), atol=2e-6, rtol=1e-5, err_msg=f"{(B, T, P, lengths, D)}")


def with_new_keys(past, new, lengths):
    """The past with each row's new keys at its length .. length + T - 1, those that fit."""
    out = past.copy()
    for b, L in enumerate(lengths):
        fit = max(0, min(new.shape[2], past.shape[2] - L))
        out[b, :, L:L + fit] = new[b, :, :fit]
    return out


def test_cached_attention_writes_its_new_keys_into_the_presents_or_the_past_itself(library):
    """Presents allocated by ONNX Runtime are the past with the new keys written in; bound to the
    past's own buffers (how the batch cache binds them), only the new positions are written, and the
    output is the attention over the past as it was."""
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    session = attention_session(library, ("y", "k_present", "v_present"))
    for B, T, P, lengths, D in CASES:
        new = [rng.standard_normal((B, 3, T, D)).astype(np.float32) for _ in range(3)]
        past = [rng.standard_normal((B, 3, P, D)).astype(np.float32) for _ in range(2)]
        feeds = dict(zip(INPUTS, [*new, *past, np.array(lengths, np.int64), np.array(1 / math.sqrt(D), np.float32)]))
        want_y, case = reference(**feeds), f"{(B, T, P, lengths, D)}"
        y, k_present, v_present = session.run(None, feeds)
        np.testing.assert_allclose(y, want_y, atol=2e-6, rtol=1e-5, err_msg=case)
        np.testing.assert_array_equal(k_present, with_new_keys(past[0], new[1], lengths), err_msg=case)
        np.testing.assert_array_equal(v_present, with_new_keys(past[1], new[2], lengths), err_msg=case)

        shared = [a.copy() for a in past]
        binding = session.io_binding()
        for name, array in {**feeds, "k_past": shared[0], "v_past": shared[1]}.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        y_shared = np.zeros_like(want_y, np.float32)
        for name, array in (("y", y_shared), ("k_present", shared[0]), ("v_present", shared[1])):
            binding.bind_output(name, "cpu", 0, np.float32, array.shape, array.ctypes.data)
        session.run_with_iobinding(binding)
        np.testing.assert_array_equal(y_shared, y, err_msg=case)
        np.testing.assert_array_equal(shared[0], k_present, err_msg=case)
        np.testing.assert_array_equal(shared[1], v_present, err_msg=case)


def test_a_flat_batch_is_each_segment_attending_over_its_own_row(library):
    """Segments (row, tokens): the tokens of several rows in one batch-1 call, each segment against
    its own row's past at its own length, its new keys written there; other rows untouched."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    inputs = (*INPUTS, "segments")
    types = {"past_length": TensorProto.INT64, "segments": TensorProto.INT64}
    node = helper.make_node("CachedAttention", list(inputs), ["y", "k_present", "v_present"], domain=onnxgraph.DOMAIN)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None)
                                            for n in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                               for n in ("y", "k_present", "v_present")])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(onnxgraph.DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    R, H, P, D = 5, 3, 40, 16
    lengths = np.array([7, 0, 12, 3, 30], np.int64)
    segments = np.array([[2, 1], [0, 1], [3, 17], [1, 4]], np.int64)  # two decode rows, two chunks; row 4 idle
    T = int(segments[:, 1].sum())
    new = [rng.standard_normal((1, H, T, D)).astype(np.float32) for _ in range(3)]
    past = [rng.standard_normal((R, H, P, D)).astype(np.float32) for _ in range(2)]
    scale = np.array(0.25, np.float32)
    feeds = dict(zip(inputs, [*new, *past, lengths, scale, segments]))
    y, k_present, v_present = session.run(None, feeds)
    want_k, want_v, offset = past[0].copy(), past[1].copy(), 0
    for row, count in segments.tolist():
        part = [a[:, :, offset:offset + count] for a in new]
        want = reference(*part, past[0][row:row + 1], past[1][row:row + 1], lengths[row:row + 1], float(scale))
        np.testing.assert_allclose(y[:, offset:offset + count], want, atol=2e-6, rtol=1e-5, err_msg=f"row {row}")
        L = int(lengths[row])
        want_k[row, :, L:L + count], want_v[row, :, L:L + count] = part[1][0], part[2][0]
        offset += count
    np.testing.assert_array_equal(k_present, want_k)
    np.testing.assert_array_equal(v_present, want_v)
    # a row twice, tokens that do not add up, a row past the cache's
    for bad in ([[2, 1], [2, 1], [3, 17], [1, 4]], [[2, 1], [0, 1], [3, 16], [1, 4]],
                [[5, 1], [0, 1], [3, 17], [1, 4]]):
        with pytest.raises(Exception, match="CachedAttention: (segment|the segments)"):
            session.run(None, {**feeds, "segments": np.array(bad, np.int64)})


def test_cached_attention_says_which_shapes_it_takes(library):
    session = attention_session(library)
    a = np.zeros((1, 2, 3, 4), np.float32)
    feeds = dict(zip(INPUTS, [a, a, a, np.zeros((1, 2, 5, 3), np.float32), np.zeros((1, 2, 5, 4), np.float32),
                              np.zeros(1, np.int64), np.array(0.5, np.float32)]))
    with pytest.raises(Exception, match="CachedAttention: k_new, v_new must be shaped as q"):
        session.run(None, feeds)


def graph_swap(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    swapped, found = onnxgraph.swap_model(model.SerializeToString(), ("CachedAttention",))
    return onnx.load_from_string(swapped), found


def test_swap_takes_each_layers_attention_and_its_initializers(tiny_model_dir):
    before = onnx.load(str(tiny_model_dir / "model.onnx"))
    after, found = graph_swap(before)
    n_layer = load_model_dir(tiny_model_dir).config.n_layer
    ours = [n for n in after.graph.node if n.op_type == "CachedAttention"]
    assert found == {"CachedAttention": n_layer} and len(ours) == n_layer
    ops = lambda m: [n.op_type for n in m.graph.node]  # noqa: E731
    for op, per_layer in {"Softmax": 1, "Where": 2, "Slice": 2}.items():
        assert ops(before).count(op) == per_layer * n_layer and op not in ops(after)
    assert all(list(n.input) == [n.input[0], f"new_key.{i}", f"new_value.{i}", f"past_key.{i}", f"past_value.{i}",
                                 "past_length", n.input[6], "segments"] for i, n in enumerate(ours))
    used = {name for n in after.graph.node for name in n.input}
    assert {i.name for i in after.graph.initializer} <= used  # none left for ONNX Runtime to warn of
    # the graph gains the flat batch's inputs: the position embedding reads position_ids, and every
    # CachedAttention takes segments
    assert after.graph.input[:len(before.graph.input)] == before.graph.input
    assert [i.name for i in after.graph.input[len(before.graph.input):]] == ["position_ids", "segments"]
    wpe = next(n for n in after.graph.node if n.op_type == "Gather" and "wpe" in n.input[0])
    assert list(wpe.input)[1] == "position_ids" and all(n.input[7] == "segments" for n in ours)
    # the graph gains each layer's presents, typed and shaped as its pasts, made by its CachedAttention
    pasts = {i.name: i for i in before.graph.input if i.name.startswith("past_")}
    gained = after.graph.output[len(before.graph.output):]
    assert after.graph.output[:len(before.graph.output)] == before.graph.output and len(gained) == 2 * n_layer
    for info in gained:
        past = pasts[info.name.replace("present_", "past_", 1)]
        assert info.type == past.type
    assert all(list(n.output[1:]) == [f"present_key.{i}", f"present_value.{i}"] for i, n in enumerate(ours))


def test_swap_leaves_an_attention_it_would_not_compute_the_same(tiny_model_dir):
    model = onnx.load(str(tiny_model_dir / "model.onnx"))
    where = next(n for n in model.graph.node if n.op_type == "Where")
    fill = next(i for i in model.graph.initializer if i.name == where.input[1])
    fill.CopyFrom(numpy_helper.from_array(np.array(-1e9, np.float32), fill.name))  # not -inf: not our softmax
    assert graph_swap(model)[1] == {}
    model = onnx.load(str(tiny_model_dir / "model.onnx"))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.output.append(helper.make_tensor_value_info(softmax.output[0], TensorProto.FLOAT, None))
    layers = load_model_dir(tiny_model_dir).config.n_layer
    assert graph_swap(model)[1] == {"CachedAttention": layers - 1}  # probabilities someone reads: kept


def test_model_with_cached_attention_matches_the_graph(library, tiny_model_dir):
    md = load_model_dir(tiny_model_dir)
    assert session_model(md.onnx_path, "auto").ops == {"CachedAttention": md.config.n_layer}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, md.config.vocab_size, (3, 10))
    logits = {}
    for mode in ("off", "on"):
        with OrtRunner(md, kernels=mode) as runner:
            cache = runner.new_batch_cache(3, 16)
            try:
                logits[mode] = np.array(cache.prefill(0, ids, all_positions=True))
            finally:
                cache.close()
    np.testing.assert_allclose(logits["on"], logits["off"], atol=1e-5, rtol=1e-5)
    # ragged rows decoding together, each crossing block_size (16): the same tokens both ways
    prompts = [rng.integers(0, md.config.vocab_size, n).tolist() for n in (3, 9, 14)]
    tokens = {}
    for mode in ("off", "on"):
        with OrtRunner(md, kernels=mode) as runner:
            params = GenerationParams(12, SamplingParams(0.8, 20), 5)
            seqs = [Sequence(p, params, notice=lambda m: None) for p in prompts]
            tokens[mode] = [s.tokens for s in run_to_end(runner, seqs)]
            alone = engine_generate(runner, [prompts[1]], 12, SamplingParams(0.8, 20), seed=5)
        assert alone.tolist() == [tokens[mode][1]]
    assert tokens["on"] == tokens["off"]
