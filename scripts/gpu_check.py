"""The whole GPU check, one command: an NVIDIA GPU with onnxruntime-gpu and cuda-python; TensorRT optional.

Installs nothing and downloads nothing. From the repository root, in the environment gptexport is
installed in (with torch for convert and the reference; torch with CUDA for the transformers baseline):

    python scripts/gpu_check.py [--work DIR] [--only shakespeare|gpt2-small] [--skip-tests]
    python scripts/gpu_check.py --cpu-dry-run --work DIR      # the same steps on the CPU provider, a tiny model

Steps, each one row of the table printed at the end and one entry of WORK/gpu_check.json:
  environment  GPU, onnxruntime and its providers, cuda-python, torch (CUDA?), TensorRT (importable?)
  gpu tests    pytest -m gpu: the pointer-binding path on the CUDA provider, TensorRT engines if importable
  for the shipped model and a GPT-2-small-shaped random checkpoint, in fp32 and fp16:
    convert    gptexport convert CKPT -o OUT --dtype D
    parity     gptexport parity CKPT OUT --backends ort-cuda --tolerance D (fp32: TF32 off)
    tf32       fp32 only: the same with --tf32 against the provisional tf32 preset; records the
               atol/rtol TF32 needed, which is what the preset should be set from
  speed        GPT-2-small, batch 1, greedy decode ms/token: ort-cuda with CUDA graphs, without, and
               transformers' eager generate on the same GPU, in one run (gptexport's bench workers)
               and the scheduler's batched decode: tokens/s with 1, 4 and 16 sequences in flight, with
               and without CUDA graphs (one graph per power-of-two bucket of rows)
  targets      fp16 with CUDA graphs <= 2.0 ms/token, and >= 3x transformers fp16
  tensorrt     when TensorRT imports: check, build, parity --backends tensorrt, decode speed
It exits 0 only if every step passed. Each GPU step runs in a subprocess with a time limit, so a
crash or hang is a failed row, not a lost report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "shakespeare-char" / "ckpt.pt"
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True, dropout=0.0)
TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=256, bias=True, dropout=0.0)
GPT2_PROMPTS = ["464,3616,286,1204,318", "50256"]  # token ids: the random model has no tokenizer worth using
TARGET_MS_PER_TOKEN = 2.0  # GPT-2-small fp16, batch 1, CUDA graphs
TARGET_VS_TRANSFORMERS = 3.0
STEP_TIMEOUT_S = 300
BATCHED_ROWS = (1, 3, 4, 16)  # sequences in flight in the scheduler's batched decode rows (3: not a power of two)
GROW_ROWS = 4  # the row whose cache grows in every run


@dataclass
class Step:
    """One row: what ran, on which model and dtype, whether it passed (None: skipped), its figure."""

    step: str
    model: str = ""
    dtype: str = ""
    ok: bool | None = None
    seconds: float = 0.0
    figure: str = ""
    data: dict = field(default_factory=dict)


class GpuCheck:
    def __init__(self, work: Path, dry_run: bool):
        self.work, self.dry_run, self.steps = work, dry_run, []
        self.backend = "onnxruntime" if dry_run else "ort-cuda"  # what "ort-cuda" steps run on

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[step.ok]
        print(f"--- {mark} {step.step} {step.model} {step.dtype}: {step.figure}", flush=True)
        return step

    def command(self, name: str, cmd: list[str], model: str = "", dtype: str = "", record: bool = True) -> Step:
        """Run a command (output streamed): a failed row if it fails or runs past the time limit."""
        print(f"\n=== {name} {model} {dtype}: {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        try:
            ok = subprocess.run(cmd, cwd=ROOT, timeout=STEP_TIMEOUT_S, check=False).returncode == 0
            why = "" if ok else "failed (its output is above)"
        except subprocess.TimeoutExpired:
            ok, why = False, f"ran past {STEP_TIMEOUT_S} s"
        step = Step(name, model, dtype, ok, round(time.perf_counter() - t, 1), why)
        return self.add(step) if record else step

    @property
    def ok(self) -> bool:
        return all(s.ok is not False for s in self.steps)


def gptexport(*args: str) -> list[str]:
    return [sys.executable, "-m", "gptexport", *args]


# ---- the steps ------------------------------------------------------------------------------------

def environment(chk: GpuCheck) -> dict:
    """What this machine has; the GPU and ONNX Runtime's CUDA provider are required (not in a dry run)."""
    env: dict = {"python": sys.version.split()[0]}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    try:
        from gptexport.runtime.backends.device import current_device, import_cudart

        device = current_device(import_cudart())
        env["gpu"] = f"{device.name} (compute capability {device.compute_capability})"
    except Exception as e:  # BackendUnavailable: no cuda-python, no driver, no GPU
        env["gpu"], env["gpu_error"] = None, str(e)
    env["torch"] = _probe("import torch; print(torch.__version__, torch.cuda.is_available())")
    env["torch_cuda"] = bool(env["torch"]) and env["torch"].endswith("True")
    env["transformers"] = importlib.util.find_spec("transformers") is not None
    env["tensorrt"] = _probe("import tensorrt; print(tensorrt.__version__)")
    ready = chk.dry_run or (env["gpu"] is not None and "CUDAExecutionProvider" in env.get("providers", []))
    figure = (f"{env['gpu'] or 'no GPU (' + env.get('gpu_error', '?') + ')'}; onnxruntime {env['onnxruntime']} "
              f"({', '.join(env.get('providers', []))}); torch {env['torch']}; "
              f"TensorRT {env['tensorrt'] or 'not importable'}")
    chk.add(Step("environment", ok=ready, figure=("dry run on the CPU: " if chk.dry_run else "") + figure, data=env))
    return env


