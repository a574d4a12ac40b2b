"""The whole GPU check, one command, on a machine with TensorRT, cuda-python and an NVIDIA GPU.

Installs nothing and downloads nothing. It runs:
  1. the GPU tests (pytest -m gpu tests/test_engine.py): tiny engines against ONNX Runtime;
  2. for the shipped model (models/shakespeare-char/ckpt.pt) and a GPT-2-small-sized random
     checkpoint (n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab 50304), in fp32 and fp16:
       gptexport convert CKPT -o OUT --dtype D --force
       gptexport check OUT --target tensorrt --trt-version MAJOR
       gptexport build OUT --timing-cache WORK/timing-NAME.cache
       gptexport parity CKPT OUT --backends tensorrt --tolerance D
     and measures decode tokens/s on the engine (batch 1, greedy, the KV cache on the device);
  3. prints a summary table and writes it to WORK/gpu_check.json. Exit 0 only if everything passed.

Usage (from the repository root, in the environment gptexport is installed in):
  python scripts/gpu_check.py [--work DIR] [--only shakespeare|gpt2-small] [--decode-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "shakespeare-char" / "ckpt.pt"
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True, dropout=0.0)
GPT2_PROMPTS = ["464,3616,286,1204,318", "50256"]  # token ids: the random model may have no tokenizer


def preflight() -> str:
    """TensorRT's version and the GPU, or exit 2 saying what is missing."""
    try:
        from gptexport.engine import current_device, import_cudart, import_tensorrt

        trt = import_tensorrt()
        device = current_device(import_cudart())
    except Exception as e:  # BackendUnavailable, or a CUDA error without a GPU
        print(f"gpu_check: cannot run here: {e}", file=sys.stderr)
        sys.exit(2)
    return f"TensorRT {trt.__version__} on {device.name} (compute capability {device.compute_capability})"


def write_gpt2_small(path: Path, seed: int = 0) -> Path:
    """A GPT-2-small-sized GPT with nanoGPT's initialisation, saved in train.py's format."""
    import torch

    from gptexport.config import GPTConfig
    from gptexport.model import GPT

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": GPT(GPTConfig(**GPT2_SMALL)).state_dict(), "model_args": GPT2_SMALL, "optimizer": None,
                "iter_num": 0, "best_val_loss": 10.0, "config": {"dataset": "openwebtext"}}, path)
    return path


def run(step: str, cmd: list[str], results: list[dict], **where) -> bool:
    """Run one command, streaming its output; record whether it passed and how long it took."""
    print(f"\n=== {step}: {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    ok = subprocess.run(cmd, cwd=ROOT).returncode == 0
    results.append({"step": step, **where, "ok": ok, "seconds": round(time.perf_counter() - t, 1)})
    return ok


def decode_tokens_per_second(out: Path, tokens: int) -> dict:
    """Greedy decode on the engine, batch 1: one prompt token, then `tokens` steps on the device cache."""
    import numpy as np

    from gptexport.backends import open_runner
    from gptexport.modeldir import load_model_dir

    md = load_model_dir(out)
    tokens = min(tokens, md.config.block_size - 1)
    with open_runner("tensorrt", md) as runner:
        for _ in range(2):  # the first pass warms up (allocation, lazy CUDA init); the second is timed
            cache = runner.new_cache(1, tokens + 1)
            t0 = time.perf_counter()
            logits = runner.forward(np.array([[0]]), cache)
            t1 = time.perf_counter()
            for _ in range(tokens):
                logits = runner.forward(logits.argmax(-1)[:, None], cache)
            t2 = time.perf_counter()
            cache.close()
    return {"decode_tokens_per_s": round(tokens / (t2 - t1), 1), "prefill_ms": round((t1 - t0) * 1e3, 2),
            "decode_tokens": tokens}


def check_model(name: str, ckpt: Path, dtype: str, work: Path, trt_major: str, decode_tokens: int,
                results: list[dict]) -> None:
    gptexport = [sys.executable, "-m", "gptexport"]
    out = work / f"{name}-{dtype}"
    where = {"model": name, "dtype": dtype}
    if not run("convert", [*gptexport, "convert", str(ckpt), "-o", str(out), "--dtype", dtype, "--force"], results, **where):
        return
    run("check", [*gptexport, "check", str(out), "--target", "tensorrt", "--trt-version", trt_major], results, **where)
    if not run("build", [*gptexport, "build", str(out), "--timing-cache", str(work / f"timing-{name}.cache")],
               results, **where):
        return
    prompts = [a for p in GPT2_PROMPTS for a in ("--prompt-tokens", p)] if name == "gpt2-small" else []
    run("parity", [*gptexport, "parity", str(ckpt), str(out), "--backends", "tensorrt", "--tolerance", dtype,
                   "--json", str(out / "parity-tensorrt.json"), *prompts], results, **where)
    t = time.perf_counter()
    try:
        speed = decode_tokens_per_second(out, decode_tokens)
        results.append({"step": "decode", **where, "ok": True, "seconds": round(time.perf_counter() - t, 1), **speed})
        print(f"decode {name} {dtype}: {speed}", flush=True)
    except Exception as e:
        results.append({"step": "decode", **where, "ok": False, "error": str(e)})
        print(f"decode {name} {dtype}: FAILED: {e}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="Directory for checkpoints and model directories.")
    p.add_argument("--only", choices=["shakespeare", "gpt2-small"], default=None)
    p.add_argument("--decode-tokens", type=int, default=256)
    args = p.parse_args()
    where = preflight()
    print(f"gpu_check: {where}", flush=True)
    import tensorrt

    work = args.work or Path(tempfile.mkdtemp(prefix="gptexport-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    run("gpu tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_engine.py"], results)
    models = []
    if args.only in (None, "shakespeare"):
        if SHIPPED.is_file():
            models.append(("shakespeare", SHIPPED))
        else:
            results.append({"step": "convert", "model": "shakespeare", "ok": False, "error": f"{SHIPPED} missing"})
    if args.only in (None, "gpt2-small"):
        ckpt = work / "gpt2-small" / "ckpt.pt"
        models.append(("gpt2-small", ckpt if ckpt.exists() else write_gpt2_small(ckpt)))
    for name, ckpt in models:
        for dtype in ("fp32", "fp16"):
            check_model(name, ckpt, dtype, work, tensorrt.__version__.split(".")[0], args.decode_tokens, results)
    summary = {"where": where, "work": str(work), "results": results, "ok": all(r["ok"] for r in results)}
    (work / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n=== summary ({where})")
    for r in results:
        extra = f"  {r['decode_tokens_per_s']} tokens/s decode, prefill {r['prefill_ms']} ms" if "decode_tokens_per_s" in r else ""
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['step']:<10} {r.get('model', ''):<12} {r.get('dtype', ''):<5}"
              f" {r.get('seconds', '')}s{extra}{'  ' + r['error'] if 'error' in r else ''}")
    print(f"written to {work / 'gpu_check.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
