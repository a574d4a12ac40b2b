"""`gptexport parity` on a GPT-2-small-sized checkpoint: 124M parameters, nanoGPT's random init.

Writes the checkpoint exactly as nanoGPT's train.py saves one (n_layer=12, n_head=12, n_embd=768,
block_size=1024, vocab_size=50304), converts it to a model directory, then runs

  gptexport parity CKPT OUTDIR --backends onnxruntime --json parity.json --plot parity.png

and exits with its exit code. Nothing is downloaded. On 2 CPU cores the whole run takes a few
minutes (the conversion about one, the block_size crop probe of the cache check most of the rest).

Usage (from the repository root):
  python scripts/parity_gpt2_small.py [--work DIR] [--steps 32] [--backends onnxruntime]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True, dropout=0.0)


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """A GPT-2-small-sized GPT with nanoGPT's initialisation, saved in train.py's format."""
    import torch

    from gptexport.config import GPTConfig
    from gptexport.convert.model import GPT

    torch.manual_seed(seed)
    model = GPT(GPTConfig(**GPT2_SMALL))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_args": GPT2_SMALL, "optimizer": None, "iter_num": 0,
                "best_val_loss": 10.0, "config": {"dataset": "openwebtext"}}, path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="Directory to work in (default: a temporary one).")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--backends", default="onnxruntime")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="gptexport-gpt2-small-"))
    ckpt, out = work / "ckpt.pt", work / "model"
    t0 = time.perf_counter()
    if not ckpt.exists():
        write_checkpoint(ckpt)
        print(f"wrote {ckpt} ({time.perf_counter() - t0:.0f}s)", flush=True)
    if not out.exists():
        from gptexport.convert.export import convert

        convert(ckpt, out)
    t1 = time.perf_counter()
    cmd = [sys.executable, "-m", "gptexport", "parity", str(ckpt), str(out), "--backends", args.backends,
           "--steps", str(args.steps), "--json", str(work / "parity.json"), "--plot", str(work / "parity.png")]
    rc = subprocess.run(cmd, check=False).returncode
    print(f"parity: exit {rc} in {time.perf_counter() - t1:.0f}s; report in {work}/parity.json, plot {work}/parity.png")
    return rc


if __name__ == "__main__":
    sys.exit(main())
