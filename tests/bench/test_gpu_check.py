"""scripts/gpu_check.py, made as likely as possible to work on its first GPU run: its whole pipeline
runs here in a dry run (the CPU provider, a tiny model), and its verdict logic is checked directly."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_one_table_and_one_json(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--cpu-dry-run", "--work", str(tmp_path),
                           "--dtypes", "fp32", "--decode-tokens", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["dry_run"]
    steps = [(s["step"], s["ok"]) for s in report["steps"]]
    assert steps[:6] == [("environment", True), ("convert", True), ("parity onnxruntime", True), ("tf32", True),
                         ("speed graphs", True), ("speed no graphs", True)]
    parity = report["steps"][2]
    assert parity["data"]["needed_atol"] is not None and parity["figure"].startswith("max|d| ")
    assert report["steps"][3]["data"]["tolerance"]["name"] == "tf32"
    assert report["steps"][4]["data"]["ms_per_token"] > 0
    batched = {s["step"]: s for s in report["steps"] if s["step"].startswith("speed batched")}
    assert sorted(batched) == sorted(f"speed batched B={b}{g}" for b in (1, 3, 4, 16) for g in ("", " no graphs"))
    assert all(s["ok"] and s["data"]["decode_tok_s"] > 0 for s in batched.values())
    grows = next(s for s in report["steps"] if s["step"] == "speed grows B=4")
    assert grows["ok"] and grows["data"]["decode_tok_s"] > 0 and grows["data"]["graph_ids"] == 0  # no graphs on the CPU
    table = proc.stdout[proc.stdout.index("=== gpu_check: OK"):]
    assert "result  step" in table and re.search(r"\nok +parity onnxruntime +tiny ", table)


def test_targets_and_the_verdict(tmp_path):
    gpu_check = _script()
    chk = gpu_check.GpuCheck(tmp_path, dry_run=False)
    gpu_check.targets(chk, {"graphs": 1.4, "transformers": 7.1}, "gpt2-small", "fp16")
    assert chk.steps[-1].ok and "5.07x transformers" in chk.steps[-1].figure and chk.ok
    gpu_check.targets(chk, {"graphs": 2.5, "transformers": 9.0}, "gpt2-small", "fp16")
    assert chk.steps[-1].ok is False and not chk.ok  # 2.5 ms/token misses the 2.0 target
    chk = gpu_check.GpuCheck(tmp_path, dry_run=False)
    gpu_check.targets(chk, {"graphs": 1.4}, "gpt2-small", "fp16")
    assert chk.steps[-1].ok is False  # no transformers baseline: the target is not met, not skipped
    dry = gpu_check.GpuCheck(tmp_path, dry_run=True)
    gpu_check.targets(dry, {"graphs": 9.0, "transformers": 1.0}, "tiny", "fp16")
    assert dry.steps[-1].ok is None and dry.ok  # a dry run reports, never judges speed
    assert "skip    targets" in gpu_check.table(dry.steps)


def test_a_failed_command_is_a_failed_row(tmp_path):
    gpu_check = _script()
    chk = gpu_check.GpuCheck(tmp_path, dry_run=True)
    step = chk.command("convert", [sys.executable, "-c", "import sys; sys.exit(3)"], "tiny", "fp32")
    assert step.ok is False and step.figure == "failed (its output is above)" and not chk.ok
