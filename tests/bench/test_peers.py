"""The peers in the benchmark (llama.cpp, CTranslate2) without the peers: their rows in the report,
their absence as a note, and their jobs run against stand-in tools. Timings are never asserted."""

import json
import os
import stat
from pathlib import Path

import pytest

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.bench import ct2_worker, peers
from gptexport.bench import report as render
from gptexport.bench import run as bench


def row(runtime, weights, b1, b8, prefill, ms900):
    return {"runtime": runtime, "weights": weights, "device": "cpu", "weight_bytes_per_token": None,
            "by_batch": {"1": {"decode_tok_s": b1, "prefill_tok_s": prefill, "ttft_ms": 10.0, "peak_rss_mb": 100.0},
                         "8": {"decode_tok_s": b8, "prefill_tok_s": prefill, "ttft_ms": 20.0, "peak_rss_mb": 100.0}},
            "ms_per_token_at": {"64": ms900 / 2, "900": ms900}, "note": ""}


def synthetic(rounds):
    """A report of rounds: each round a list of rows (ours fp32/int8/int4, llama.cpp, CTranslate2)."""
    per_round = [{"memory_bandwidth_bytes_s": {"copy": 40e9, "read": 20e9}, "results": rows} for rows in rounds]
    n = len(rounds[0])
    results = [{**bench._medians([r[i] for r in rounds]), "bands": bench._bands([r[i] for r in rounds])}
               for i in range(n)]
    return {"config": {"batches": [1, 8], "contexts": [64, 900], "threads": 2}, "model": {"n_layer": 12, "n_embd": 768},
            "memory_bandwidth_bytes_s": {"copy": 40e9, "read": 20e9}, "notes": [], "machine": {"cpu": "test cpu"},
            "results": results, "rounds": per_round}


def a_round(ours_fp32, llama_f32):
    return [row("gptexport-ort", "fp32", ours_fp32, 200.0, 400.0, 20.0),
            row("gptexport-ort", "int8", 100.0, 300.0, 600.0, 10.0),
            row("gptexport-ort", "int4", 120.0, 320.0, 550.0, 9.0),
            row("llama.cpp", "f32", llama_f32, 100.0, 800.0, 25.0), row("llama.cpp", "q8_0", 80.0, 200.0, 900.0, 12.0),
            row("llama.cpp", "q4_0", 150.0, 400.0, 1000.0, 8.0),
            row("CTranslate2", "fp32", 40.0, 160.0, 300.0, 30.0), row("CTranslate2", "int8", 50.0, 150.0, 500.0, 15.0)]


def test_peer_columns_pair_the_same_precision():
    report = synthetic([a_round(40.0, 50.0), a_round(44.0, 40.0), a_round(42.0, 42.0)])
    text = render.table(report)
    # fp32: ours 40/44/42 against llama.cpp f32 50/40/42 -> per-round ratios 0.80, 1.10, 1.00; CT2 fp32 40 -> 1.05
    assert "| gptexport-ort | fp32 | 42.0 (40.0–44.0) | – | – | 1.00× (0.80–1.10) | 1.05× (1.00–1.10) |" in text
    assert "| gptexport-ort | int8 | 100 | – | – | 1.25× | 2.00× |" in text  # q8_0 and CT2 int8
    assert "| gptexport-ort | int4 | 120 | – | – | 0.80× | – |" in text  # q4_0; CTranslate2 has no int4
    assert "| llama.cpp | q4_0 | 150 | – | – | – | – |" in text  # peers' own rows: no peer ratio
    # the table against the peers: decode B=1, B=8, prefill, decode at the longest context (1 / ms per token)
    assert "| gptexport-ort int8 | llama.cpp q8_0 | 100 / 80.0 = 1.25× | 300 / 200 = 1.50× | 600 / 900 = 0.67× | " \
           "100 / 83.3 = 1.20× |" in text
    assert "| gptexport-ort int4 | CTranslate2" not in text
    assert "median of the per-round ratios (3 rounds)" in text


