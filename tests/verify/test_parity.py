"""`gptexport parity`: passes on a good export, and each check fails on the breakage it is for."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import write_tiny_checkpoint
from onnx import numpy_helper

from gptexport.artifacts.files import write_json_atomic
from gptexport.artifacts.modeldir import MANIFEST, file_records, load_model_dir
from gptexport.cli import main
from gptexport.config import GPTConfig
from gptexport.errors import BackendUnavailable, UsageError
from gptexport.runtime.backends.ort import OrtRunner
from gptexport.runtime.sampling import SamplingParams, logits_to_probs
from gptexport.verify.checks import backend_checks, generation_check, sampler_check, sampling_check
from gptexport.verify.golden import Outputs, Reference
from gptexport.verify.metrics import (
    error_stats,
    greedy_divergence,
    kl_divergence,
    needed_tolerance,
    sampled_divergence,
    top1_agreement,
    topk_overlap,
)
from gptexport.verify.parity import ParityOptions, resolve_prompts, run_parity
from gptexport.verify.reference import build_reference, nanogpt_probs
from gptexport.verify.tolerance import PRESETS, Tolerance, tolerance_for

FP32 = PRESETS["fp32"]
OPTIONS = ParityOptions(steps=20, backends="onnxruntime")  # 20 steps: the 15-token prompt passes block_size 16
QUICK = ParityOptions(steps=4, backends="onnxruntime")


def edited_model_dir(src: Path, dst: Path, edit) -> Path:
    """A copy of a model directory whose model.onnx `edit` changed, re-hashed so that it loads."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    edit(model.graph)
    onnx.save(model, str(dst / "model.onnx"))
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["files"] = file_records(dst)
    write_json_atomic(dst / MANIFEST, manifest)
    return dst


def perturb_one_weight(graph) -> None:
    """+0.05 on one weight of the output projection (n_embd, vocab).

    One weight, not a whole initializer: every matrix of a freshly initialised GPT is applied to
    a LayerNorm output (zero mean, unit weight) or feeds one, so a constant added to all of it
    cancels exactly and the export would still be right.
    """
    init = max((i for i in graph.initializer if len(i.dims) == 2), key=lambda i: i.dims[1])
    w = numpy_helper.to_array(init).copy()
    w[0, 0] += 0.05
    init.CopyFrom(numpy_helper.from_array(w, init.name))


def remove_attention_mask(graph) -> None:
    """Drop the Where of masked_fill: every position then sees every key, the future included."""
    inits = {i.name for i in graph.initializer}
    wheres = [n for n in graph.node if n.op_type == "Where"]
    assert wheres, "no masked_fill in the graph"
    for where in wheres:
        scores = where.input[2] if where.input[1] in inits else where.input[1]
        for node in graph.node:
            for j, name in enumerate(node.input):
                if name == where.output[0]:
                    node.input[j] = scores
        graph.node.remove(where)


@pytest.fixture(scope="module")
def perturbed_dir(tiny_model_dir, tmp_path_factory):
    return edited_model_dir(tiny_model_dir, tmp_path_factory.mktemp("perturbed") / "m", perturb_one_weight)


@pytest.fixture(scope="module")
def unmasked_dir(tiny_model_dir, tmp_path_factory):
    return edited_model_dir(tiny_model_dir, tmp_path_factory.mktemp("unmasked") / "m", remove_attention_mask)


def failed(report) -> set[str]:
    return {c.name for c in report.failures()}


# ---- the whole run on real (tiny) exports ----------------------------------------------------------

def test_passes_on_a_good_export(tiny_ckpt, tiny_model_dir):
    report = run_parity(tiny_model_dir, tiny_ckpt, options=OPTIONS)
    assert report, report.table()
    assert [c.name for c in report.checks] == ["sampler", "forward", "generation", "sampling", "cache", "batched"]
    rows = report.checks[-1].details["rows"]
    assert len(rows) == 4 and all(r["ok"] and r["identical_to_alone"] for r in rows)  # 3 prompts and the probe
    forward = report.checks[1].details
    assert forward["max_abs"] < 1e-5 and forward["top1_agreement"] == 1.0 and forward["kl_max"] < 1e-9
    assert len(forward["per_position"]["max_abs"]) == forward["positions"]
    assert report.checks[-2].details["steps_past_block_size"] > 0  # the crop is covered


