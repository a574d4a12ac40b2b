"""Serving without a server: request parsing, one request's generation, the repository `gptexport triton` writes.

The real tritonserver runs in test_triton_server.py; here the same code runs in-process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gptexport.artifacts.tokenizer import GPT2Tokenizer
from gptexport.cli import main
from gptexport.config import GPTConfig, io_spec
from gptexport.errors import UsageError
from gptexport.runtime.backends.base import Runner
from gptexport.runtime.session import GenerationSession, generate_samples
from gptexport.serve.protocol import INPUTS, parse_request, response_tensors


def request_tensors(**values) -> dict[str, np.ndarray]:
    """Inputs as Triton hands them to the model: typed as config.pbtxt says, with the batch dim of 1."""
    types = {"TYPE_STRING": np.object_, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32,
             "TYPE_UINT64": np.uint64, "TYPE_BOOL": np.bool_}
    specs = {s.name: s for s in INPUTS}
    out = {}
    for name, v in values.items():
        dtype = types[specs[name].triton_type]
        v = [x.encode() if isinstance(x, str) else x for x in (v if isinstance(v, list) else [v])]
        out[name] = np.array([v], dtype=dtype)
    return out


def collect(served, request, **kw):
    deltas = []
    outcome = served.run(request, lambda seq, ids, text: deltas.append((ids, text)), **kw)
    return outcome, deltas


@pytest.mark.parametrize("settings", [
    dict(temperature=0.8, top_k=200, seed=1337),
    dict(temperature=0.0, seed=5),
    dict(temperature=1.3, top_k=5, top_p=0.9, seed=2**40),
])
def test_a_request_samples_what_gptexport_generate_samples(served, tiny_model_dir, settings):
    cli = generate_samples(tiny_model_dir, "To be", max_new_tokens=40, **settings)[0].to_dict()
    request = served.parse(request_tensors(text_input="To be", max_tokens=40, stream=True, **settings), {})
    outcome, deltas = collect(served, request)
    assert outcome.tokens == cli["tokens"] and outcome.finish == "length"
    assert [i for ids, _ in deltas for i in ids] == cli["tokens"]  # one delta per token (char vocabulary)
    assert all(len(ids) == 1 for ids, _ in deltas)
    assert "".join(text for _, text in deltas) == cli["text"]


def test_defaults_are_the_clis(served, tiny_model_dir):
    cli = generate_samples(tiny_model_dir, "To be", max_new_tokens=30)[0].to_dict()
    outcome, _ = collect(served, served.parse(request_tensors(text_input="To be", max_tokens=30), {}))
    assert outcome.tokens == cli["tokens"]


def test_token_ids_in_and_out(served, tiny_model_dir):
    cli = generate_samples(tiny_model_dir, prompt_ids=[3, 4, 5], max_new_tokens=12, seed=9)[0].to_dict()
    request = served.parse(request_tensors(input_ids=[3, 4, 5], max_tokens=12, seed=9), {})
    assert collect(served, request)[0].tokens == cli["tokens"]


def test_stop_word_ends_generation_after_it(served):
    full, _ = collect(served, served.parse(request_tensors(text_input="To be", max_tokens=40, seed=3), {}))
    text = served.tokenizer.decode(full.tokens)
    stop = text[5:7]
    end = text.index(stop) + len(stop)  # the first place the stop word is complete
    outcome, deltas = collect(served, served.parse(
        request_tensors(text_input="To be", max_tokens=40, seed=3, stop_words=["", "never in it", stop]), {}))
    assert outcome.finish == "stop" and outcome.tokens == full.tokens[:end]
    assert "".join(t for _, t in deltas).endswith(stop)


def test_cancellation_stops_the_loop(served):
    calls = []
    request = served.parse(request_tensors(text_input="To be", max_tokens=60), {})
    outcome, deltas = collect(served, request, cancelled=lambda: calls.append(1) or len(calls) > 3)
    assert outcome.finish == "cancelled" and len(outcome.tokens) == 3 and len(deltas) == 3


@pytest.mark.parametrize("values, params, words", [
    (dict(text_input="To be", temperature=-1.0), {}, "temperature must be a finite number >= 0"),
    (dict(text_input="To be", top_p=1.5), {}, "top_p must be in (0, 1], got 1.5"),
    (dict(text_input="To be", top_p=0.0), {}, "top_p must be in (0, 1]"),
    (dict(text_input="To be", top_k=-2), {}, "top_k must be an integer >= 0 (0: no top-k), got -2"),
    (dict(text_input="To be", max_tokens=65), {}, "max_tokens must be in 1..64 (this model's limit), got 65"),
    (dict(text_input="To be", max_tokens=0), {}, "max_tokens must be in 1..64"),
    (dict(text_input=""), {}, "text_input is empty"),
    (dict(text_input="héllo"), {}, "text_input: prompt has characters not in the model's vocabulary: 'é'"),
    (dict(input_ids=[1, 999]), {}, "input_ids: token ids out of range: 999 (valid: 0..61)"),
    (dict(input_ids=[]), {}, "input_ids is empty"),
    (dict(text_input="To be", input_ids=[1]), {}, "give exactly one of text_input and input_ids"),
    ({}, {}, "give exactly one of text_input and input_ids"),
    (dict(text_input="To be"), {"max_new_tokens": 5},
     "unknown request parameter(s) 'max_new_tokens'; valid inputs: text_input"),
    (dict(text_input=["a", "b"]), {}, "text_input must be one string, got 2"),
    (dict(text_input="To be", seed=[1, 2]), {}, "seed must be one value, got 2"),
])
def test_bad_requests_say_what_is_valid(served, values, params, words):
    with pytest.raises(UsageError, match=None) as e:
        served.parse(request_tensors(**values), params)
    assert words in str(e.value)


def test_not_utf8_text_is_refused(served):
    with pytest.raises(UsageError, match="text_input is not UTF-8 text"):
        served.parse({"text_input": np.array([[b"\xff\xfe"]], dtype=np.object_)}, {})


def test_top_k_zero_is_no_top_k(served):
    assert served.parse(request_tensors(text_input="To be", top_k=0), {}).params.sampling.top_k is None


def test_response_tensors_have_the_batch_dim():
    out = response_tensors([5, 6], "hé", 3, 7)
    assert out["output_ids"].tolist() == [[5, 6]] and out["output_ids"].dtype == np.int32
    assert out["text_output"].tolist() == ["hé".encode()]  # (1,): TensorRT-LLM clients read text_output[0]
    assert out["num_input_tokens"].tolist() == [[3]] and out["num_output_tokens"].tolist() == [[7]]
    assert response_tensors([], None, 1, 0)["output_ids"].shape == (1, 0)


class ScriptedRunner(Runner):
    """A GPT-2-vocabulary runner whose logits make the greedy choice the next scripted token.

    It stands in for the model only; the session code under test (deltas, UTF-8 hold-back) is real.
    """

    name = "scripted"

    def __init__(self, script: list[int]):
        self.config = GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=1, n_embd=4)
        self.spec, self.script, self.step = io_spec(self.config), script, 0

    def infer(self, feeds):
        B, T = feeds["input_ids"].shape
        logits = np.zeros((B, 1, self.config.vocab_size), np.float32)
        logits[:, 0, self.script[self.step]] = 1.0
        self.step += 1
        new = np.zeros((B, 1, T, 4), np.float32)
        return {"logits": logits, **{n.replace("past_", "new_", 1): new for n in self.spec.past_names}}


def test_byte_level_bpe_never_sends_half_a_character():
    tok = GPT2Tokenizer.default()
    script = tok.encode("Hi 😀!")  # ' 😀' is two tokens, each half of the character's bytes
    assert len(script) == 4 and "\ufffd" in tok.decode(script[1:2])
    request = parse_request(request_tensors(text_input="x", max_tokens=4, temperature=0.0), {}, tok, 50257, 16)
    deltas = []
    GenerationSession(ScriptedRunner(script), tok).generate(request.prompt_ids, request.params,
                                                            lambda seq, ids, text: deltas.append((ids, text)))
    assert deltas == [([script[0]], "Hi"), (script[1:3], " 😀"), ([script[3]], "!")]


def test_cut_off_character_ends_with_its_ids_and_no_text():
    tok = GPT2Tokenizer.default()
    script = tok.encode("Hi 😀")
    request = parse_request(request_tensors(text_input="x", max_tokens=2, temperature=0.0), {}, tok, 50257, 16)
    deltas = []
    GenerationSession(ScriptedRunner(script), tok).generate(request.prompt_ids, request.params,
                                                            lambda seq, ids, text: deltas.append((ids, text)))
    assert deltas == [([script[0]], "Hi"), ([script[1]], "")]


# ---- the repository ----

def test_triton_writes_a_self_contained_repository(tiny_model_dir, tmp_path):
    repo = tmp_path / "repo"
    result = CliRunner().invoke(main, ["triton", str(tiny_model_dir), "-o", str(repo), "--instances", "3",
                                       "--name", "tiny", "--max-tokens", "77"])
    assert result.exit_code == 0, result.output
    version = repo / "tiny" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["gptexport.json", "model.onnx", "model.py"]
    assert (version / "model.onnx").read_bytes() == (tiny_model_dir / "model.onnx").read_bytes()
    config = (repo / "tiny" / "config.pbtxt").read_text()
    for want in ('name: "tiny"', 'backend: "python"', "decoupled: true", "count: 3 kind: KIND_CPU",
                 'name: "text_input" data_type: TYPE_STRING', 'name: "text_output"', 'string_value: "77"'):
        assert want in config, want
    assert "from gptexport.serve.model import TritonPythonModel" in (version / "model.py").read_text()
    assert "generate_stream" in (repo / "README.md").read_text()


def test_a_model_without_tokenizer_is_served_on_ids(tiny_model_dir, tmp_path):
    import shutil

    from gptexport.artifacts.files import write_json_atomic
    from gptexport.artifacts.modeldir import MANIFEST
    from gptexport.serve.repository import write_repository

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    manifest = json.loads((bare / MANIFEST).read_text())
    manifest["tokenizer"] = None
    write_json_atomic(bare / MANIFEST, manifest)
    config = (write_repository(bare, tmp_path / "repo") / "bare" / "config.pbtxt").read_text()
    assert "input_ids" in config and "output_ids" in config
    assert "text_input" not in config and "text_output" not in config and "stop_words" not in config


@pytest.mark.parametrize("args, code, words", [
    (["--name", ".hidden"], 2, "--name '.hidden': a Triton model name"),
    (["--name", "a/b"], 2, "--name 'a/b'"),
    (["--backend", "tensorrt"], 1, "has no TensorRT engine; build one with `gptexport build"),
    (["--instances", "0"], 2, "--instances"),
])
def test_triton_bad_options(tiny_model_dir, tmp_path, args, code, words):
    repo = tmp_path / "repo"
    result = CliRunner().invoke(main, ["triton", str(tiny_model_dir), "-o", str(repo), *args])
    assert result.exit_code == code and words in result.stderr, result.output
    assert not repo.exists() and list(tmp_path.iterdir()) == []


def test_triton_refuses_a_tampered_model_dir_and_an_existing_repo(tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    with open(bad / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    result = CliRunner().invoke(main, ["triton", str(bad), "-o", str(tmp_path / "repo")])
    assert result.exit_code == 1 and "model.onnx: sha256 does not match gptexport.json" in result.stderr
    assert not (tmp_path / "repo").exists()
    (tmp_path / "repo").mkdir()
    result = CliRunner().invoke(main, ["triton", str(tiny_model_dir), "-o", str(tmp_path / "repo")])
    assert result.exit_code == 2 and "already exists; pass --force" in result.stderr


def test_a_request_past_the_cache_limit_is_refused_by_name(tiny_model_dir):
    """`gptexport triton --max-cache-mb`: a request whose cache alone would pass the limit gets an error
    naming max_new_tokens and the limit (Triton's INVALID_ARG in the server). On the tiny model (block_size
    16) every request's cache rounds up to 16 positions, so a limit of 8 refuses them all."""
    from gptexport.serve.model import open_served_model

    c = GPTConfig(**json.loads((tiny_model_dir / "gptexport.json").read_text())["config"])
    position = 2 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * 4
    model = open_served_model(tiny_model_dir, "onnxruntime", 64, max_cache_mb=8 * position / 2**20)
    try:
        for _ in range(2):  # refused, and refused again: nothing is left half-admitted
            big = model.parse(request_tensors(text_input="To be", max_tokens=20), {})
            with pytest.raises(UsageError, match=r"max_new_tokens needs 16 positions of KV cache \(8.0 KB\) "
                                                 r".* limit of 4.0 KB \(--max-cache-mb\)"):
                model.run(big, lambda seq, ids, text: None)
        assert not model.session.scheduler.busy
    finally:
        model.close()