def test_plot_shows_the_peers(tmp_path):
    report = synthetic([a_round(40.0, 50.0), a_round(44.0, 40.0)])
    render.plot(report, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_peers_are_skipped_with_the_reason(tiny_model_dir, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTEXPORT_PEERS", str(tmp_path / "empty"))
    md = load_model_dir(tiny_model_dir)
    runtimes, notes = bench._runtimes(tiny_model_dir, md, None, bench.BenchConfig(), ("fp32",), tmp_path)
    assert {r.name for r in runtimes} == {"gptexport-ort"}  # ONNX Runtime's own ops, and ours if built
    want = f"no {tmp_path / 'empty' / 'peers.json'} (run bash scripts/prepare_peers.sh)"
    assert f"llama.cpp skipped: {want}" in notes and f"CTranslate2 skipped: {want}" in notes
    runtimes, notes = bench._runtimes(tiny_model_dir, md, None, bench.BenchConfig(peers=False), ("fp32",), tmp_path)
    assert not any("skipped: no" in n and "peers.json" in n for n in notes)


def test_a_peer_with_a_tool_missing_is_skipped(tmp_path):
    (tmp_path / "peers.json").write_text(json.dumps({"llama-bench": "/nonexistent/llama-bench",
                                                     "ct2-transformers-converter": str(tmp_path),
                                                     "ct2-python": str(tmp_path)}))
    found, notes = peers.find_peers(tmp_path)
    assert set(found) == {"CTranslate2"}
    assert notes[0].startswith("llama.cpp skipped: llama-batched-bench, llama-quantize, convert_hf_to_gguf.py, "
                               "convert_hf_to_gguf-python not in ")


def test_llama_json_outputs_are_read():
    bench_out = json.dumps([{"n_prompt": 16, "n_gen": 0, "avg_ts": 500.0, "samples_ts": [490.0, 510.0, 700.0]},
                            {"n_prompt": 0, "n_gen": 128, "avg_ts": 90.0, "samples_ts": [80.0, 90.0, 95.0],
                             "build_commit": "abc", "type_k": "f16", "type_v": "f16"}])
    assert peers._llama_bench_rate(bench_out, "pp") == 510.0  # the median of the samples, not the mean
    assert peers._llama_bench_rate(bench_out, "tg") == 90.0
    batched = ('main: noise\n'
               '{"pp": 16, "tg": 128, "pl": 8, "t_pp": 0.2, "speed_pp": 640.0, "t_tg": 4.0, "speed_tg": 256.0}\n')
    assert peers.batched_bench_rows(batched)[0]["speed_tg"] == 256.0


def test_ct2_timing_is_the_difference_of_two_lengths():
    """TTFT = the time for 1 new token; decode = N tokens / (time for BASE + N - time for BASE)."""
    now = [0.0]
    calls = []

    def generate(n):  # 50 ms of prefill, 10 ms per token after the first
        calls.append(n)
        now[0] += 0.05 + 0.01 * (n - 1)

    m = ct2_worker.measure(generate, batch=8, prompt_tokens=16, new_tokens=256, base_tokens=16, repeats=3, budget_s=1e9,
                           clock=lambda: now[0])
    assert calls == [2] + [1, 16, 272] * 3  # a warm-up, then three rounds
    assert m["ttft_ms"] == pytest.approx(50.0) and m["prefill_tok_s"] == pytest.approx(8 * 16 / 0.05)
    assert m["ms_per_token"] == pytest.approx(10.0) and m["decode_tok_s"] == pytest.approx(800.0)


def _tool(path: Path, body: str) -> str:
    path.write_text("#!/usr/bin/env python3\nimport json, os, sys\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def fake_peers(tmp_path):
    """Stand-ins for every peer tool: they write the files the real ones write and print their formats."""
    d = tmp_path / "peers"
    d.mkdir()
    tools = {
        "convert_hf_to_gguf-python": _tool(d / "python",
                                           "open(sys.argv[sys.argv.index('--outfile') + 1], 'w').write('gguf')\n"),
        "convert_hf_to_gguf.py": str(d / "convert_hf_to_gguf.py"),
        "llama-quantize": _tool(d / "llama-quantize", "open(sys.argv[2], 'w').write(sys.argv[3])\n"),
        "llama-bench": _tool(d / "llama-bench", """
tests = []
p, n = int(sys.argv[sys.argv.index('-p') + 1]), int(sys.argv[sys.argv.index('-n') + 1])
if p: tests.append({"n_prompt": p, "n_gen": 0, "avg_ts": 400.0, "samples_ts": [400.0]})
if n: tests.append({"n_prompt": 0, "n_gen": n, "avg_ts": 80.0, "samples_ts": [80.0], "build_commit": "fake",
                   "type_k": "f16", "type_v": "f16"})
print(json.dumps(tests))
"""),
        "llama-batched-bench": _tool(d / "llama-batched-bench", """
for pl in sys.argv[sys.argv.index('-npl') + 1].split(','):
    print(json.dumps({"pl": int(pl), "t_pp": 0.1, "speed_pp": 1.0, "t_tg": 1.0, "speed_tg": 300.0}))
"""),
        "ct2-transformers-converter": _tool(d / "ct2-transformers-converter", """
out = sys.argv[sys.argv.index('--output_dir') + 1]
os.makedirs(out); open(os.path.join(out, 'model.bin'), 'w').write('ct2')
"""),
        "ct2-python": _tool(d / "ct2-python", """
job = json.loads(sys.argv[2])
print(json.dumps({"prefill_tok_s": 300.0, "decode_tok_s": 60.0 * job["batch"], "ttft_ms": 50.0, "ms_per_token": 16.0,
                  "runs": 1, "about": "fake ctranslate2"}))
"""),
    }
    (d / "convert_hf_to_gguf.py").write_text("")
    (d / "peers.json").write_text(json.dumps(tools))
    return d


def test_run_bench_with_stand_in_peers(tiny_model_dir, tmp_path, fake_peers, monkeypatch):
    monkeypatch.setattr(bench, "memory_bandwidth", lambda threads: {"copy": 1e10, "read": 1e10})  # not what is tested
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_text("")
    config = bench.BenchConfig(prompt_tokens=4, new_tokens=3, batches=(1, 2), contexts=(4,), context_new_tokens=2,
                               rounds=1, threads=1, max_others=None, peers_dir=str(fake_peers), hf_dir=str(hf))
    report = bench.run_bench(tiny_model_dir, None, config, ("fp32",), tmp_path / "work", progress=lambda m: None)
    rows = [(r["runtime"], r["weights"]) for r in report["results"] if r["runtime"] != "gptexport-ort"]
    assert rows == [("llama.cpp", "f32"), ("CTranslate2", "fp32")]  # our precisions only
    assert {r["weights"] for r in report["results"] if r["runtime"] == "gptexport-ort"} == {"fp32"}
    llama, ct2 = (next(r for r in report["results"] if r["runtime"] == name) for name in ("llama.cpp", "CTranslate2"))
    assert llama["by_batch"]["1"]["decode_tok_s"] == 80.0 and llama["by_batch"]["2"]["decode_tok_s"] == 300.0
    assert llama["ms_per_token_at"]["4"] == pytest.approx(12.5) and llama["note"].startswith("llama.cpp build fake")
    assert ct2["by_batch"]["2"]["decode_tok_s"] == 120.0
    assert all(r["by_batch"]["1"]["peak_rss_mb"] > 0 for r in report["results"])
    text = render.table(report)
    assert "| gptexport-ort (mask-graph attention) fp32 | llama.cpp f32 |" in text
    assert "| gptexport-ort (mask-graph attention) fp32 | CTranslate2 fp32 |" in text
    models = peers.models_dir(hf, tmp_path / "work")  # all made: q8_0 and q4_0 come from f32
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".log")) == [
        "ct2-fp32", "ct2-int8", "model-f32.gguf", "model-q4_0.gguf", "model-q8_0.gguf"]
    # cached: a second preparation converts nothing (the stand-in converter would fail on an existing dir)
    stamp = (models / "ct2-int8" / "model.bin").stat().st_mtime_ns
    peers.prepare_models("CTranslate2", json.loads((fake_peers / "peers.json").read_text()), hf, tmp_path / "work")
    assert (models / "ct2-int8" / "model.bin").stat().st_mtime_ns == stamp
    os.utime(hf / "model.safetensors")  # newer weights: remade
    peers.prepare_models("CTranslate2", json.loads((fake_peers / "peers.json").read_text()), hf, tmp_path / "work")
    assert (models / "ct2-int8" / "model.bin").stat().st_mtime_ns > stamp


@pytest.mark.skipif(not Path(peers.peers_dir(), "peers.json").is_file(), reason="peers not prepared")
def test_ct2_worker_runs_in_the_ct2_python():
    """With the peers prepared: the worker file loads under the CTranslate2 venv's python, which has
    no gptexport (no model is made here: that needs torch and the converter)."""
    found, _ = peers.find_peers()
    if "CTranslate2" not in found:
        pytest.skip("CTranslate2 not prepared")
    import subprocess

    code = f"import runpy; m = runpy.run_path({str(Path(ct2_worker.__file__))!r}); print(callable(m['measure']))"
    out = subprocess.run([found["CTranslate2"]["ct2-python"], "-c", code], capture_output=True, text=True, timeout=60,
                         check=False)  # the assert below shows its stderr
    assert out.stdout.strip() == "True", out.stderr


def test_batch1_decode_comes_from_the_amx_llama_bench_where_listed(tmp_path, fake_peers):
    """With llama-bench-amx in peers.json: prefill from llama-bench (-n 0), decode from the AMX one
    (-p 0, its only path that runs); contexts and batches stay on the build without AMX."""
    tools = json.loads((fake_peers / "peers.json").read_text())
    log = tmp_path / "calls.jsonl"
    tools["llama-bench-amx"] = _tool(fake_peers / "llama-bench-amx", f"""
open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')
print(json.dumps([{{"n_prompt": 0, "n_gen": 64, "avg_ts": 150.0, "samples_ts": [150.0], "build_commit": "amx"}}]))
""")
    (fake_peers / "peers.json").write_text(json.dumps(tools))
    found, _ = peers.find_peers(fake_peers)
    assert found["llama.cpp"]["llama-bench-amx"] == tools["llama-bench-amx"]
    job = {"runtime": "llama.cpp", "tools": found["llama.cpp"], "threads": 1, "batch": 1, "prompt_tokens": 16,
           "new_tokens": 64, "repeats": 2, "path": str(tmp_path / "m.gguf"), "weights": "q8_0"}
    m, cpu = peers.run_job(job)
    assert m["prefill_tok_s"] == 400.0 and m["decode_tok_s"] == 150.0  # 400 from the stand-in llama-bench
    assert "decode from the AMX build" in m["about"] and cpu >= 0
    argv = json.loads(log.read_text().splitlines()[0])
    assert argv[argv.index("-p") + 1] == "0" and argv[argv.index("-n") + 1] == "64"
    m, _ = peers.run_job({**job, "context": True, "prompt_tokens": 64})
    assert m["decode_tok_s"] == 80.0 and len(log.read_text().splitlines()) == 1  # not the AMX one
    os.chmod(tools["llama-bench-amx"], 0o644)  # not executable: not used
    assert "llama-bench-amx" not in peers.find_peers(fake_peers)[0]["llama.cpp"]