class CorruptingRunner(OrtRunner):
    """Adds noise to row 0's newest cache position at the first decode step of two rows or more (a
    decode's, or a mixed step's: BatchCache.mixed): a broken row write, as a wrong copy plan or row
    move would make it. Only the batched check runs several rows at once."""

    def new_batch_cache(self, rows: int, capacity: int):
        cache = super().new_batch_cache(rows, capacity)
        c, done = self.config, []

        def corrupting(forward):
            def run(ids, *chunks):
                logits = forward(ids, *chunks)
                if len(ids) >= 2 and not done:
                    done.append(True)
                    for name in self.spec.past_names:
                        shape = (rows, c.n_head, cache.capacity, c.head_dim)
                        cache.memory.view(cache.past[name], shape, np.float32)[0, :, cache.lengths[0] - 1] += 1.0
                return logits
            return run
        cache.decode, cache.mixed = corrupting(cache.decode), corrupting(cache.mixed)
        return cache


def test_a_broken_row_write_fails_batched_and_no_other_row(tiny_ckpt, tiny_model_dir):
    md = load_model_dir(tiny_model_dir)
    ref = build_reference(tiny_ckpt, resolve_prompts(None, md), 20, SamplingParams(0.0), 0)
    with CorruptingRunner(md) as runner:
        checks = backend_checks("onnxruntime", runner, ref, FP32)
    assert {c.name: c.ok for c in checks} == {"forward": True, "generation": True, "sampling": True, "cache": True,
                                              "batched": False}
    rows = checks[-1].details["rows"]
    assert sorted(r["ok"] for r in rows) == [False, True, True, True], rows
    assert "1/4 rows wrong" in checks[-1].figure


def test_model_dir_from_another_checkpoint_fails_forward(tiny_model_dir, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "other" / "ckpt.pt", seed=1)
    report = run_parity(tiny_model_dir, other, options=QUICK)
    assert not report and "forward" in failed(report)
    assert "NOT OK: failed forward (onnxruntime)" in report.table()


def test_one_perturbed_weight_fails_forward(tiny_ckpt, perturbed_dir):
    report = run_parity(perturbed_dir, tiny_ckpt, options=QUICK)
    assert not report and "forward" in failed(report)
    assert report.checks[1].details["needed_atol"] > FP32.atol


def test_removed_causal_mask_fails_forward_and_cache(tiny_ckpt, unmasked_dir):
    report = run_parity(unmasked_dir, tiny_ckpt, options=OPTIONS)
    assert {"forward", "cache"} <= failed(report)


def test_default_tolerance_is_the_model_directorys_precision(tiny_ckpt, tiny_model_dir, tmp_path):
    quantized = tmp_path / "m"
    shutil.copytree(tiny_model_dir, quantized)
    manifest = json.loads((quantized / MANIFEST).read_text())
    write_json_atomic(quantized / MANIFEST, {**manifest, "quantization": "int8"})  # as `gptexport quantize` writes
    report = run_parity(quantized, tiny_ckpt, options=ParityOptions(steps=2, backends="onnxruntime"))
    assert report.tolerance == PRESETS["int8"] and report


def test_no_backend_that_can_run_is_a_failure(tiny_ckpt, tiny_model_dir, monkeypatch):
    def unavailable(name, md, threads=None, **options):
        raise BackendUnavailable(f"{name}: no GPU here")

    monkeypatch.setattr("gptexport.verify.parity.open_runner", unavailable)
    report = run_parity(tiny_model_dir, tiny_ckpt, options=ParityOptions(steps=2, backends="all"))
    assert not report and set(report.skipped) == {"onnxruntime", "ort-cuda", "ort-tensorrt", "tensorrt"}
    assert "no backend could run" in report.verdict()
    assert "skipped  onnxruntime: no GPU here" in report.table()


# ---- each check's verdict on crafted numbers ---------------------------------------------------

def wrong_top_k(logits, temperature, top_k, top_p):
    """A sampler that keeps exactly k tokens, dropping ties at the k-th value (nanoGPT keeps them)."""
    logits = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        drop = np.argsort(-logits, axis=-1, kind="stable")[:, top_k:]
        np.put_along_axis(logits, drop, -np.inf, axis=-1)
    return logits_to_probs(logits, 1.0, None, top_p)


def test_sampler_check_fails_with_a_wrong_probability_function():
    rng = np.random.default_rng(0)
    logits = np.round(rng.standard_normal((6, 40)) * 2) / 2  # a 0.5 grid: ties at the k-th value
    probes = [(1.0, None, None), (0.7, 5, None), (1.3, 10, 0.8)]
    want = [nanogpt_probs(logits, *p) for p in probes]
    assert sampler_check(logits, probes, want).ok
    bad = sampler_check(logits, probes, want, probs_fn=wrong_top_k)
    assert not bad.ok and bad.details["max_abs_error"] > 1e-3
    assert bad.details["probes"][0]["max_abs_error"] < 1e-6  # no top-k: the same