def _probe(code: str) -> str | None:
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def write_checkpoint(path: Path, args: dict, seed: int = 0) -> Path:
    """A random GPT of this shape, saved as nanoGPT's train.py does (made once per work directory)."""
    if path.exists():
        return path
    import torch

    from gptexport.config import GPTConfig
    from gptexport.convert.model import GPT

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "optimizer": None,
                "iter_num": 0, "best_val_loss": 10.0, "config": {"dataset": "openwebtext"}}, path)
    return path


def parity(chk: GpuCheck, model: str, ckpt: Path, out: Path, dtype: str, backend: str, prompts: list[str],
           tf32: bool = False) -> Step:
    """`gptexport parity` on one backend; the row's figure is its forward check's."""
    report = out / f"parity-{backend}{'-tf32' if tf32 else ''}.json"
    tolerance = "tf32" if tf32 else dtype
    # the PyTorch reference (on the CPU, the slow part) is built once per model and kept as a golden file
    golden = chk.work / f"{model}.golden.npz"
    reference = (["--golden", str(golden), str(out)] if golden.is_file() else
                 [str(ckpt), str(out), "--save-golden", str(golden),
                  *[a for p in prompts for a in ("--prompt-tokens", p)]])
    cmd = gptexport("parity", *reference, "--backends", backend, "--tolerance", tolerance, "--json", str(report),
                    *(["--tf32"] if tf32 else []))
    step = chk.command("tf32" if tf32 else f"parity {backend}", cmd, model, dtype, record=False)
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return chk.add(step)
    forward = next((c for c in data["checks"] if c["name"] == "forward"), None)
    failed = [f"{c['name']}: {c['figure']}" for c in data["checks"] if not c["ok"]]
    step.figure = ((forward["figure"] if forward else data["verdict"])
                   + (f"; NOT OK {'; '.join(failed)}" if failed else ""))
    step.data = {"verdict": data["verdict"], "tolerance": data["tolerance"],
                 "needed_atol": forward and forward["details"]["needed_atol"],
                 "needed_rtol": forward and forward["details"]["needed_rtol"],
                 "max_abs": forward and forward["details"]["max_abs"]}
    return chk.add(step)


