"""The benchmark's plumbing: worker, weight bytes, table and plot. Timings are never asserted."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.bench import report as render
from gptexport.bench import run as bench

REPORT = {
    "config": {"batches": [1, 8], "contexts": [64, 900], "threads": 2},
    "model": {"n_layer": 12, "n_embd": 768},
    "memory_bandwidth_bytes_s": {"copy": 40e9, "read": 20e9}, "notes": ["transformers skipped: not installed"],
    "machine": {"cpu": "test cpu"},
    "results": [
        {"runtime": "gptexport-ort", "weights": "fp32", "weight_bytes_per_token": 400_000_000,
         "weight_bytes": 500_000_000,
         "by_batch": {"1": {"decode_tok_s": 90.0, "prefill_tok_s": 500.0, "ttft_ms": 30.0, "peak_rss_mb": 600.0},
                      "8": {"decode_tok_s": 500.0, "prefill_tok_s": 900.0, "ttft_ms": 140.0, "peak_rss_mb": 650.0}},
         "ms_per_token_at": {"64": 11.0, "900": 12.1}, "note": ""},
        {"runtime": "nanoGPT", "weights": "fp32", "weight_bytes_per_token": None,
         "by_batch": {"1": {"decode_tok_s": 9.0, "prefill_tok_s": 300.0, "ttft_ms": 50.0, "peak_rss_mb": 900.0}},
         "ms_per_token_at": {"64": 100.0, "900": 1000.0}, "note": ""},
    ],
}


def test_table_shows_ratios_and_the_floor():
    text = render.table(REPORT)
    assert "| gptexport-ort | fp32 | 90.0 | 10.0× | – | – | – | 0.90 | 1.80 |" in text  # no peers: – –
    assert "| 11.0 | 12.1 | 1.10 |" in text
    assert "copy 40.0 GB/s (read + write), read 20.0 GB/s" in text
    assert "fp32: 400 MB/token -> 100 tok/s (copy), 50 tok/s (read); peak RSS at batch 1 = 1.20× the 500 MB" in text
    assert "note: transformers skipped" in text


def test_plot_writes_a_png(tmp_path):
    render.plot(REPORT, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_weight_bytes_per_token_skips_gather_only_tables(tmp_path):
    w, wt = np.zeros((50, 8), np.float32), np.zeros((8, 50), np.float32)
    nodes = [helper.make_node("Gather", ["W", "i"], ["e"]), helper.make_node("MatMul", ["e", "Wt"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 50])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(wt, "Wt")])
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert bench.weight_bytes(path) == (w.nbytes + wt.nbytes, wt.nbytes)


def test_worker_measures_in_its_own_process(tiny_model_dir):
    job = {"runtime": "gptexport-ort", "path": str(tiny_model_dir), "threads": 1, "seed": 0, "repeats": 1,
           "budget_s": 10, "vocab_size": load_model_dir(tiny_model_dir).config.vocab_size, "batch": 2,
           "prompt_tokens": 3, "new_tokens": 4}
    m = bench.run_worker(job)
    assert set(m) == {"prefill_tok_s", "decode_tok_s", "ttft_ms", "ms_per_token", "runs", "peak_rss_mb", "others_cpu",
                      "graph_ids"}
    assert 0 <= m["others_cpu"] <= 1 and m["graph_ids"] == 0  # no CUDA graphs on the CPU
    assert 10 < m["peak_rss_mb"] < 2000


def test_memory_bandwidth_is_positive():
    bw = bench.memory_bandwidth(threads=2, megabytes=8, repeats=2)
    assert bw["copy"] > 0 and bw["read"] > 0


def test_medians_of_rounds():
    rounds = [{"a": 1.0, "b": {"x": 3}, "name": "ort", "n": None}, {"a": 5.0, "b": {"x": 1}, "name": "ort", "n": None},
              {"a": 2.0, "b": {"x": 2}, "name": "ort", "n": None}]
    assert bench._medians(rounds) == {"a": 2.0, "b": {"x": 2}, "name": "ort", "n": None}


def test_run_bench_on_a_tiny_model(tiny_model_dir, tiny_ckpt, tmp_path):
    """Every runtime, all figures present; the numbers themselves are not checked."""
    config = bench.BenchConfig(prompt_tokens=4, new_tokens=3, batches=(2,), contexts=(4, 15), context_new_tokens=2,
                               rounds=1, threads=1, max_others=None)  # no waiting for a quiet machine in tests
    report = bench.run_bench(tiny_model_dir, tiny_ckpt, config, ("fp32",), tmp_path, progress=lambda m: None)
    names = [r["runtime"] for r in report["results"]]
    ours = [r["variant"] for r in report["results"] if r["runtime"] == "gptexport-ort"]
    assert names[:len(ours) + 1] == ["gptexport-ort"] * len(ours) + ["nanoGPT"]
    assert ours[0] == "mask-graph attention" and set(ours) <= {"mask-graph attention", "our kernels"}
    assert set(report["memory_bandwidth_bytes_s"]) == {"copy", "read"}
    for r in report["results"]:
        assert set(r["by_batch"]) == {"2"} and set(r["ms_per_token_at"]) == {"4"}  # 15 + 2 > block_size 16
        assert "beyond block_size" in r["note"]
    assert "| gptexport-ort (mask-graph attention) | fp32 |" in render.table(report)
    assert set(report["results"][0]["bands"]["by_batch"]["2"]) >= {"decode_tok_s", "prefill_tok_s"}


def test_a_disturbed_job_runs_again(monkeypatch):
    """With max_others, a job during which other processes used the CPU is rerun; without, never."""
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(bench, "_cpu_seconds", lambda: (0.0, float(next(clock))))  # the machine is idle...
    runs = []

    def run_once(job):  # ...except during the first run, when others used 5 of its 10 CPU seconds
        runs.append(job)
        monkeypatch.setattr(bench, "_cpu_seconds", lambda: (5.0 if len(runs) == 1 else 0.0, float(next(clock))))
        return {"decode_tok_s": float(len(runs))}, 0.0

    monkeypatch.setattr(bench, "_run_once", run_once)
    monkeypatch.setattr(bench, "_wait_for_quiet", lambda max_busy: None)
    assert bench.run_worker({}, max_others=0.15)["decode_tok_s"] == 2.0 and len(runs) == 2
    runs.clear()
    assert bench.run_worker({})["others_cpu"] > 0.15 and len(runs) == 1


GPU_REPORT = {
    **REPORT,
    "results": REPORT["results"] + [
        {"runtime": "gptexport-ort-cuda", "weights": "fp16", "device": "cuda", "variant": "",
         "weight_bytes_per_token": None, "by_batch": {"1": {"decode_tok_s": 700.0}}, "ms_per_token_at": {}, "note": ""},
        {"runtime": "gptexport-ort-cuda", "weights": "fp16", "device": "cuda", "variant": "no CUDA graphs",
         "weight_bytes_per_token": None, "by_batch": {"1": {"decode_tok_s": 250.0}}, "ms_per_token_at": {}, "note": ""},
        {"runtime": "transformers-cuda", "weights": "fp16", "device": "cuda", "variant": "",
         "weight_bytes_per_token": None, "by_batch": {"1": {"decode_tok_s": 140.0}}, "ms_per_token_at": {}, "note": ""},
    ]}


def test_gpu_rows_compare_with_transformers_on_the_same_gpu():
    text = render.table(GPU_REPORT)
    assert "| gptexport-ort-cuda | fp16 | 700 | 77.8× | 5.0× | – | – |" in text
    assert "| gptexport-ort-cuda (no CUDA graphs) | fp16 | 250 | 27.8× | 1.8× |" in text
    assert text.count("MB/token") == 1  # the CPU's bandwidth floor is not a GPU row's


def test_gpu_backends_make_their_rows(tiny_model_dir, tiny_ckpt, tmp_path):
    """The rows `--backend ort-cuda --backend tensorrt --cuda-graphs both` asks for (not run here)."""
    md = load_model_dir(tiny_model_dir)
    config = bench.BenchConfig(backends=("ort-cuda", "tensorrt", "ort-tensorrt"), cuda_graphs=(True, False))
    runtimes, notes = bench._runtimes(tiny_model_dir, md, tiny_ckpt, config, ("fp32",), tmp_path)
    rows = [(r.name, r.variant, r.device, r.job.get("cuda_graphs")) for r in runtimes]
    assert rows[:5] == [("gptexport-ort-cuda", "", "cuda", True),
                        ("gptexport-ort-cuda", "no CUDA graphs", "cuda", False),
                        ("gptexport-tensorrt", "", "cuda", True),
                        ("gptexport-tensorrt", "no CUDA graphs", "cuda", False),
                        ("gptexport-ort-tensorrt", "", "cuda", True)]
    assert not any(r.name in ("gptexport-ort", "nanoGPT") for r in runtimes)  # no CPU rows unless asked
    assert notes  # transformers: not installed here, or torch without CUDA


def test_a_gpu_backend_that_cannot_run_stops_the_bench(tiny_model_dir):
    from click.testing import CliRunner

    from gptexport.cli import main

    result = CliRunner().invoke(main, ["bench", str(tiny_model_dir), "--backend", "ort-cuda", "--batch", "1",
                                       "--new-tokens", "2", "--context", "4", "--rounds", "1"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("error: bench worker gptexport-ort-cuda failed: ONNX Runtime")


def test_kernel_ratios_pair_rows_of_one_precision():
    """Ours ÷ ONNX Runtime's own ops per precision: int8's kernel row against int8's MatMulInteger row,
    never against int4's MatMulNBits (the bench of 2026-12-07 printed 0.73× so)."""
    def row(weights: str, variant: str, tok_s: float) -> dict:
        return {"runtime": "gptexport-ort", "weights": weights, "variant": variant,
                "by_batch": {"1": {"decode_tok_s": tok_s}}}

    report = {"results": [row("int8", "MatMulInteger", 88.9), row("int8", "our kernels", 106.0),
                          row("int4", "MatMulNBits", 145.0), row("int4", "our kernels", 161.0)],
              "machine": {"cpu_flags": "avx2 fma"}}
    lines = render.kernel_lines(report)
    assert lines == ["int4 decode, our kernels ÷ MatMulNBits: B=1 1.11× (CPU flags: avx2 fma)",
                     "int8 decode, our kernels ÷ MatMulInteger: B=1 1.19× (CPU flags: avx2 fma)"]
