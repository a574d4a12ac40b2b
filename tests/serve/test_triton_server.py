"""A real tritonserver, started by `gptexport serve` on a repository from `gptexport triton`.

One server for the module (a tiny model, 2 instances), on 127.0.0.1 and ports chosen here; it is
stopped with SIGINT as Ctrl-C would, killed if it does not stop, and every process of it (serve,
tritonserver, the Python stubs) must be gone afterwards. Every client loop is bounded in count
and time. Without a tritonserver these tests skip, unless GPTEXPORT_TEST_STRICT=1 (CI) makes them
fail.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
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

import gptexport
from gptexport.errors import BackendUnavailable
from gptexport.runtime.session import generate_samples

pytestmark = pytest.mark.triton
MODEL = "tiny"
LIMIT = 4096  # the repository's max_tokens: long enough that a cancelled request would still be running


def require_server() -> None:
    from gptexport.serve.server import find_tritonserver

    try:
        find_tritonserver()
        import tritonclient.grpc  # noqa: F401
    except (BackendUnavailable, ImportError) as e:
        skip_unless_strict(f"no tritonserver to test against: {e}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


class Serve:
    """`gptexport serve PATH` in a subprocess (Triton and the OpenAI front), its output in a log file."""

    def __init__(self, path: Path, log: Path):
        self.http, self.grpc, self.openai, self.log = free_port(), free_port(), free_port(), log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptexport", "serve", str(path), "--http-port", str(self.http),
             "--grpc-port", str(self.grpc), "--openai-port", str(self.openai), "--verbose"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pids = [self.proc.pid]

    def wait_ready(self, timeout: float = 90) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if "Ctrl-C to stop" in self.text():
                triton = children(self.proc.pid)
                self.pids += triton + [c for t in triton for c in children(t)]
                return True
            time.sleep(0.2)
        return False

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGINT, as Ctrl-C; SIGKILL after 30 s. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def assert_all_gone(self) -> None:
        deadline = time.monotonic() + 20
        while alive(self.pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = alive(self.pids)
        for pid in left:  # never leave a process behind, even when failing
            os.kill(pid, signal.SIGKILL)
        assert not left, f"still running after stop: {left}"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    require_server()
    tmp = tmp_path_factory.mktemp("triton")
    repo = tmp / "repo"
    subprocess.run([sys.executable, "-m", "gptexport", "triton", str(tiny_model_dir), "-o", str(repo), "--name", MODEL,
                    "--instances", "2", "--max-tokens", str(LIMIT)], check=True, timeout=60)
    serve = Serve(repo, tmp / "serve.log")
    try:
        assert serve.wait_ready(), serve.text()[-3000:]
        assert len(serve.pids) >= 4, serve.pids  # serve, tritonserver, one stub per instance
        yield serve
    finally:
        code = serve.stop()
        serve.assert_all_gone()
    assert code == 0, serve.text()[-2000:]


def expected(tiny_model_dir, prompt: str, n: int, **settings) -> dict:
    return generate_samples(tiny_model_dir, prompt, max_new_tokens=n, **settings)[0].to_dict()


# ---- clients ----

def http_post(server: Serve, endpoint: str, body: dict, timeout: float = 60,
              model: str = MODEL) -> tuple[int, list[dict]]:
    """POST to generate / generate_stream: the status and the JSON objects (one per SSE event)."""
    req = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/{model}/{endpoint}",
                                 data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    if endpoint == "generate_stream" and raw.startswith("data: "):
        return status, [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    return status, [json.loads(raw)]


def grpc_inputs(prompt: str, max_tokens: int, seed: int, **more):
    import tritonclient.grpc as grpcclient

    values = {"text_input": (np.array([[prompt]], dtype=np.object_), "BYTES"),
              "max_tokens": (np.array([[max_tokens]], dtype=np.int32), "INT32"),
              "seed": (np.array([[seed]], dtype=np.uint64), "UINT64"),
              "stream": (np.array([[True]]), "BOOL"), **more}
    inputs = []
    for name, (array, dtype) in values.items():
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


def grpc_stream(server: Serve, inputs, max_responses: int, cancel_after: int | None = None, timeout: float = 60):
    """Stream one request over gRPC; the responses' output_ids and texts, and the error if any."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    ids, texts, error = [], [], None
    try:
        client.async_stream_infer(MODEL, inputs, request_id="r", enable_empty_final_response=True)
        for _ in range(max_responses):
            result, error = results.get(timeout=timeout)
            if error is not None:
                break
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            ids += result.as_numpy("output_ids").reshape(-1).tolist()
            texts.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            if cancel_after is not None and len(texts) == cancel_after:
                client.stop_stream(cancel_requests=True)
                break
    finally:
        client.stop_stream()
        client.close()
    return ids, texts, error


