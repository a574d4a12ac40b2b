"""One set of settings: the flags, a --prompts JSON line, the API's keywords and a served request all
name a request's settings alike and build one GenerationParams with params_from (the served side:
tests/serve/test_trtllm_inputs.py); and the text of a sequence (TextStream) is what decoding all
its tokens at once gives."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gptexport
from gptexport.artifacts.tokenizer import GPT2Tokenizer
from gptexport.errors import ParameterError
from gptexport.runtime.params import GenerationParams, params_from
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.session import GenerationSession
from gptexport.runtime.textstream import TextStream


def test_settings_set_on_top_of_a_base():
    base = GenerationParams(30, SamplingParams(0.5, 10, 0.9), seed=3, stop_words=("x",))
    got = params_from({"top_k": 0, "stop_words": None, "seed": 8}, base)
    assert got == GenerationParams(30, SamplingParams(0.5, None, 0.9), 8)
    assert params_from({}, base) == base


@pytest.mark.parametrize("named,param,words", [
    ({"temprature": 1.0}, "temprature", "is not a setting; valid: max_new_tokens, temperature"),
    ({"bad_words": [1.5]}, "bad_words", "must be words (text) or lists of token ids, got 1.5"),
    ({"embedding_bias": [[1]]}, "embedding_bias", "must be (token id, weight) pairs, got [1]"),
    ({"embedding_bias": [[1, math.inf]]}, "embedding_bias", "weights must be finite numbers"),
    ({"repetition_penalty": 0}, "repetition_penalty", "must be > 0 (1: no penalty), got 0"),
    ({"bad_words": ["a"]}, "bad_words", "cannot be text: this model directory has no tokenizer"),
])
def test_a_bad_setting_is_named(named, param, words):
    with pytest.raises(ParameterError) as e:
        params_from(named)
    assert e.value.param == param and words in str(e.value)


def test_token_ids_out_of_range_name_their_setting():
    with pytest.raises(ParameterError, match=r"^embedding_bias has token ids out of range: 99 \(valid: 0..61\)"):
        GenerationParams(embedding_bias=((99, 1.0),)).check_vocab(62)
    with pytest.raises(ParameterError, match=r"^bad_words has token ids out of range: 70"):
        GenerationParams(bad_words=((1, 70),)).check_vocab(62)


def test_the_api_takes_params_and_keywords_on_top(tiny_model_dir):
    with pytest.raises(ParameterError, match="temprature is not a setting"):
        gptexport.generate(tiny_model_dir, "To be", temprature=1.0)
    params = GenerationParams(15, SamplingParams(1.2, 5), seed=9)
    with GenerationSession.open(tiny_model_dir) as session:  # a session already open is taken as it is
        by_params = gptexport.generate(session, "To be", params=params)[0]
        by_keywords = gptexport.generate(session, "To be", max_new_tokens=15, temperature=1.2, top_k=5, seed=9)[0]
        over = gptexport.generate(session, "To be", params=params, seed=10)[0]
    assert by_params.tokens == by_keywords.tokens != over.tokens and len(over.tokens) == 15


def test_on_delta_is_handed_its_sequence(tiny_model_dir):
    seen = []
    with GenerationSession.open(tiny_model_dir) as session:
        outcome = session.generate([1, 2, 3], GenerationParams(12), lambda seq, ids, text: seen.append(
            (seq, ids, list(seq.tokens))))
    seq = seen[0][0]
    assert all(s is seq for s, _, _ in seen) and seq.tokens == outcome.tokens
    assert all(tokens[len(tokens) - len(ids):] == ids for _, ids, tokens in seen)  # its last tokens, as made


# ---- TextStream ----

@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer.default()


EMOJI = "Hi 😀, é — 漢字!"  # characters of 2 to 4 bytes, several split across byte-level BPE tokens


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_deltas_are_the_text_of_all_tokens_decoded_at_once(gpt2, data):
    pool = gpt2.encode(EMOJI) + [gpt2.encode("😀")[0]] * 2 + gpt2.encode(" the cat")
    tokens = data.draw(st.lists(st.sampled_from(pool), max_size=40))
    stream, text, held = TextStream(gpt2), "", []
    for t in tokens:
        delta = stream.feed([t])
        held.append(t)
        if delta is not None:
            assert delta[0] == held and not delta[1].endswith("\ufffd")
            text, held = text + delta[1], []
    assert stream.flush() == held
    assert text == gpt2.decode(tokens[:len(tokens) - len(held)])


@settings(max_examples=100, deadline=None)
@given(deltas=st.lists(st.text("ab ", max_size=4), max_size=12),
       words=st.lists(st.text("ab ", min_size=1, max_size=5), min_size=1, max_size=3))
def test_a_stop_word_is_found_in_the_delta_where_it_ends(deltas, words):
    stream, sent = TextStream(None, tuple(words)), ""
    for delta in deltas:
        before, sent = len(sent), sent + delta
        ends_here = any(sent.find(w, i) == i for w in words for i in range(max(0, before - len(w) + 1), len(sent)))
        assert stream.stops(delta) == ends_here, (sent, delta, words)
