"""TensorRT-LLM's optional request inputs, in-process: each honoured as documented and the same as
`gptexport generate` with the same settings, or refused by name. (The real server: test_triton_server.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import cli, nanogpt_generate
from test_serve import collect, request_tensors

import gptexport
from gptexport.errors import UsageError
from gptexport.runtime.params import SETTINGS, params_from
from gptexport.runtime.sampling import SamplingParams, logits_to_probs
from gptexport.serve.protocol import INPUTS, REFUSED


def served_tokens(served, **inputs):
    outcome, deltas = collect(served, served.parse(request_tensors(**inputs), {}))
    return outcome


def alone(tiny_model_dir, prompt="To be", **settings):
    return gptexport.generate(tiny_model_dir, prompt, **settings)[0]


def test_random_seed_is_seed(served, tiny_model_dir):
    a = served_tokens(served, text_input="To be", max_tokens=20, random_seed=77)
    b = served_tokens(served, text_input="To be", max_tokens=20, seed=77)
    assert a.tokens == b.tokens == alone(tiny_model_dir, max_new_tokens=20, seed=77).tokens
    assert served_tokens(served, text_input="To be", max_tokens=20, seed=77, random_seed=77).tokens == a.tokens
    with pytest.raises(UsageError, match="seed 1 and random_seed 2 differ"):
        served.parse(request_tensors(text_input="To be", seed=1, random_seed=2), {})


def test_beam_width_one_is_sampling_and_others_are_refused(served):
    assert served.parse(request_tensors(text_input="To be", beam_width=1), {}).params.sampling.temperature == 0.8
    with pytest.raises(UsageError, match="beam_width 2 is not supported: gptexport has no beam search"):
        served.parse(request_tensors(text_input="To be", beam_width=2), {})


def test_end_id_stops_and_min_length_holds_it_back(served, tiny_model_dir):
    greedy = alone(tiny_model_dir, max_new_tokens=30, temperature=0.0).tokens
    end = greedy[5]  # the greedy text's sixth token
    first = greedy.index(end)
    stopped = served_tokens(served, text_input="To be", max_tokens=30, temperature=0.0, end_id=end)
    assert stopped.finish == "stop" and stopped.tokens == greedy[:first]  # the end token is not output
    assert stopped.tokens == alone(tiny_model_dir, max_new_tokens=30, temperature=0.0, end_id=end).tokens
    held = served_tokens(served, text_input="To be", max_tokens=30, temperature=0.0, end_id=end, min_length=first + 3)
    assert end not in held.tokens[:first + 3] and len(held.tokens) >= first + 3
    assert held.tokens == alone(tiny_model_dir, max_new_tokens=30, temperature=0.0, end_id=end,
                                min_tokens=first + 3).tokens
    with pytest.raises(UsageError, match="min_tokens 3 and min_length 4 differ"):
        served.parse(request_tensors(text_input="To be", min_tokens=3, min_length=4), {})


def test_min_length_holds_back_stop_words(served, tiny_model_dir):
    tok = served.tokenizer
    text = tok.decode(alone(tiny_model_dir, max_new_tokens=30, temperature=0.0).tokens)
    word = text[2:4]
    early = served_tokens(served, text_input="To be", max_tokens=30, temperature=0.0, stop_words=[word])
    late = served_tokens(served, text_input="To be", max_tokens=30, temperature=0.0, stop_words=[word], min_length=10)
    assert early.finish == "stop" and len(early.tokens) < 10
    assert late.finish in ("stop", "length") and len(late.tokens) >= 10


@pytest.mark.parametrize("penalty", [dict(repetition_penalty=1.8), dict(presence_penalty=1.5),
                                     dict(frequency_penalty=0.7)])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_each_penalty_changes_the_output_as_generate_does(served, tiny_model_dir, penalty, temperature):
    plain = served_tokens(served, text_input="To be", max_tokens=40, temperature=temperature, seed=3)
    got = served_tokens(served, text_input="To be", max_tokens=40, temperature=temperature, seed=3, **penalty)
    assert got.tokens != plain.tokens
    assert got.tokens == alone(tiny_model_dir, max_new_tokens=40, temperature=temperature, seed=3, **penalty).tokens


def test_bad_words_are_never_completed(served, tiny_model_dir):
    tok = served.tokenizer
    plain = tok.decode(served_tokens(served, text_input="To be", max_tokens=60, temperature=0.0).tokens)
    word = plain[3:5]  # a two-token word the greedy text completes
    got = served_tokens(served, text_input="To be", max_tokens=60, temperature=0.0, bad_words=[word, "q"])
    text = tok.decode(got.tokens)
    assert word not in "To be"[-(len(word) - 1):] + text and "q" not in text and text != plain
    assert got.tokens == alone(tiny_model_dir, max_new_tokens=60, temperature=0.0, bad_words=(word, "q")).tokens


def test_log_probs_are_those_of_the_distribution_sampled_from(served, tiny_model_dir):
    from gptexport.runtime.params import GenerationParams

    req = served.parse(request_tensors(text_input="To be", max_tokens=8, temperature=0.9, top_k=10, seed=4,
                                       return_log_probs=True), {})
    outcome = served.run(req, lambda seq, ids, text: None)
    assert len(outcome.logprobs) == 8 and all(lp <= 0 for lp in outcome.logprobs)
    # recompute: the lone run's logits at each step (nanoGPT's full forward), through the same distribution
    runner, ids = served.runner, list(req.prompt_ids)
    for token, lp in zip(outcome.tokens, outcome.logprobs):
        logits = []
        nanogpt_generate(runner, np.array([ids]), 1, SamplingParams(0.0), np.random.default_rng(0), record=logits)
        logits = logits[0][0]
        p = logits_to_probs(logits[None], 0.9, 10)[0, token]
        assert math.isclose(lp, math.log(p), rel_tol=1e-5, abs_tol=1e-6)
        ids.append(token)
    assert GenerationParams().logprobs is False


def test_embedding_bias_pushes_its_words(served):
    plain = served_tokens(served, text_input="To be", max_tokens=20, temperature=0.0)
    got = served_tokens(served, text_input="To be", max_tokens=20, temperature=0.0,
                        embedding_bias_words=["z"], embedding_bias_weights=[50.0])
    assert got.tokens != plain.tokens and served.tokenizer.decode(got.tokens).count("z") > 10
    with pytest.raises(UsageError, match="one weight per word"):
        served.parse(request_tensors(text_input="To be", embedding_bias_words=["z", "y"],
                                     embedding_bias_weights=[1.0]), {})


def test_num_return_sequences_seeds_each_with_seed_plus_its_index(served, tiny_model_dir):
    req = served.parse(request_tensors(text_input="To be", max_tokens=10, seed=40, num_return_sequences=3), {})
    assert [p.seed for p in req.sequence_params()] == [40, 41, 42]
    with pytest.raises(UsageError, match="num_return_sequences must be in 1..16"):
        served.parse(request_tensors(text_input="To be", num_return_sequences=0), {})


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_every_unsupported_input_is_refused_by_name(served, name):
    spec = next(s for s in INPUTS if s.name == name)
    value = {"TYPE_BOOL": True, "TYPE_STRING": "json", "TYPE_INT32": 2, "TYPE_UINT64": 3, "TYPE_FP16": 0.5,
             "TYPE_UINT8": 1}[spec.triton_type]
    shape = tuple(1 if d == -1 else d for d in spec.dims)
    dtype = {"TYPE_BOOL": np.bool_, "TYPE_STRING": np.object_, "TYPE_INT32": np.int32, "TYPE_UINT64": np.uint64,
             "TYPE_FP16": np.float16, "TYPE_UINT8": np.uint8}[spec.triton_type]
    array = np.full((1, *shape), value.encode() if isinstance(value, str) else value, dtype=dtype)
    inputs = {**request_tensors(text_input="To be"), name: array}
    with pytest.raises(UsageError, match=f"^{name} is not supported: "):
        served.parse(inputs, {})
    if spec.triton_type == "TYPE_BOOL":  # false asks for nothing: accepted
        served.parse({**request_tensors(text_input="To be"), name: np.zeros((1, 1), np.bool_)}, {})


def test_accepted_inputs_without_an_effect_here(served):
    req = served.parse(request_tensors(text_input="To be", pad_id=0, length_penalty=1.0, return_num_input_tokens=True,
                                       return_num_output_tokens=True), {})
    assert req.params == served.parse(request_tensors(text_input="To be"), {}).params
    # as TensorRT-LLM: pad_id is not checked (a GPT-2 client's 50256), end_id -1 means no end token
    assert served.parse(request_tensors(text_input="To be", pad_id=50256), {}).params == req.params
    assert served.parse(request_tensors(text_input="To be", end_id=-1), {}).params.end_id is None
    with pytest.raises(UsageError, match=r"end_id must be a token id 0\.\.\d+, or -1 for no end token, got -2"):
        served.parse(request_tensors(text_input="To be", end_id=-2), {})
    with pytest.raises(UsageError, match="end_id must be a token id 0..*got 1000000"):
        served.parse(request_tensors(text_input="To be", end_id=10**6), {})


# ---- one set of settings: a request's inputs are the named settings of params_from ----

def test_a_served_request_and_named_settings_give_one_params(served):
    tok = served.tokenizer
    named = dict(max_new_tokens=12, temperature=1.1, top_k=7, top_p=0.9, seed=4, stop_words=["e"], min_tokens=2,
                 end_id=3, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.25, bad_words=["th"],
                 embedding_bias=[[tok.encode("z")[0], 2.0]], logprobs=True)
    assert set(named) == set(SETTINGS)
    request = served.parse(request_tensors(
        text_input="To be", max_tokens=12, temperature=1.1, top_k=7, top_p=0.9, seed=4, stop_words=["e"],
        min_tokens=2, end_id=3, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.25,
        bad_words=["th"], embedding_bias_words=["z"], embedding_bias_weights=[2.0], return_log_probs=True), {})
    assert request.params == params_from(named, tokenizer=tok)
    assert request.params.bad_words == (tuple(tok.encode("th")),)


def test_a_json_line_sets_what_a_request_sets(tiny_model_dir, served, tmp_path):
    """embedding_bias from a --prompts line does what the served request's embedding_bias_words do."""
    z = served.tokenizer.encode("z")[0]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "To be", "temperature": 0, "embedding_bias": [[z, 50.0]]}) + "\n")
    result = cli("generate", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", "20")
    assert result.exit_code == 0, result.stderr
    request = served.parse(request_tensors(text_input="To be", max_tokens=20, temperature=0.0,
                                           embedding_bias_words=["z"], embedding_bias_weights=[50.0]), {})
    outcome = served.run(request, lambda seq, ids, text: None)
    assert json.loads(result.stdout)["tokens"] == outcome.tokens and outcome.tokens.count(z) > 10
