"""Convert GPT-2 small, medium, large and XL, and measure what it costs (docs/performance.md, issue #11).

For each shape, a randomly initialised checkpoint in nanoGPT's format (written by a child process
into a temporary directory), then `gptexport convert` on it in a subprocess, validation included:
  - wall time of the convert, and seconds per GB of fp32 weights against GPT-2 small's, measured
    in the same run (does convert time grow faster than the weight bytes?);
  - peak RSS of the convert process (wait4's ru_maxrss) and its ratio to the fp32 weight bytes
    (the target: at most 2.5x);
  - size of the model directory on disk;
  - CPU decode tokens/s of the result at batch 1 on 2 threads (gptexport.bench's worker, in its
    own process), with the share of the CPU other processes used meanwhile.
Each checkpoint and model directory is deleted before the next shape (XL needs 2 x 6.2 GB of disk).

Usage (from the repository root; a machine with ~10 GB of memory free for XL, nothing else heavy):
  nice python scripts/convert_sizes.py [--sizes small,medium,large,xl] [--json sizes.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import make_checkpoint, timed_convert  # noqa: E402  (scripts/bench.py)

from gptexport.bench import run as bench  # noqa: E402

GB = 1e9
SHAPES = {  # nanoGPT's GPT-2 configurations (model.py from_pretrained), its padded vocabulary
    "small": dict(n_layer=12, n_head=12, n_embd=768),
    "medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "large": dict(n_layer=36, n_head=20, n_embd=1280),
    "xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def model_args(size: str) -> dict:
    return {**SHAPES[size], "block_size": 1024, "vocab_size": 50304, "bias": True, "dropout": 0.0}


def fp32_weight_bytes(args: dict) -> int:
    """4 bytes per parameter, the tied embedding counted once."""
    from gptexport.config import GPTConfig
    from gptexport.convert.checkpoint import empty_model  # torch, in this process only for this

    return empty_model(GPTConfig(**args)).get_num_params(non_embedding=False) * 4


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def decode_rate(model_dir: Path, vocab_size: int, threads: int, new_tokens: int) -> dict:
    job = {"runtime": "gptexport-ort", "path": str(model_dir), "threads": threads, "seed": 0,
           "vocab_size": vocab_size, "repeats": 1, "budget_s": 600, "batch": 1, "prompt_tokens": 16,
           "new_tokens": new_tokens}
    return bench.run_worker(job)


def measure(size: str, work: Path, threads: int, new_tokens: int) -> dict:
    args = model_args(size)
    ckpt, out = work / size / "ckpt.pt", work / f"{size}-model"
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--make", size, str(ckpt)], check=True)
    print(f"{size}: checkpoint written ({time.perf_counter() - t:.0f}s)", file=sys.stderr)
    weights = fp32_weight_bytes(args)
    load = os.getloadavg()[0]
    converted = timed_convert(ckpt, out)
    shutil.rmtree(ckpt.parent)
    decode = decode_rate(out, args["vocab_size"], threads, new_tokens)
    row = {"size": size, "params": weights // 4, "weight_bytes": weights, "convert_s": converted["seconds"],
           "peak_rss_bytes": converted["peak_rss_mb"] * bench.MB, "disk_bytes": dir_bytes(out),
           "decode_tok_s": decode["decode_tok_s"], "decode_peak_rss_mb": decode["peak_rss_mb"],
           "decode_others_cpu": decode["others_cpu"], "load_average_at_convert": load, "log": converted["log"]}
    shutil.rmtree(out)
    print(f"{size}: convert {row['convert_s']:.0f}s, peak RSS {row['peak_rss_bytes'] / GB:.2f} GB "
          f"({row['peak_rss_bytes'] / weights:.2f}x weights), decode {row['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    return row


def table(rows: list[dict]) -> str:
    base = rows[0]
    per_gb = base["convert_s"] / (base["weight_bytes"] / GB)
    lines = [f"| model | params | fp32 weights | convert s | s per GB (× {base['size']}) | peak RSS | "
             "÷ weights | on disk | decode tok/s (B=1, 2 threads) | others | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = r["weight_bytes"] / GB
        lines.append(
            f"| GPT-2 {r['size']} | {r['params'] / 1e6:.0f}M | {gb:.2f} GB | {r['convert_s']:.0f} | "
            f"{r['convert_s'] / gb:.1f} ({r['convert_s'] / gb / per_gb:.2f}×) | {r['peak_rss_bytes'] / GB:.2f} GB | "
            f"{r['peak_rss_bytes'] / r['weight_bytes']:.2f}× | {r['disk_bytes'] / GB:.2f} GB | "
            f"{r['decode_tok_s']:.1f} | {r['decode_others_cpu']:.0%} | {r['load_average_at_convert']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small,medium,large,xl")
    p.add_argument("--work-dir", type=Path, default=None, help="Where checkpoints go [default: a temporary dir].")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32, help="Decode steps timed per model.")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--make", nargs=2, metavar=("SIZE", "PATH"), help=argparse.SUPPRESS)  # the child's job
    a = p.parse_args()
    if a.make:
        make_checkpoint(Path(a.make[1]), model_args(a.make[0]))
        return
    sizes = [s.strip() for s in a.sizes.split(",")]
    bad = [s for s in sizes if s not in SHAPES]
    if bad:
        p.error(f"unknown size {bad[0]!r}; valid: {', '.join(SHAPES)}")
    started = datetime.datetime.now().astimezone().isoformat(timespec="minutes")
    with tempfile.TemporaryDirectory(prefix="gptexport-sizes-", dir=a.work_dir) as tmp:
        rows = [measure(size, Path(tmp), a.threads, a.new_tokens) for size in sizes]
    print(f"{started}, {bench._machine()['cpu']}, {os.cpu_count()} cores; others: the share of the CPU other "
          "processes used during the decode measurement; load avg: at the start of each convert")
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps({"started": started, "machine": bench._machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