def speed(chk: GpuCheck, env: dict, model: str, ckpt: Path, out: Path, dtype: str, decode_tokens: int) -> dict:
    """Decode ms/token, batch 1: our backend with and without CUDA graphs, transformers on the same
    device, each in a bench worker process, one after another in this run."""
    from gptexport.artifacts.modeldir import load_model_dir
    from gptexport.bench.run import run_worker

    backend = "gptexport-ort" if chk.dry_run else "gptexport-ort-cuda"
    device = "cpu" if chk.dry_run else "cuda"
    base = {"path": str(out), "threads": os.cpu_count() or 1, "seed": 0, "repeats": 3, "budget_s": 60,
            "vocab_size": load_model_dir(out, verify=False).config.vocab_size, "batch": 1, "prompt_tokens": 16,
            "new_tokens": decode_tokens, "device": device}
    jobs = {"graphs": {**base, "runtime": backend, "cuda_graphs": True},
            "no graphs": {**base, "runtime": backend, "cuda_graphs": False}}
    if env["transformers"] and (env["torch_cuda"] or chk.dry_run):
        jobs["transformers"] = {**base, "runtime": "transformers-cuda" if not chk.dry_run else "transformers",
                                "path": str(ckpt), "dtype": dtype}

    def measured(name: str, job: dict, figure) -> dict | None:
        """One worker run as a step of the table: figure(m) on success, the worker's error otherwise."""
        t = time.perf_counter()
        try:
            m = run_worker(job)
        except Exception as e:  # the worker failed (its last line is in the message)
            chk.add(Step(f"speed {name}", model, dtype, False, round(time.perf_counter() - t, 1), str(e)))
            return None
        chk.add(Step(f"speed {name}", model, dtype, True, round(time.perf_counter() - t, 1), figure(m), m))
        return m

    ms = {}
    for name, job in jobs.items():
        m = measured(name, job, lambda m: f"{m['ms_per_token']:.3f} ms/token decode, TTFT {m['ttft_ms']:.1f} ms")
        if m is not None:
            ms[name] = m["ms_per_token"]
    for rows in BATCHED_ROWS:  # the scheduler: B sequences in one forward per step, CUDA graphs per bucket
        for graphs in (True, False):
            job = {**base, "runtime": backend, "cuda_graphs": graphs, "batch": rows}
            measured(f"batched B={rows}{'' if graphs else ' no graphs'}", job,
                     lambda m, rows=rows: f"{m['decode_tok_s']:.0f} tok/s decode ({rows} sequences), "
                                          f"{m['ms_per_token']:.3f} ms/step")
    grows(chk, base, backend, model, dtype)
    if "transformers" not in jobs:
        chk.add(Step("speed transformers", model, dtype, None if chk.dry_run else False,
                     figure="not run: transformers, or torch with CUDA, is not installed here"))
    return ms