# ---- tests ----

def test_grpc_stream_gives_the_tokens_of_gptexport_generate(server, tiny_model_dir):
    want = expected(tiny_model_dir, "To be", 30, seed=7)
    ids, texts, error = grpc_stream(server, grpc_inputs("To be", 30, seed=7), max_responses=40)
    assert error is None and ids == want["tokens"]
    assert len(texts) == 30 and "".join(texts) == want["text"]  # one response per token


def test_http_generate_stream_gives_the_tokens_of_gptexport_generate(server, tiny_model_dir):
    want = expected(tiny_model_dir, "To be", 25, seed=11, temperature=1.1, top_k=20)
    status, events = http_post(server, "generate_stream", {"text_input": "To be", "max_tokens": 25, "seed": 11,
                                                           "temperature": 1.1, "top_k": 20, "stream": True})
    assert status == 200 and len(events) == 25
    assert [e["output_ids"] for e in events] == want["tokens"]  # a one-element list comes back as a scalar
    assert "".join(e["text_output"] for e in events) == want["text"]
    assert [e["num_output_tokens"] for e in events] == list(range(1, 26))
    assert {e["num_input_tokens"] for e in events} == {5}


def test_generate_returns_the_whole_text(server, tiny_model_dir):
    want = expected(tiny_model_dir, "To be", 40)
    status, (body,) = http_post(server, "generate", {"text_input": "To be", "max_tokens": 40})
    assert status == 200, body
    assert body["text_output"] == "To be" + want["text"] and body["output_ids"] == want["tokens"]
    assert body["num_output_tokens"] == 40
    _, (body,) = http_post(server, "generate", {"text_input": "To be", "max_tokens": 40,
                                                "exclude_input_in_output": True})
    assert body["text_output"] == want["text"]


def test_a_cancelled_stream_stops_generating(server):
    ids, texts, error = grpc_stream(server, grpc_inputs("To be", LIMIT, seed=1), max_responses=10, cancel_after=3)
    assert error is None and len(texts) == 3
    deadline = time.monotonic() + 30
    while "cancelled by the client" not in server.text() and time.monotonic() < deadline:
        time.sleep(0.2)
    line = next(ln for ln in server.text().splitlines() if "cancelled by the client" in ln)
    done = int(line.split("after ")[1].split(" of ")[0])
    assert 3 <= done < LIMIT, line
    status, (body,) = http_post(server, "generate", {"text_input": "To be", "max_tokens": 5})
    assert status == 200 and body["num_output_tokens"] == 5


