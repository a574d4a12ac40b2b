"""The OpenAI-compatible front of a real `gptexport serve` (real tritonserver, real front), through
the real `openai` package and LangChain's ChatOpenAI.

One server for the module: the tiny model written with the shipped Shakespeare chat template, on
127.0.0.1 and free ports, stopped with SIGINT, every process of it gone afterwards. Expected
texts come from `gptexport generate`'s library call with the same seed and settings. Every
client loop is bounded in count and time. Without a tritonserver these tests skip, unless
GPTEXPORT_TEST_STRICT=1 (CI) makes them fail.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_unless_strict
from test_triton_server import Serve, http_post, require_server

from gptexport.runtime.session import generate_samples

pytestmark = pytest.mark.triton
MODEL = "tiny"
LIMIT = 20000  # the repository's max_tokens: long enough that a dropped request is still generating


@pytest.fixture(scope="module")
def front(tiny_model_dir, tmp_path_factory):
    require_server()
    try:
        import langchain_openai  # noqa: F401
        import openai  # noqa: F401
    except ImportError as e:  # the test extra brings both
        skip_unless_strict(f"the OpenAI clients are not installed: {e}")
    tmp = tmp_path_factory.mktemp("openai")
    repo = tmp / "repo"
    subprocess.run([sys.executable, "-m", "gptexport", "triton", str(tiny_model_dir), "-o", str(repo), "--name", MODEL,
                    "--max-tokens", str(LIMIT), "--chat-template", "shakespeare"], check=True, timeout=60)
    serve = Serve(repo, tmp / "serve.log")
    try:
        serve.health_seen = health_until_ready(serve)
        assert serve.wait_ready(), serve.text()[-3000:]
        yield serve
    finally:
        code = serve.stop()
        serve.assert_all_gone()
    assert code == 0, serve.text()[-2000:]


def health_until_ready(serve: Serve, timeout: float = 90) -> list[int]:
    """GET /health from the moment the front listens until it answers 200: the statuses seen."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and serve.proc.poll() is None and 200 not in seen:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{serve.openai}/health", timeout=2) as r:
                seen.append(r.status)
        except urllib.error.HTTPError as e:
            seen.append(e.code)
        except OSError:
            pass  # not listening yet
        time.sleep(0.05)
    return seen


def client(serve: Serve):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{serve.openai}/v1", api_key="unused", max_retries=0, timeout=60)


def expected(tiny_model_dir, prompt: str, n: int, **settings) -> dict:
    return generate_samples(tiny_model_dir, prompt, max_new_tokens=n, **settings)[0].to_dict()


