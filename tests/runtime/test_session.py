"""The generation session and the Python API at the package root: one set of defaults, one
meaning of top_k 0, parameter errors in each caller's own words."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_error, cli, nanogpt_generate

import gptexport
from gptexport.errors import ParameterError
from gptexport.runtime.sampling import DEFAULT_SAMPLING, DEFAULT_SEED, SamplingParams
from gptexport.runtime.session import GenerationParams, GenerationSession


def test_the_api_is_five_names_and_imports_nothing_heavy():
    code = ("import sys, gptexport\n"
            "print(sorted(gptexport.__all__), "
            "[m for m in ('torch', 'onnxruntime', 'onnx', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("['__version__', 'convert_checkpoint', 'generate', 'load_model_dir', 'open_runner', "
                           "'parity'] []")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = gptexport.nope


def test_a_sequence_is_nanogpts_loop_with_its_own_seeded_generator(tiny_model_dir):
    params = GenerationParams(max_new_tokens=30, sampling=SamplingParams(0.9, 10), seed=7)
    with GenerationSession.open(tiny_model_dir) as session:
        want = nanogpt_generate(session.runner, np.array([[1, 2, 3]]), 30, params.sampling, np.random.default_rng(7))[0]
        deltas = []
        outcome = session.generate([1, 2, 3], params, lambda seq, ids, text: deltas.append((ids, text)))
    assert outcome.tokens == want.tolist() and outcome.finish == "length"
    assert [i for ids, _ in deltas for i in ids] == outcome.tokens


def test_samples_draw_from_one_generator_as_sample_py(tiny_model_dir):
    two = gptexport.generate(tiny_model_dir, "To be", max_new_tokens=20, num_samples=2, seed=3)
    with GenerationSession.open(tiny_model_dir) as session:
        rng = np.random.default_rng(3)
        ids = session.encode("To be")
        firsts = [session.generate(ids, GenerationParams(20, DEFAULT_SAMPLING, 3), rng=rng).tokens for _ in range(2)]
    assert [s.tokens for s in two] == firsts and firsts[0] != firsts[1]


def test_defaults_are_one_set(tiny_model_dir):
    api = gptexport.generate(tiny_model_dir, "To be", max_new_tokens=25)[0]
    result = cli("generate", tiny_model_dir, "--prompt", "To be", "--max-new-tokens", "25", "--json")
    assert json.loads(result.stdout)["samples"][0]["tokens"] == api.tokens
    assert GenerationParams().sampling == DEFAULT_SAMPLING == SamplingParams(0.8, 200)
    assert GenerationParams().seed == DEFAULT_SEED == 1337


def test_top_k_zero_is_no_top_k_in_the_cli_and_the_api(tiny_model_dir):
    none = gptexport.generate(tiny_model_dir, "To be", max_new_tokens=25, top_k=None, temperature=1.5)[0]
    zero = gptexport.generate(tiny_model_dir, "To be", max_new_tokens=25, top_k=0, temperature=1.5)[0]
    k3 = gptexport.generate(tiny_model_dir, "To be", max_new_tokens=25, top_k=3, temperature=1.5)[0]
    result = cli("generate", tiny_model_dir, "--prompt", "To be", "--max-new-tokens", "25", "--temperature", "1.5",
                 "--top-k", "0", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["samples"][0]["tokens"] == zero.tokens == none.tokens != k3.tokens


@pytest.mark.parametrize("kwargs,api,flag", [
    (dict(top_k=-1), "top_k must be an integer >= 0", "--top-k must be an integer >= 0"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0", "--temperature must be"),
    (dict(max_new_tokens=-2), "max_new_tokens must be an integer >= 0", "--max-new-tokens must be"),
    (dict(num_samples=0), "num_samples must be an integer >= 1", "--num-samples must be"),
    (dict(seed=-5), "seed must be an integer >= 0", "--seed must be"),
])
def test_parameter_errors_name_the_parameter_in_each_callers_words(tiny_model_dir, kwargs, api, flag):
    with pytest.raises(ParameterError, match=api):
        gptexport.generate(tiny_model_dir, "To be", **kwargs)
    (name, value), = kwargs.items()
    result = cli("generate", tiny_model_dir, "--prompt", "To be", "--" + name.replace("_", "-"), value)
    assert_error(result, 2, flag)


def test_prompt_ids_are_checked(tiny_model_dir):
    with GenerationSession.open(tiny_model_dir) as session:
        with pytest.raises(ParameterError, match=r"prompt_ids has token ids out of range: 999"):
            session.generate([1, 999])
        with pytest.raises(ParameterError, match="prompt_ids is empty"):
            session.generate([])


def test_generate_prompts_writes_one_result_per_line_as_generate_alone(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\n\nor not\\nto be\nthat\n")
    result = cli("generate", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", "12", "--max-batch", "2")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2] and [r["line"] for r in lines] == [1, 3, 4]
    for r, prompt in zip(lines, ["To be", "or not\nto be", "that"]):
        assert r["tokens"] == gptexport.generate(tiny_model_dir, prompt, max_new_tokens=12)[0].tokens
    assert "generated 3 sequences" in result.stderr


def test_generate_prompts_json_lines_set_each_prompts_own_settings(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "To be", "seed": 5, "temperature": 1.2}, {"prompt_tokens": [3, 4], "max_new_tokens": 4},
            {"prompt": "or", "top_k": 0, "stop_words": ["e"]}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = cli("generate", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", "9")
    assert result.exit_code == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert got[0]["tokens"] == gptexport.generate(tiny_model_dir, "To be", max_new_tokens=9, seed=5,
                                                  temperature=1.2)[0].tokens
    assert got[1]["tokens"] == gptexport.generate(tiny_model_dir, prompt_ids=[3, 4], max_new_tokens=4)[0].tokens
    third = gptexport.generate(tiny_model_dir, "or", max_new_tokens=9, top_k=0, stop_words=("e",))[0]
    assert got[2]["tokens"] == third.tokens and got[2]["finish"] == third.finish
    assert all("logprobs" not in r for r in got)


def test_generate_prompts_logprobs_as_generate_alone(tiny_model_dir, tmp_path):
    """--logprobs with --prompts (or "logprobs" on a line) gives each item its tokens' log-probabilities."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "To be", "seed": 3}) + "\n" + json.dumps({"prompt": "or"}) + "\n")
    result = cli("generate", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", "6", "--logprobs")
    assert result.exit_code == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    for r, (prompt, seed) in zip(got, [("To be", 3), ("or", 1337)]):
        alone = gptexport.generate(tiny_model_dir, prompt, max_new_tokens=6, seed=seed, logprobs=True)[0]
        assert r["tokens"] == alone.tokens and len(r["logprobs"]) == 6
        np.testing.assert_allclose(r["logprobs"], alone.logprobs, atol=1e-6)
    prompts.write_text(json.dumps({"prompt": "To be", "logprobs": True}) + "\n" + json.dumps({"prompt": "or"}) + "\n")
    got = [json.loads(line) for line in cli("generate", tiny_model_dir, "--prompts", prompts).stdout.splitlines()]
    assert "logprobs" in got[0] and "logprobs" not in got[1]


@pytest.mark.parametrize("text,words", [
    ('{"prompt": "To be", "tmp": 1}\n', ["line 1", "tmp is not a setting"]),
    ('{"prompt": "To be"}\n{"prompt": "a", "temperature": -1}\n', ["line 2", "temperature must be"]),
    ('{"prompt": "To be"}\nplain\n', ["line 2", "not a JSON object"]),
    ('\n\n', ["has no prompts"]),
])
def test_a_bad_prompts_file_names_its_line(tiny_model_dir, tmp_path, text, words):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(text)
    assert_error(cli("generate", tiny_model_dir, "--prompts", prompts), 1, prompts, *words)


def test_generate_loads_the_model_directory_and_builds_its_tokenizer_once(tiny_model_dir, monkeypatch):
    import gptexport.artifacts.modeldir as modeldir
    import gptexport.artifacts.tokenizer as tokenizer

    calls = {"verify_files": 0, "tokenizer_from_json": 0}
    for module, name in ((modeldir, "verify_files"), (tokenizer, "tokenizer_from_json")):
        def counted(*args, _f=getattr(module, name), _name=name):
            calls[_name] += 1
            return _f(*args)
        monkeypatch.setattr(module, name, counted)
    for args in (["--prompt", "To be"], ["--prompt-tokens", "1,2", "--num-samples", "2"]):
        calls.update(verify_files=0, tokenizer_from_json=0)
        result = cli("generate", tiny_model_dir, *args, "--max-new-tokens", "3", "--json")
        assert result.exit_code == 0, result.stderr
        assert calls == {"verify_files": 1, "tokenizer_from_json": 1}
