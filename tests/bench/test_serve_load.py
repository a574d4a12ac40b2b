"""scripts/serve_load.py: the requests its loads draw, how it counts tokens and failures, and one
real run of its ragged and burst loads on a tritonserver (llama-server needs the peers: not here)."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_unless_strict

from gptexport.errors import BackendUnavailable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import serve_load  # noqa: E402 (a script: its folder is on sys.path above)
from serve_load import Request, Result, draw_request, llama_check, measure, summarize, token_arrivals  # noqa: E402

GPT2 = {"vocab": 50257, "block_size": 1024}


def test_a_request_is_a_function_of_its_seed_only():
    for load in ("fixed", "ragged", "burst"):
        assert draw_request(load, 7, **GPT2, prompt_tokens=64) == draw_request(load, 7, **GPT2, prompt_tokens=64)
        assert draw_request(load, 7, **GPT2, prompt_tokens=64) != draw_request(load, 8, **GPT2, prompt_tokens=64)


def test_fixed_requests_are_the_old_random_prompts():
    req = draw_request("fixed", 1003, **GPT2, prompt_tokens=64, max_tokens=128)
    assert req.prompt_ids == tuple(np.random.default_rng(1003).integers(0, 50257, 64).tolist())
    assert req.max_tokens == 128
    assert draw_request("fixed", 3, **GPT2).prompt_ids == ()  # PROMPT's text


def test_ragged_lengths_are_wide_and_mostly_short():
    reqs = [draw_request("ragged", 1000 * c + r, **GPT2) for c in range(16) for r in range(16)]
    prompts = [len(q.prompt_ids) for q in reqs]
    outputs = [q.max_tokens for q in reqs]
    assert 10 <= min(prompts) < 15 and 330 < max(prompts) <= 400
    assert 40 < statistics.median(prompts) < 100  # log-uniform: the median near sqrt(10 * 400) = 63
    assert 32 <= min(outputs) < 45 and 240 < max(outputs) <= 256
    assert all(0 <= i < 50257 for q in reqs for i in q.prompt_ids)


def test_burst_prompts_reach_900_and_never_fill_the_context():
    reqs = [draw_request("burst", 1000 * c, **GPT2) for c in range(64)]
    prompts = [len(q.prompt_ids) for q in reqs]
    assert min(prompts) < 100 and max(prompts) > 800 and max(prompts) <= 900
    assert all(len(q.prompt_ids) + q.max_tokens < 1024 and q.max_tokens >= 1 for q in reqs)
    assert any(q.max_tokens < 256 - 32 and len(q.prompt_ids) > 1024 - 256 for q in reqs)  # shortened ones


def test_a_small_block_size_shortens_prompt_and_output():
    for seed in range(50):
        req = draw_request("burst", seed, vocab=65, block_size=128)
        assert 1 <= len(req.prompt_ids) <= 128 - 1 - 32 and len(req.prompt_ids) + req.max_tokens < 128


def test_tokens_arrive_with_the_event_whose_count_rises():
    events = [(1.0, {"n": 1}), (2.0, {"n": 3}), (2.5, {"n": 3}), (3.0, {"n": 4})]
    assert token_arrivals(events, lambda e: e["n"]) == [1.0, 2.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match="boom"):
        token_arrivals([(1.0, {"error": "boom"})], lambda e: 0)


def test_a_failed_request_is_kept_not_raised():
    req = Request(5, (1, 2), 3)

    def refused():
        raise ConnectionRefusedError("refused")

    result = measure(req, refused, lambda e: 0)
    assert not result.complete and "refused" in result.error
    short = measure(req, lambda: (0.0, [(0.1, {"n": 1}), (0.2, {"n": 2})]), lambda e: e["n"])
    assert short.error == "2 tokens, expected 3"


def test_llama_servers_last_event_is_checked():
    req = Request(5, (1, 2), 2)
    last = {"stop": True, "stop_type": "limit", "truncated": False, "tokens_predicted": 2, "tokens_evaluated": 2,
            "timings": {"cache_n": 0}}
    events = [(0.1, {"tokens": [7], "tokens_predicted": 2}), (0.2, last)]  # one token held back
    result = Result(req)
    assert llama_check(result, events) is None and result.held_back == 1
    cached = {**last, "truncated": True, "timings": {"cache_n": 2}}
    assert llama_check(Result(req), [(0.2, cached)]) == "truncated True, expected False; cache_n 2, expected 0"
    assert llama_check(Result(req), [(0.1, {"tokens": [7]})]) == "the stream ended without its last event"


def test_summary_counts_tokens_over_the_wall_time_and_lists_failures():
    ok = Result(Request(1, (1,), 3), start=0.0, token_times=[0.5, 0.6, 0.8])
    failed = Result(Request(2, (1, 2), 3), start=0.0, token_times=[1.0], error="1 tokens, expected 3")
    row = summarize([ok, failed], wall=2.0)
    assert row["tokens"] == 4 and row["tok_s"] == 2.0 and row["complete"] == 1
    assert row["failures"] == ["seed 2 (2-token prompt, 3 tokens): 1 tokens, expected 3"]
    assert row["ttft_p50_ms"] == pytest.approx(750.0)
    assert row["itl_p50_ms"] == pytest.approx(150.0)


@pytest.mark.triton
def test_ragged_and_burst_run_on_a_real_server(tiny_model_dir):
    from gptexport.serve.server import find_tritonserver

    try:
        find_tritonserver()
    except BackendUnavailable as e:
        skip_unless_strict(f"no tritonserver to test against: {e}")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve_load.py"), str(tiny_model_dir),
                             "--load", "ragged", "burst", "--concurrency", "2", "--requests", "2", "--burst", "3"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| gptexport serve --max-batch 16 | 2 | 4 |" in result.stdout
    assert "| gptexport serve --max-batch 16 | 3 | 3 |" in result.stdout
    assert result.stdout.count("4/4") == 1 and result.stdout.count("3/3") == 1
    assert serve_load.LOADS == ("fixed", "ragged", "burst")