def test_top_p_over_thousands_of_tied_tokens_matches_torch():
    """A near-flat distribution, as from a freshly initialised GPT-2: the top-p cut falls inside a tie."""
    logits = np.round(np.random.default_rng(0).standard_normal((4, 50304)) * 0.3 / 0.25) * 0.25
    probes = [(1.0, None, 0.5), (1.3, 40, 0.9), (0.8, 200, 0.95)]
    assert sampler_check(logits, probes, [nanogpt_probs(logits, *p) for p in probes]).ok


def test_greedy_divergence_at_a_near_tie_is_excused_a_real_one_fails():
    ref_tokens, got_tokens = np.array([1, 2, 3]), np.array([1, 2, 4])
    logits = np.zeros((3, 6))
    logits[2, 3], logits[2, 4] = 5.0, 5.0 - 1e-5  # within 2 * (1e-4 + 1e-3 * 5)
    tie = greedy_divergence(ref_tokens, got_tokens, logits, FP32)
    assert (tie.step, tie.ref_token, tie.got_token, tie.excused) == (2, 3, 4, True)
    logits[2, 4] = 3.0
    real = greedy_divergence(ref_tokens, got_tokens, logits, FP32)
    assert not real.excused and real.gap == pytest.approx(2.0)
    assert greedy_divergence(ref_tokens, ref_tokens, logits, FP32) is None

    ref = Reference(GPTConfig(block_size=16, vocab_size=6, n_layer=1, n_head=1, n_embd=4), "crafted",
                    [np.array([0])], 3, {"temperature": 1.0, "top_k": None, "top_p": None}, 0,
                    outputs=Outputs(greedy_tokens=[ref_tokens], greedy_logits=[logits]))
    check = generation_check("x", ref, Outputs(greedy_tokens=[got_tokens]), FP32)
    assert not check.ok and "prompt 0 diverged at step 2: token 4, reference 3" in check.figure
    logits[2, 4] = 5.0 - 1e-5
    check = generation_check("x", ref, Outputs(greedy_tokens=[got_tokens]), FP32)
    assert check.ok and "near-tie at step 2" in check.figure


def test_sampled_divergence_is_excused_only_with_logits_within_tolerance():
    ref_logits = np.zeros((2, 5))
    close, far = ref_logits + 1e-6, ref_logits + np.array([0, 0, 0, 0, 1.0])
    assert sampled_divergence([1, 2], [1, 3], ref_logits, close, FP32).excused
    assert not sampled_divergence([1, 2], [1, 3], ref_logits, far, FP32).excused

    ref = Reference(GPTConfig(block_size=16, vocab_size=5, n_layer=1, n_head=1, n_embd=4), "crafted",
                    [np.array([0])], 2, {"temperature": 1.0, "top_k": None, "top_p": None}, 0,
                    outputs=Outputs(sampled_tokens=[np.array([1, 2])], sampled_logits=[ref_logits]))
    got = Outputs(sampled_tokens=[np.array([1, 3])], sampled_logits=[far])
    check = sampling_check("x", ref, got, FP32)
    assert not check.ok and "prompt 0 diverged at step 1: token 3, reference 2 (logits off by 1.00e+00)" in check.figure
    assert sampling_check("x", ref, Outputs(sampled_tokens=[np.array([1, 3])], sampled_logits=[close]), FP32).ok


# ---- the comparison math -------------------------------------------------------------------------

def test_error_stats_and_needed_tolerance():
    ref = np.array([[1.0, -2.0, 10.0, 0.0]])
    got = ref + np.array([[0.06, 0.0, -0.5, 0.0]])
    s = error_stats(ref, got)
    assert s["max_abs"] == pytest.approx(0.5) and s["mean_abs"] == pytest.approx(0.14)
    assert s["max_rel"] == pytest.approx(0.06)
    atol, rtol = needed_tolerance(ref, got, Tolerance("t", atol=0.05, rtol=0.01))
    assert atol == pytest.approx(0.5 - 0.1) and rtol == pytest.approx((0.5 - 0.05) / 10)
    assert needed_tolerance(ref, ref, FP32) == (0.0, 0.0)