def test_eight_concurrent_clients_get_their_own_seeds_tokens(server, tiny_model_dir):
    seeds = list(range(100, 108))
    got: dict[int, list] = {}

    def client(seed: int) -> None:
        _, events = http_post(server, "generate_stream", {"text_input": "To be", "max_tokens": 20, "seed": seed,
                                                          "stream": True})
        got[seed] = [e.get("output_ids") for e in events]

    threads = [threading.Thread(target=client, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    for seed in seeds:
        assert got[seed] == expected(tiny_model_dir, "To be", 20, seed=seed)["tokens"], seed


def test_sixteen_clients_one_in_ten_malformed_none_lost(server, tiny_model_dir):
    """In-flight batching under load: every good request streams its own tokens (those of
    `gptexport generate` with its seed), every bad one gets its error, and nothing is lost."""
    bad = {3: ({"temperature": -2}, "temperature must be a finite number >= 0"),
           13: ({"top_k": -1}, "top_k must be an integer >= 0"),
           27: ({"max_tokens": LIMIT + 1}, f"max_tokens must be in 1..{LIMIT}")}
    got: dict[int, tuple[int, list[dict]]] = {}

    def client(worker: int) -> None:
        for i in range(worker, 30, 16):  # 30 requests over 16 concurrent clients
            body = {"text_input": "To be", "max_tokens": 10 + i % 7, "seed": 500 + i, "stream": True,
                    **bad.get(i, ({}, ""))[0]}
            got[i] = http_post(server, "generate_stream", body, timeout=120)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads) and sorted(got) == list(range(30))
    for i, (status, events) in got.items():
        if i in bad:
            assert "error" in events[-1] and bad[i][1] in events[-1]["error"], (i, events)
        else:
            want = expected(tiny_model_dir, "To be", 10 + i % 7, seed=500 + i)["tokens"]
            assert status == 200 and [e["output_ids"] for e in events] == want, i  # one token per event
    status, (body,) = http_post(server, "generate", {"text_input": "To be", "max_tokens": 4})
    assert status == 200 and body["num_output_tokens"] == 4  # and it keeps serving


def test_bad_requests_get_errors_and_the_server_keeps_serving(server):
    status, (body,) = http_post(server, "generate", {"text_input": "To be", "temperature": -1})
    assert status == 400 and "temperature must be a finite number >= 0 (0 is greedy), got -1.0" in body["error"]
    status, events = http_post(server, "generate_stream", {"text_input": "To be", "top_p": 2, "stream": True})
    assert "top_p must be in (0, 1], got 2.0" in events[-1]["error"]
    status, (body,) = http_post(server, "generate", {"text_input": "To be", "max_new_tokens": 5})
    assert status == 400 and "unknown request parameter(s) 'max_new_tokens'; valid inputs:" in body["error"]
    _, _, error = grpc_stream(server, grpc_inputs("To be", LIMIT + 1, seed=1), max_responses=3)
    assert error is not None and f"max_tokens must be in 1..{LIMIT}" in str(error)
    _, _, error = grpc_stream(server, grpc_inputs("To bé", 5, seed=1), max_responses=3)
    assert "characters not in the model's vocabulary: 'é'" in str(error)
    status, (body,) = http_post(server, "generate", {"text_input": "To be", "max_tokens": 6})
    assert status == 200 and body["num_output_tokens"] == 6


def test_a_tampered_model_is_refused_at_load(tiny_model_dir, tmp_path):
    require_server()
    repo = tmp_path / "repo"
    subprocess.run([sys.executable, "-m", "gptexport", "triton", str(tiny_model_dir), "-o", str(repo)],
                   check=True, timeout=60)
    onnx = repo / tiny_model_dir.name / "1" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[200] ^= 0xFF
    onnx.write_bytes(bytes(data))
    serve = Serve(repo, tmp_path / "serve.log")
    try:
        serve.proc.wait(90)
    finally:
        serve.stop()
        serve.assert_all_gone()
    last = serve.text().strip().splitlines()[-1]
    assert serve.proc.returncode == 1, serve.text()[-2000:]
    assert last.startswith("error: ")
    assert "model.onnx: sha256 does not match gptexport.json (file modified after export)" in last


def test_serve_a_model_directory_directly(tiny_model_dir, tmp_path):
    require_server()
    serve = Serve(tiny_model_dir, tmp_path / "serve.log")
    try:
        assert serve.wait_ready(), serve.text()[-3000:]
        status, (body,) = http_post(serve, "generate", {"text_input": "To be", "max_tokens": 3},
                                    model=tiny_model_dir.name)
        assert status == 200 and body["num_output_tokens"] == 3
    finally:
        code = serve.stop()
        serve.assert_all_gone()
    assert code == 0


# ---- TensorRT-LLM's clients, unchanged ----

def test_the_request_of_tensorrt_llms_end_to_end_grpc_client(server, tiny_model_dir):
    """Built as inflight_batcher_llm/client/end_to_end_grpc_client.py builds it with `-p PROMPT`: its six
    inputs, dtypes and (1, 1) shapes, beam_width 1, through start_stream / async_stream_infer; it reads
    `as_numpy('text_output')[0].decode('utf-8')` and checks it equals the prompt + the generated text."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    prompt = "To be"
    arrays = {"text_input": np.array([[prompt]]).astype(object), "max_tokens": np.array([[24]], dtype=np.int32),
              "stream": np.array([[False]], dtype=bool), "beam_width": np.array([[1]], dtype=np.int32),
              "temperature": np.array([[1.0]], dtype=np.float32),
              "exclude_input_in_output": np.array([[False]], dtype=bool)}
    inputs = []
    for name, array in arrays.items():
        t = grpcclient.InferInput(name, array.shape, np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        inputs.append(t)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(MODEL, inputs, outputs=[grpcclient.InferRequestedOutput("text_output")], request_id="")
    result, error = results.get(timeout=60)
    client.stop_stream()
    client.close()
    assert error is None, error
    output = result.as_numpy("text_output")[0].decode("utf-8")
    assert output == prompt + expected(tiny_model_dir, prompt, 24, temperature=1.0)["text"]


@pytest.mark.parametrize("settings,api", [
    ({"random_seed": 9}, {"seed": 9}),
    ({"repetition_penalty": 1.6, "seed": 2}, {"repetition_penalty": 1.6, "seed": 2}),
    ({"presence_penalty": 1.0, "frequency_penalty": 0.5, "seed": 2},
     {"presence_penalty": 1.0, "frequency_penalty": 0.5, "seed": 2}),
    ({"bad_words": ["e", "a"], "temperature": 0.0}, {"bad_words": ("e", "a"), "temperature": 0.0}),
    ({"end_id": 4, "min_length": 6, "temperature": 0.0}, {"end_id": 4, "min_tokens": 6, "temperature": 0.0}),
])
def test_tensorrt_llm_inputs_over_http_match_gptexport_generate(server, tiny_model_dir, settings, api):
    status, (body,) = http_post(server, "generate", {"text_input": "To be", "max_tokens": 20, **settings})
    assert status == 200, body
    want = expected(tiny_model_dir, "To be", 20, **api)
    ids = body["output_ids"] if isinstance(body["output_ids"], list) else [body["output_ids"]]  # one: a scalar
    assert ids == want["tokens"]


def test_log_probs_come_back_per_token_and_summed(server, tiny_model_dir):
    status, (body,) = http_post(server, "generate", {"text_input": "To be", "max_tokens": 6, "seed": 3,
                                                     "return_log_probs": True})
    want = gptexport.generate(tiny_model_dir, "To be", max_new_tokens=6, seed=3, logprobs=True)[0]
    assert status == 200 and np.allclose(body["output_log_probs"], want.logprobs, atol=1e-5)
    assert np.isclose(body["cum_log_probs"], sum(want.logprobs), atol=1e-4)


def test_beam_search_and_lora_are_refused_and_the_server_keeps_serving(server):
    status, (body,) = http_post(server, "generate", {"text_input": "To be", "beam_width": 2})
    assert status == 400 and "beam_width 2 is not supported: gptexport has no beam search" in body["error"]
    _, _, error = grpc_stream(server, grpc_inputs("To be", 5, seed=1, lora_task_id=(np.array([[7]], np.uint64),
                                                                                 "UINT64")), max_responses=3)
    assert error is not None and "lora_task_id is not supported: LoRA adapters are not supported" in str(error)
    status, (body,) = http_post(server, "generate", {"text_input": "To be", "max_tokens": 3})
    assert status == 200 and body["num_output_tokens"] == 3


def test_dropping_an_http_stream_cancels_its_request(server):
    """The client goes away mid-stream (closes the connection): Triton cancels the request and
    the model stops generating (it says so in the log), long before max_tokens."""
    import http.client

    marker = "cancelled by the client after"
    before = server.text().count(marker)
    conn = http.client.HTTPConnection("127.0.0.1", server.http, timeout=60)
    conn.request("POST", f"/v2/models/{MODEL}/generate_stream",
                 json.dumps({"text_input": "To be", "max_tokens": LIMIT, "stream": True, "seed": 8}))
    resp = conn.getresponse()
    events = 0
    while events < 5:
        if resp.readline().startswith(b"data: "):
            events += 1
    conn.sock.close()  # drop the connection, as a killed client does
    conn.close()
    deadline = time.monotonic() + 30
    while server.text().count(marker) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    line = [ln for ln in server.text().splitlines() if marker in ln][-1]
    done = int(line.split("after ")[1].split(" of ")[0])
    assert 5 <= done < LIMIT, line


def test_the_openai_front_answers_chat_without_a_template_with_an_error(server):
    """A repository written without --chat-template: /v1/chat/completions says so and points to
    /v1/completions, which works."""
    try:
        import openai
    except ImportError as e:  # the test extra brings it
        skip_unless_strict(f"the openai package is not installed: {e}")
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{server.openai}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="has no chat template: use /v1/completions") as e:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["code"] == "no_chat_template"
    assert api.completions.create(model=MODEL, prompt="To be", max_tokens=3).usage.completion_tokens == 3