def streamed(stream) -> tuple[dict[int, str], dict[int, str], list]:
    """Texts and finish_reasons by choice index, and the chunks, of a streamed completion."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.text or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, chunks


# ---- completions ----

def test_health_was_503_until_the_model_was_ready(front):
    assert front.health_seen[-1] == 200 and 503 in front.health_seen, front.health_seen


def test_completions_give_the_text_of_gptexport_generate_streamed_or_not(front, tiny_model_dir):
    want = expected(tiny_model_dir, "To be", 12, seed=7)
    got = client(front).completions.create(model=MODEL, prompt="To be", max_tokens=12, seed=7)
    assert got.choices[0].text == want["text"] and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (5, 12, 17)
    texts, reasons, chunks = streamed(client(front).completions.create(
        model=MODEL, prompt="To be", max_tokens=12, seed=7, stream=True))
    assert texts == {0: want["text"]} and reasons == {0: "length"}
    assert all(c.usage is None for c in chunks)


def test_include_usage_sends_a_final_usage_chunk(front):
    _, _, chunks = streamed(client(front).completions.create(
        model=MODEL, prompt="To be", max_tokens=6, seed=1, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == 5 and chunks[-1].usage.total_tokens == 11
    assert all(c.usage is None for c in chunks[:-1])


def test_a_prompt_of_token_ids_and_temperature_and_top_k(front, tiny_model_dir):
    from gptexport.artifacts.modeldir import load_model_dir

    want = expected(tiny_model_dir, "To be", 10, seed=4, temperature=1.3, top_k=5)
    prompt_ids = load_model_dir(tiny_model_dir).tokenizer().encode("To be")
    got = client(front).completions.create(model=MODEL, prompt=prompt_ids, max_tokens=10, seed=4, temperature=1.3,
                                           extra_body={"top_k": 5})
    assert got.choices[0].text == want["text"]


def test_a_stop_string_ends_the_text_before_it(front, tiny_model_dir):
    full = expected(tiny_model_dir, "To be", 40, seed=5)["text"]
    stop = full[20:22]  # two characters the text is known to reach
    cut = full[:full.index(stop)]
    got = client(front).completions.create(model=MODEL, prompt="To be", max_tokens=40, seed=5, stop=[stop])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 40
    texts, reasons, _ = streamed(client(front).completions.create(model=MODEL, prompt="To be", max_tokens=40, seed=5,
                                                                   stop=stop, stream=True))
    assert texts == {0: cut} and reasons == {0: "stop"}


def test_n_choices_are_seeded_seed_plus_i(front, tiny_model_dir):
    got = client(front).completions.create(model=MODEL, prompt="To be", max_tokens=8, seed=20, n=2)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == \
        [expected(tiny_model_dir, "To be", 8, seed=s)["text"] for s in (20, 21)]
    assert got.usage.completion_tokens == 16
    texts, reasons, _ = streamed(client(front).completions.create(model=MODEL, prompt="To be", max_tokens=8, seed=20,
                                                                   n=2, stream=True))
    assert texts == {i: c.text for i, c in enumerate(sorted(got.choices, key=lambda c: c.index))}
    assert reasons == {0: "length", 1: "length"}


def test_legacy_logprobs_sum_to_the_triton_endpoints_cum_log_probs(front):
    got = client(front).completions.create(model=MODEL, prompt="To be", max_tokens=6, seed=3, logprobs=1)
    lp = got.choices[0].logprobs
    status, (native,) = http_post(front, "generate", {"text_input": "To be", "max_tokens": 6, "seed": 3,
                                                      "return_log_probs": True})
    assert status == 200 and "".join(lp.tokens) == got.choices[0].text and len(lp.token_logprobs) == 6
    assert np.isclose(sum(lp.token_logprobs), native["cum_log_probs"], atol=1e-4)
    assert lp.text_offset == [5 + i for i in range(6)]  # after the 5-character prompt, one character a token
    assert [list(d) for d in lp.top_logprobs] == [[t] for t in lp.tokens]


def test_bad_requests_get_openais_errors_and_the_server_keeps_serving(front):
    import openai

    with pytest.raises(openai.BadRequestError, match="temperature must be a finite number >= 0") as e:
        client(front).completions.create(model=MODEL, prompt="To be", temperature=-1)
    assert e.value.body["param"] == "temperature" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="temperature must be") as e:  # streamed: before the stream
        client(front).completions.create(model=MODEL, prompt="To be", temperature=-1, stream=True)
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4' does not exist"):
        client(front).completions.create(model="gpt-4", prompt="To be")
    with pytest.raises(openai.BadRequestError, match="logprobs 5 is not supported") as e:
        client(front).completions.create(model=MODEL, prompt="To be", logprobs=5)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError, match="characters not in the model's vocabulary"):
        client(front).completions.create(model=MODEL, prompt="To bé")
    with pytest.raises(openai.BadRequestError, match=f"max_tokens must be in 1..{LIMIT}"):
        client(front).completions.create(model=MODEL, prompt="To be", max_tokens=LIMIT + 1)
    with pytest.raises(openai.BadRequestError, match="n: Input should be less than or equal to 16"):
        client(front).completions.create(model=MODEL, prompt="To be", n=17)
    got = client(front).completions.create(model=MODEL, prompt="To be", max_tokens=3,
                                           extra_body={"min_p": 0.1})
    assert got.usage.completion_tokens == 3  # unknown fields: ignored, with a log line
    assert "ignored unknown field(s) of a request: min_p" in front.text()


def test_a_dropped_stream_cancels_its_request(front):
    conn = http.client.HTTPConnection("127.0.0.1", front.openai, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "To be", "max_tokens": LIMIT,
                                                        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    events, request_id = 0, None
    while events < 5:
        line = resp.readline()
        if line.startswith(b"data: "):
            events += 1
            request_id = json.loads(line[6:])["id"]
    conn.sock.close()  # as a killed client
    conn.close()
    marker = f"request {request_id!r} cancelled by the client after"
    deadline = time.monotonic() + 30
    while marker not in front.text() and time.monotonic() < deadline:
        time.sleep(0.2)
    line = next(ln for ln in front.text().splitlines() if marker in ln)
    assert 5 <= int(line.split("after ")[1].split(" of ")[0]) < LIMIT, line
    assert client(front).completions.create(model=MODEL, prompt="To be", max_tokens=2).usage.completion_tokens == 2


def test_a_dropped_non_streamed_request_is_cancelled_too(front):
    marker = "cancelled by the client after"
    before = front.text().count(marker)
    conn = http.client.HTTPConnection("127.0.0.1", front.openai, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "To be", "max_tokens": LIMIT}),
                 {"Content-Type": "application/json"})
    time.sleep(0.5)  # generating: the tiny model makes LIMIT tokens in several seconds
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 30
    while front.text().count(marker) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert front.text().count(marker) == before + 1
    line = [ln for ln in front.text().splitlines() if marker in ln][-1]
    assert int(line.split("after ")[1].split(" of ")[0]) < LIMIT, line


def test_sixteen_concurrent_seeded_streams_give_the_texts_of_one_at_a_time(front, tiny_model_dir):
    seeds = list(range(300, 316))
    got: dict[int, str] = {}

    def one(seed: int) -> None:
        texts, _, _ = streamed(client(front).completions.create(model=MODEL, prompt="To be", max_tokens=15, seed=seed,
                                                                 stream=True))
        got[seed] = texts[0]

    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and sorted(got) == seeds
    for seed in seeds:
        assert got[seed] == expected(tiny_model_dir, "To be", 15, seed=seed)["text"], seed


# ---- chat, models, metrics ----

def chat_prompt(messages: list[dict]) -> str:
    from gptexport.serve.chat_template import SHAKESPEARE, compile_template, render

    return render(compile_template(SHAKESPEARE, "shipped"), messages)


def test_chat_with_the_shipped_template(front, tiny_model_dir):
    messages = [{"role": "user", "content": "What light through yonder window breaks?"}]
    prompt = chat_prompt(messages)
    assert prompt == "ROMEO:\nWhat light through yonder window breaks?\n\nJULIET:\n"
    want = expected(tiny_model_dir, prompt, 10, seed=9)["text"]
    got = client(front).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=9)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == "length" and got.usage.prompt_tokens == len(prompt)
    chunks = list(client(front).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=9,
                                                         stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    lp = client(front).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=9,
                                               logprobs=True).choices[0].logprobs.content
    assert "".join(t.token for t in lp) == want and all(t.logprob <= 0 for t in lp) and len(lp) == 10


def test_langchain_chat_openai_invoke_and_stream(front, tiny_model_dir):
    import langchain_openai

    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=f"http://127.0.0.1:{front.openai}/v1", api_key="unused",
                                      max_tokens=12, seed=2, max_retries=0, timeout=60)
    want = expected(tiny_model_dir, chat_prompt([{"role": "user", "content": "Good morrow"}]), 12, seed=2)["text"]
    assert llm.invoke("Good morrow").content == want
    assert "".join(chunk.content for chunk in llm.stream("Good morrow")) == want


def test_models_and_metrics(front):
    from prometheus_client.parser import text_string_to_metric_families

    models = client(front).models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].max_model_len == 16
    assert client(front).models.retrieve(MODEL).id == MODEL
    client(front).completions.create(model=MODEL, prompt="To be", max_tokens=4)
    with urllib.request.urlopen(f"http://127.0.0.1:{front.openai}/metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    for name in ("gptexport:num_requests_running", "gptexport:num_requests_waiting", "gptexport:prompt_tokens",
                 "gptexport:generation_tokens", "gptexport:time_to_first_token_seconds",
                 "gptexport:time_per_output_token_seconds", "nv_inference_request_success"):
        assert name in families, sorted(families)
    generated = sum(s.value for s in families["gptexport:generation_tokens"].samples if s.name.endswith("_total"))
    assert generated >= 4


def test_when_tritonserver_dies_serve_stops_the_front_and_says_why(tiny_model_dir, tmp_path):
    """One process tree: Triton killed under it, `gptexport serve` exits 1 with a one-line error,
    and the front's port no longer listens."""
    import os
    import signal

    from test_triton_server import children

    require_server()
    serve = Serve(tiny_model_dir, tmp_path / "serve.log")
    try:
        assert serve.wait_ready(), serve.text()[-3000:]
        triton = [p for p in children(serve.proc.pid) if "tritonserver" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(triton) == 1
        os.kill(triton[0], signal.SIGKILL)
        serve.proc.wait(60)
    finally:
        serve.stop()
        serve.assert_all_gone()
    last = serve.text().strip().splitlines()[-1]
    assert serve.proc.returncode == 1 and last.startswith("error: "), last
    assert "tritonserver exited with code -9" in last, last
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{serve.openai}/health", timeout=2)
