"""The OpenAI front's pieces that need no server: stop strings over a stream, the request tensors,
the request bodies' checks, the chat template. (The front itself is tested against a real
`gptexport serve` in test_openai_api.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from gptexport.artifacts.tokenizer import CharTokenizer
from gptexport.errors import UsageError
from gptexport.serve.chat_template import SHAKESPEARE, check_fits, compile_template, render, template_source
from gptexport.serve.openai_schema import CompletionRequest, FrontError, check_completion, single_prompt
from gptexport.serve.openai_translate import Choice, legacy_logprobs, model_inputs, param_of
from gptexport.serve.triton_link import Delta


def feed(stops: tuple[str, ...], pieces: list[str], max_tokens: int = 100) -> tuple[list[str], str, str, str]:
    """Stream `pieces` (one token each) through a Choice: what it released per piece, the rest at
    the end, the finish_reason, the final text."""
    choice = Choice(0, stops)
    released = [choice.add(Delta(0, [i], piece, None, 3)) for i, piece in enumerate(pieces)]
    rest, reason = choice.finish(max_tokens)
    return released, rest, reason, choice.final_text


def test_a_stop_string_across_deltas_is_cut_and_never_sent():
    released, rest, reason, text = feed(("END",), ["ab", "cE", "N", "Dxy"])
    assert released == ["ab", "c", "", ""] and rest == "" and reason == "stop" and text == "abc"


def test_text_that_only_looked_like_a_stop_string_is_sent_once_it_is_not():
    released, rest, reason, text = feed(("END",), ["aE", "Nb", "c"], max_tokens=3)
    assert released == ["a", "ENb", "c"] and rest == "" and reason == "length" and text == "aENbc"


def test_the_earliest_of_several_stop_strings_wins_and_fewer_tokens_is_stop():
    released, rest, reason, text = feed(("zz", "y"), ["xy", "zz"])
    assert "".join(released) + rest == "x" == text and reason == "stop"
    _, rest, reason, text = feed((), ["a", "b"], max_tokens=5)  # the model stopped early (end token)
    assert reason == "stop" and text == "ab"


def test_legacy_logprobs_offsets_follow_the_token_texts():
    class Chars:
        def decode(self, ids):
            return "".join("ab"[i] * (i + 1) for i in ids)

    lp = legacy_logprobs([0, 1, 0], [-0.5, -1.0, -2.0], Chars(), 10, top=True)
    assert lp["tokens"] == ["a", "bb", "a"] and lp["text_offset"] == [10, 11, 13]
    assert lp["top_logprobs"] == [{"a": -0.5}, {"bb": -1.0}, {"a": -2.0}]


def test_only_the_fields_given_become_inputs():
    req = CompletionRequest(model="m", prompt="hi", temperature=0.5, stop=["\n", ""], n=2, seed=3)
    arrays = model_inputs(req, "hi", 7, False, None)
    assert set(arrays) == {"text_input", "max_tokens", "stream", "num_return_sequences", "return_log_probs",
                           "temperature", "seed", "stop_words"}
    assert arrays["stop_words"].tolist() == [[b"\n"]] and arrays["seed"].dtype == np.uint64
    assert all(a.shape[0] == 1 for a in arrays.values())  # the batch dim of max_batch_size 1
    with pytest.raises(FrontError, match="seed must be >= 0, got -1") as e:
        model_inputs(CompletionRequest(model="m", prompt="hi", seed=-1), "hi", 7, False, None)
    assert e.value.param == "seed"
    with pytest.raises(FrontError, match="max_tokens is out of range"):
        model_inputs(req, "hi", 2 ** 40, False, None)


def test_the_bodies_own_checks_name_their_field():
    with pytest.raises(FrontError, match="logprobs 2 is not supported") as e:
        check_completion(CompletionRequest(model="m", prompt="x", logprobs=2))
    assert (e.value.status, e.value.param) == (400, "logprobs")
    with pytest.raises(FrontError, match="a batch of 2 prompts is not supported"):
        single_prompt(["a", "b"])
    assert single_prompt([[1, 2]]) == [1, 2] and single_prompt(["a"]) == "a"
    assert CompletionRequest(model="m", prompt="x", n=None, stream=None, echo=None).n == 1  # null: the default
    assert param_of("temperature must be a finite number >= 0, got -1.0") == "temperature"
    assert param_of("text_input: characters not in the model's vocabulary") == "prompt"
    assert param_of("internal error: boom") is None


def test_the_shipped_template_and_a_broken_one():
    template = compile_template(SHAKESPEARE, "shipped")
    messages = [{"role": "system", "content": "A street in Verona."}, {"role": "user", "content": "Good morrow."},
                {"role": "assistant", "content": "Good morrow, cousin."}, {"role": "user", "content": "Farewell.",
                                                                            "name": "MERCUTIO"}]
    assert render(template, messages) == ("A street in Verona.\n\nROMEO:\nGood morrow.\n\nJULIET:\nGood morrow, "
                                          "cousin.\n\nMERCUTIO:\nFarewell.\n\nJULIET:\n")
    assert render(template, messages[:2], add_generation_prompt=False).endswith("Good morrow.\n\n")
    assert template_source("shakespeare") == SHAKESPEARE
    with pytest.raises(UsageError, match="no such file, nor a shipped template"):
        template_source("chatml")
    with pytest.raises(UsageError, match=r"not a Jinja2 template \(line 1"):
        compile_template("{% for m in messages %}", "t.jinja")

    with pytest.raises(UsageError, match=r"--chat-template shakespeare: its text does not fit the model's tokenizer "
                                         r"\(prompt has characters not in the model's vocabulary: 'R'"):
        check_fits(SHAKESPEARE, CharTokenizer(dict(enumerate("abc:\n"))), "shakespeare")
    check_fits(SHAKESPEARE, CharTokenizer(dict(enumerate("ROMEJULIT:\n"))), "shakespeare")