def grows(chk: GpuCheck, base: dict, backend: str, model: str, dtype: str) -> Step:
    """A long-running scheduler whose cache grows in every run (the first row is admitted after the
    others, with a longer reach) and is closed after it: the decode graphs the runner keeps must stay
    within (buckets of the rows) x (capacities 64, 128, ... block_size), however many runs."""
    from gptexport.artifacts.modeldir import load_model_dir
    from gptexport.bench.run import run_worker
    from gptexport.runtime.backends.buckets import graph_bucket

    job = {**base, "runtime": backend, "cuda_graphs": True, "grow": True, "batch": GROW_ROWS,
           "repeats": 5}
    block = load_model_dir(base["path"], verify=False).config.block_size
    bound = len({graph_bucket(n, GROW_ROWS) for n in range(1, GROW_ROWS + 1)}) * (max(block // 64, 1).bit_length() + 1)
    t = time.perf_counter()
    try:
        m = run_worker(job)
    except Exception as e:
        return chk.add(Step(f"speed grows B={GROW_ROWS}", model, dtype, False, round(time.perf_counter() - t, 1),
                            str(e)))
    return chk.add(Step(f"speed grows B={GROW_ROWS}", model, dtype, m["graph_ids"] <= bound,
                        round(time.perf_counter() - t, 1),
                        f"{m['decode_tok_s']:.0f} tok/s decode, {m['runs'] + 1} runs, {m['graph_ids']} decode graphs "
                        f"kept (at most {bound})", m))


def targets(chk: GpuCheck, ms: dict, model: str, dtype: str) -> None:
    """The issue's targets for GPT-2-small fp16 with CUDA graphs (reported, not judged, in a dry run)."""
    graphs, hf = ms.get("graphs"), ms.get("transformers")
    speedup = hf / graphs if graphs and hf else None
    figure = (f"{graphs:.3f} ms/token (target <= {TARGET_MS_PER_TOKEN}); "
              f"{speedup:.2f}x transformers (target >= {TARGET_VS_TRANSFORMERS})" if graphs and speedup else
              f"{graphs and f'{graphs:.3f} ms/token'}; no transformers figure to compare with")
    met = bool(graphs and speedup and graphs <= TARGET_MS_PER_TOKEN and speedup >= TARGET_VS_TRANSFORMERS)
    chk.add(Step("targets", model, dtype, None if chk.dry_run else met, figure=figure,
                 data={"ms_per_token": graphs, "transformers_ms_per_token": hf, "speedup": speedup}))


def tensorrt_steps(chk: GpuCheck, env: dict, model: str, ckpt: Path, out: Path, dtype: str, prompts: list[str]) -> None:
    major = env["tensorrt"].split(".")[0]
    chk.command("check", gptexport("check", str(out), "--target", "tensorrt", "--trt-version", major), model, dtype)
    if not chk.command("build", gptexport("build", str(out), "--timing-cache", str(chk.work / f"timing-{model}.cache")),
                       model, dtype).ok:
        return
    parity(chk, model, ckpt, out, dtype, "tensorrt", prompts)


# ---- the run and its report -----------------------------------------------------------------------

def table(steps: list[Step]) -> str:
    rows = [("result", "step", "model", "dtype", "s", "figure")]
    rows += [({True: "ok", False: "FAIL", None: "skip"}[s.ok], s.step, s.model, s.dtype, f"{s.seconds:.0f}", s.figure)
             for s in steps]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows)


def models(args, work: Path) -> list[tuple[str, Path, list[str]]]:
    """(name, checkpoint, prompt arguments) of each model the check converts."""
    if args.cpu_dry_run:
        return [("tiny", write_checkpoint(work / "tiny" / "ckpt.pt", TINY), ["1,2,3", "7"])]
    chosen = []
    if args.only in (None, "shakespeare"):
        chosen.append(("shakespeare", SHIPPED, []))
    if args.only in (None, "gpt2-small"):
        chosen.append(("gpt2-small", write_checkpoint(work / "gpt2-small" / "ckpt.pt", GPT2_SMALL), GPT2_PROMPTS))
    return chosen


def run(args) -> GpuCheck:
    work = args.work or Path(tempfile.mkdtemp(prefix="gptexport-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    chk = GpuCheck(work, args.cpu_dry_run)
    env = environment(chk)
    if not chk.ok:
        return chk
    if not (args.skip_tests or chk.dry_run):
        chk.command("gpu tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"])
    speed_model = "tiny" if chk.dry_run else "gpt2-small"
    for name, ckpt, prompts in models(args, work):
        for dtype in args.dtypes.split(","):
            out = work / f"{name}-{dtype}"
            if not chk.command("convert", gptexport("convert", str(ckpt), "-o", str(out), "--dtype", dtype, "--force"),
                               name, dtype).ok:
                continue
            parity(chk, name, ckpt, out, dtype, chk.backend, prompts)
            if dtype == "fp32":  # (in a dry run the CPU provider has no TF32: the flags and preset still run)
                parity(chk, name, ckpt, out, dtype, chk.backend, prompts, tf32=True)
            if name == speed_model:
                ms = speed(chk, env, name, ckpt, out, dtype, args.decode_tokens)
                if dtype == "fp16":
                    targets(chk, ms, name, dtype)
            if env["tensorrt"] and not chk.dry_run:
                tensorrt_steps(chk, env, name, ckpt, out, dtype, prompts)
    return chk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="Directory for checkpoints and model directories.")
    p.add_argument("--only", choices=["shakespeare", "gpt2-small"], default=None)
    p.add_argument("--decode-tokens", type=int, default=128, help="Decode steps timed per run.")
    p.add_argument("--dtypes", default="fp32,fp16", help="Comma-separated convert dtypes (the targets are fp16's).")
    p.add_argument("--skip-tests", action="store_true", help="Skip `pytest -m gpu`.")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="Run the steps on ONNX Runtime's CPU provider with a tiny model (no GPU; targets not judged).")
    args = p.parse_args(argv)
    t = time.perf_counter()
    chk = run(args)
    total = round(time.perf_counter() - t, 1)
    summary = {"ok": chk.ok, "dry_run": chk.dry_run, "seconds": total, "work": str(chk.work),
               "steps": [asdict(s) for s in chk.steps]}
    (chk.work / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\n=== gpu_check: {'OK' if chk.ok else 'NOT OK'} in {total:.0f} s"
          f"{' (dry run on the CPU)' if chk.dry_run else ''}\n{table(chk.steps)}\n"
          f"written to {chk.work / 'gpu_check.json'}")
    return 0 if chk.ok else 1


if __name__ == "__main__":
    sys.exit(main())