def test_top1_topk_and_kl():
    ref = np.array([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0 - 1e-5, 0.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    got = np.array([[3.0, 1.0, 2.0, 0.0], [1.0 - 2e-5, 1.0, 0.0, -1.0], [0.0, 5.0, 0.0, 0.0]])
    assert top1_agreement(ref, got, FP32) == (1, 1)  # row 1 swaps at a near-tie, row 2 for real
    assert topk_overlap(ref, ref, 2) == 1.0 and topk_overlap(ref[:1], -ref[:1], 2) == 0.0
    p = logits_to_probs(ref)
    assert np.allclose(kl_divergence(p, p), 0) and (kl_divergence(p, logits_to_probs(got))[2] > 1)


def test_tolerance_presets_and_overrides():
    assert tolerance_for("fp16") == PRESETS["fp16"]
    assert tolerance_for("fp32", "int8").min_top1 < 1
    custom = tolerance_for("fp32", atol=1e-3)
    assert (custom.atol, custom.rtol) == (1e-3, FP32.rtol)
    for kwargs in (dict(preset="fp64"), dict(preset="fp16", atol=1.0), dict(rtol=-1.0)):
        with pytest.raises(UsageError):
            tolerance_for("fp32", **kwargs)


# ---- the command ---------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(main, ["parity", *map(str, args)])


def test_cli_passes_with_json_and_plot(tiny_ckpt, tiny_model_dir, tmp_path):
    r = invoke(tiny_ckpt, tiny_model_dir, "--backends", "onnxruntime", "--steps", 20, "--prompt", "To be",
               "--prompt", "Hi", "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png")
    assert r.exit_code == 0, r.output
    assert "onnxruntime  forward" in r.stdout and r.stdout.rstrip().splitlines()[-1].startswith("OK:")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["passed"] and doc["tolerance"]["name"] == "fp32" and len(doc["settings"]["prompts"]) == 2
    forward = next(c for c in doc["checks"] if c["name"] == "forward")
    for key in ("max_abs", "mean_abs", "p99_abs", "max_rel", "needed_atol", "needed_rtol", "top1_agreement",
                "topk_overlap", "kl_mean", "kl_max"):
        assert isinstance(forward["details"][key], float), key
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_exits_1_naming_the_failed_check(tiny_ckpt, perturbed_dir):
    r = invoke(tiny_ckpt, perturbed_dir, "--backends", "onnxruntime", "--steps", 4)
    assert r.exit_code == 1 and "NOT OK: failed forward (onnxruntime)" in r.stdout


@pytest.mark.parametrize("args", [
    ["{md}"],  # CKPT missing
    ["{ckpt}", "{md}", "--tolerance", "fp32", "--atol", "1"],
    ["{ckpt}", "{md}", "--backends", "nope"],
    ["{ckpt}", "{md}", "--prompt", "a", "--prompt-tokens", "1,2"],
    ["{ckpt}", "{md}", "--steps", "0"],
    ["--golden", "g.npz", "{md}", "--steps", "3"],
    ["--golden", "g.npz", "{ckpt}", "{md}"],
])
def test_cli_usage_errors_exit_2(tiny_ckpt, tiny_model_dir, args):
    r = invoke(*[a.format(ckpt=tiny_ckpt, md=tiny_model_dir) for a in args])
    assert r.exit_code == 2 and r.stderr.startswith("error: "), r.output


# ---- golden files: no torch needed -----------------------------------------------------------------

def run_without_torch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """A Python process in which `import torch` raises ImportError (a sitecustomize blocks it)."""
    block = tmp_path / "no_torch"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_golden_file_checks_backends_where_torch_cannot_be_imported(tiny_ckpt, tiny_model_dir, perturbed_dir,
                                                                      tmp_path):
    golden = tmp_path / "golden.npz"
    r = invoke(tiny_ckpt, tiny_model_dir, "--backends", "onnxruntime", "--steps", 20, "--save-golden", golden)
    assert r.exit_code == 0 and golden.is_file(), r.output
    blocked = run_without_torch(tmp_path, "-c", "try:\n import torch\nexcept ImportError:\n raise SystemExit(3)")
    assert blocked.returncode == 3, blocked.stderr
    cmd = ["-m", "gptexport", "parity", "--golden", str(golden), "--backends", "onnxruntime"]
    good = run_without_torch(tmp_path, *cmd, str(tiny_model_dir))
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.splitlines()[:6] == r.stdout.splitlines()[:6]  # the same numbers as with torch
    bad = run_without_torch(tmp_path, *cmd, str(perturbed_dir))
    assert bad.returncode == 1 and "failed forward (onnxruntime)" in bad.stdout


def test_not_a_golden_file_is_one_line_error(tiny_model_dir, tmp_path):
    (tmp_path / "g.npz").write_bytes(b"not a zip")
    r = invoke("--golden", tmp_path / "g.npz", tiny_model_dir)
    assert r.exit_code == 1 and "not a gptexport golden file" in r.stderr and len(r.stderr.splitlines()) == 1


def test_tf32_holds_an_fp32_directory_to_the_tf32_preset(tiny_ckpt, tiny_model_dir):
    """--tf32 changes ort-cuda's math only; the CPU provider runs as ever, under the looser preset."""
    report = run_parity(tiny_model_dir, tiny_ckpt, options=ParityOptions(steps=2, backends="onnxruntime", tf32=True))
    assert report and report.tolerance.name == "tf32" and report.settings["tf32"] is True
    assert (report.tolerance.atol, report.tolerance.rtol) == (5e-2, 5e-3)  # provisional: fp16's bounds
