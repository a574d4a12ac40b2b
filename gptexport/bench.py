"""`gptexport bench`: our runtime in each precision against nanoGPT and transformers, in one run.

Every runtime generates greedily from the same random prompts with the same weights:
  gptexport-ort  the model directory on ONNX Runtime (fp32, and int8/int4 made by `quantize`)
  nanoGPT        gptexport.model.GPT.generate: nanoGPT's loop, a full forward per new token
  transformers   GPT2LMHeadModel.generate with its KV cache (optional: skipped when not installed)
Each measurement runs in its own subprocess (`python -m gptexport.bench worker JOB`), so its peak
RSS is that runtime's alone. Every token is time-stamped as it is sampled: time to first token
(prefill), then the mean time per token of the rest (decode). Every runtime is measured once per
round, for several rounds; medians over the rounds are reported. Next to them, the machine's
memory bandwidth (an array copy and an array read) and the decode rate it allows at most:
bandwidth / the weight bytes read per token. Ratios within one run are the headline; absolute
numbers vary by machine. Never imports torch itself: only the nanoGPT and transformers workers do.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import GptExportError, UsageError

PRECISIONS = ("fp32", "int8", "int4")
MB = 1e6


@dataclass
class BenchConfig:
    prompt_tokens: int = 16
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 8)
    contexts: tuple[int, ...] = (64, 900)  # decode cost after a prompt this long
    context_new_tokens: int = 32  # decode steps timed at each context
    rounds: int = 3  # every runtime once per round, round after round: drift hits them all alike
    repeats: int = 1  # timed runs per job within a round
    budget_s: float = 120  # a job stops repeating past this (nanoGPT at batch 8 or long contexts)
    max_others: float | None = 0.15  # rerun a job during which other processes used more of the CPU
    threads: int = 2
    seed: int = 0


@dataclass
class Result:
    """One runtime: throughput per batch size and decode cost per context length."""

    runtime: str
    weights: str
    weight_bytes: int | None = None  # every initializer, as stored
    weight_bytes_per_token: int | None = None  # what a decode step reads (see weight_bytes())
    by_batch: dict = field(default_factory=dict)  # str(batch) -> {prefill_tok_s, decode_tok_s, ttft_ms, peak_rss_mb}
    ms_per_token_at: dict = field(default_factory=dict)  # str(context) -> decode ms per token (batch 1)
    note: str = ""


# ---- the measurement, run inside a worker subprocess ------------------------------------------

# A generator is gen(prompt (B, T) int64, n, stamp): generate n tokens greedily, calling stamp()
# as each one is sampled, so every runtime is timed token by token the same way.
Generator = Callable[[np.ndarray, int, Callable[[], None]], None]


def _ort_generator(path: str, threads: int) -> Generator:
    from .backends.ort import OrtRunner
    from .generate import generate
    from .modeldir import load_model_dir
    from .sampling import SamplingParams

    runner = OrtRunner(load_model_dir(path, verify=False), threads=threads)
    runner.activate()
    greedy, rng = SamplingParams(0.0), np.random.default_rng(0)
    return lambda prompt, n, stamp: generate(runner, prompt, n, greedy, rng, on_token=lambda t: stamp())


def _nanogpt_generator(path: str, threads: int) -> Generator:
    import torch

    from .checkpoint import load_model

    torch.set_num_threads(threads)
    model = load_model(path).float().eval()

    def gen(prompt: np.ndarray, n: int, stamp: Callable[[], None]) -> None:
        idx = torch.from_numpy(prompt)
        for _ in range(n):  # nanoGPT's generate one token at a time: the same full recompute per token
            idx = model.generate(idx, 1, top_k=1)  # top_k=1: greedy, like the other runtimes
            stamp()
    return gen


def _transformers_generator(path: str, threads: int) -> Generator:
    import torch

    torch.set_num_threads(threads)
    model = hf_gpt2(path)

    class Stamps:  # transformers' streamer protocol: put() the prompt, then each new token
        def __init__(self, stamp):
            self.stamp, self.prompt_seen = stamp, False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.stamp()
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def gen(prompt: np.ndarray, n: int, stamp: Callable[[], None]) -> None:
        ids = torch.from_numpy(prompt)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=0, streamer=Stamps(stamp))
    return gen


def hf_gpt2(ckpt: str):
    """The checkpoint as a transformers GPT2LMHeadModel (fp32, eval), weights copied over."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from .checkpoint import load_checkpoint
    from .hf_dir import CONV1D_WEIGHTS

    ck = load_checkpoint(ckpt)
    c = ck.config
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, activation_function="gelu" if c.activation == "gelu" else "gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=None, bos_token_id=None)
    model = GPT2LMHeadModel(config).eval()
    # Hugging Face's Conv1D stores (in, out), nanoGPT's Linear (out, in); bias=False models keep
    # transformers' zero biases
    sd = {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in ck.state_dict.items()}
    model.load_state_dict(sd, strict=False)
    model.generation_config.eos_token_id = None
    return model


GENERATORS = {"gptexport-ort": _ort_generator, "nanoGPT": _nanogpt_generator, "transformers": _transformers_generator}


def _token_times(gen: Generator, prompt: np.ndarray, n: int) -> list[float]:
    """Seconds from the call to each of the n tokens."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    gen(prompt, n, lambda: stamps.append(time.perf_counter()))
    if len(stamps) != n:
        raise GptExportError(f"bench: generator stamped {len(stamps)} tokens, asked for {n}")
    return [s - t0 for s in stamps]


def measure(job: dict) -> dict:
    """One job in this process: time to first token and decode rate of greedy generation, medians
    over `repeats` runs (fewer when the job's time budget runs out: nanoGPT at long contexts)."""
    gen = GENERATORS[job["runtime"]](job["path"], job["threads"])
    rng = np.random.default_rng(job["seed"])
    B, T, n = job["batch"], job["prompt_tokens"], job["new_tokens"]
    prompt = rng.integers(0, job["vocab_size"], (B, T), dtype=np.int64)
    gen(prompt, 2, lambda: None)  # warm-up: first-run allocations and lazy initialisation
    runs, start = [], time.perf_counter()
    while len(runs) < job["repeats"] and (not runs or time.perf_counter() - start < job["budget_s"]):
        runs.append(_token_times(gen, prompt, n))
    first = statistics.median(r[0] for r in runs)
    step = statistics.median((r[-1] - r[0]) / (n - 1) for r in runs)
    return {"prefill_tok_s": B * T / first, "decode_tok_s": B / step, "ttft_ms": first * 1e3,
            "ms_per_token": step * 1e3, "runs": len(runs), "peak_rss_mb": peak_rss() / MB}


def peak_rss() -> int:
    """This process's peak resident set in bytes since exec (VmHWM; ru_maxrss survives exec on Linux)."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(job: dict, max_others: float | None = None, attempts: int = 3) -> dict:
    """`measure(job)` in a fresh Python, so imports, weights and peak RSS are its own.

    On a shared machine other processes can steal the cores mid-measurement. The CPU time the rest
    of the machine used during the job is measured (/proc/stat minus the worker's own rusage) and
    recorded as `others_cpu`. With `max_others`, a job above that share of the machine waits for a
    quiet moment and runs again, up to `attempts` times in all (the last result is kept).
    """
    for _ in range(attempts if max_others is not None else 1):
        if max_others is not None:
            _wait_for_quiet(max_others)
        before = _cpu_seconds()
        result, own = _run_once(job)
        busy, total = (a - b for a, b in zip(_cpu_seconds(), before))
        result["others_cpu"] = max(0.0, (busy - own) / total) if total > 0 else 0.0
        if max_others is None or result["others_cpu"] <= max_others:
            break
    return result


def _run_once(job: dict) -> tuple[dict, float]:
    """(the worker's result, the CPU seconds it used)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker is our only child meanwhile
    proc = subprocess.run([sys.executable, "-m", "gptexport.bench", "worker", json.dumps(job)],
                          capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GptExportError(f"bench worker {job['runtime']} failed: {tail}")
    own = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return json.loads(proc.stdout.strip().splitlines()[-1]), own


def _cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (0, 0 elsewhere)."""
    fields = next((ln.split()[1:] for ln in _read("/proc/stat").splitlines() if ln.startswith("cpu ")), [])
    if len(fields) < 5:
        return 0.0, 0.0
    ticks = [int(f) for f in fields[:8]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def _wait_for_quiet(max_busy: float, timeout_s: float = 120) -> None:
    """Wait (up to timeout_s) until the machine's busy share over one second is at most max_busy."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        before = _cpu_seconds()
        time.sleep(1.0)
        busy, total = (a - b for a, b in zip(_cpu_seconds(), before))
        if total <= 0 or busy / total <= max_busy:
            return
        time.sleep(4.0)


# ---- the machine and the models -------------------------------------------------------------------

def memory_bandwidth(threads: int, megabytes: int = 512, repeats: int = 7) -> dict[str, float]:
    """Bytes/s of two large-array streams on `threads` threads (numpy releases the GIL in both):
    copy, counted as STREAM does (read + write), and read (a float32 dot product, which reads its
    array once, as a decode step reads its weights)."""
    src = np.ones(megabytes * 1024 * 1024 // 4, np.float32)
    dst = np.empty_like(src)
    spans = [(p[0], p[-1] + 1) for p in np.array_split(np.arange(len(src)), threads)]
    copy = _threaded(lambda a, b: np.copyto(dst[a:b], src[a:b]), spans, repeats)
    read = _threaded(lambda a, b: np.dot(src[a:b], src[a:b]), spans, repeats)
    return {"copy": 2 * src.nbytes / copy, "read": src.nbytes / read}


def _threaded(work: Callable[[int, int], object], spans: list[tuple[int, int]], repeats: int) -> float:
    """Median seconds of running work(a, b) for every span at once, one thread each."""
    times = []
    for _ in range(repeats):
        workers = [threading.Thread(target=work, args=span) for span in spans]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def weight_bytes(onnx_path: Path) -> tuple[int, int]:
    """(bytes of all initializers, bytes a decode step reads whole: all but the tables that only
    a Gather reads, one row per token)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    consumers: dict[str, set] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = streamed = 0
    for t in model.graph.initializer:
        size = int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += size
        if not consumers.get(t.name, set()) <= {"Gather", "GatherBlockQuantized"}:
            streamed += size
    return total, streamed


def precision_dirs(model_dir: Path, precisions: tuple[str, ...], work_dir: Path) -> dict[str, Path]:
    """fp32 is the model directory itself; int8/int4 are quantized into work_dir once and reused."""
    from .modeldir import load_model_dir
    from .quantize import quantize, source_files

    source = source_files(load_model_dir(model_dir, verify=False))
    dirs = {}
    for p in precisions:
        if p == "fp32":
            dirs[p] = model_dir
            continue
        out = work_dir / f"{model_dir.name}-{p}"
        try:
            fresh = load_model_dir(out, verify=False).manifest["quantization_config"]["source_files"] == source
        except (GptExportError, KeyError):
            fresh = False
        if not fresh:
            quantize(model_dir, out, p, force=True)
        dirs[p] = out
    return dirs


# ---- the run --------------------------------------------------------------------------------------

def run_bench(model_dir: str | Path, ckpt: str | Path | None = None, config: BenchConfig = BenchConfig(),
              precisions: tuple[str, ...] = PRECISIONS, work_dir: str | Path | None = None,
              progress: Callable[[str], None] = print) -> dict:
    """Measure every runtime; returns the JSON-able report that `table` and `plot` render."""
    from .modeldir import load_model_dir

    model_dir = Path(model_dir)
    md = load_model_dir(model_dir)
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise UsageError(f"--precision {bad[0]!r} is not one of {', '.join(PRECISIONS)}")
    work_dir = Path(work_dir) if work_dir else model_dir.parent
    dirs = precision_dirs(model_dir, precisions, work_dir)
    # (runtime, weights, path, (weight bytes, weight bytes per token) when it is an ONNX model)
    runtimes = [("gptexport-ort", p, str(d), weight_bytes(load_model_dir(d, verify=False).onnx_path))
                for p, d in dirs.items()]
    notes = []
    if ckpt is None:
        notes.append("nanoGPT and transformers skipped: no --ckpt given")
    else:
        runtimes.append(("nanoGPT", "fp32", str(ckpt), None))
        if _has_transformers():
            runtimes.append(("transformers", "fp32", str(ckpt), None))
        else:
            notes.append("transformers skipped: not installed (pip install transformers)")
    rounds = []
    for i in range(config.rounds):
        progress(f"round {i + 1} of {config.rounds}")
        bandwidth = memory_bandwidth(config.threads)
        progress(f"memory bandwidth ({config.threads} threads): copy {bandwidth['copy'] / 1e9:.1f} GB/s, "
                 f"read {bandwidth['read'] / 1e9:.1f} GB/s")
        results = [_bench_runtime(md.config, *runtime, config, progress) for runtime in runtimes]
        rounds.append({"memory_bandwidth_bytes_s": bandwidth, "results": [asdict(r) for r in results]})
    return {"config": asdict(config), "model": {"path": str(model_dir), **md.config.to_dict()},
            "memory_bandwidth_bytes_s": _medians([r["memory_bandwidth_bytes_s"] for r in rounds]), "notes": notes,
            "results": [_medians([r["results"][i] for r in rounds]) for i in range(len(runtimes))],
            "rounds": rounds, "machine": _machine()}


def _medians(items: list):
    """The element-wise median of equally shaped dicts of numbers (strings and None are kept)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _medians([it[k] for it in items if k in it]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(items)
    return first


def _bench_runtime(c, name: str, weights: str, path: str, sizes: tuple[int, int] | None, config: BenchConfig,
                   progress: Callable[[str], None]) -> Result:
    result = Result(name, weights, *(sizes or (None, None)))
    base = {"runtime": name, "path": path, "threads": config.threads, "seed": config.seed,
            "vocab_size": c.vocab_size, "repeats": config.repeats, "budget_s": config.budget_s}
    for b in config.batches:
        job = {**base, "batch": b, "prompt_tokens": config.prompt_tokens, "new_tokens": config.new_tokens}
        m = run_worker(job, config.max_others)
        keys = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "others_cpu")
        result.by_batch[str(b)] = {k: m[k] for k in keys}
        progress(f"{name} {weights} batch {b}: decode {m['decode_tok_s']:.1f} tok/s, "
                 f"prefill {m['prefill_tok_s']:.0f} tok/s, TTFT {m['ttft_ms']:.0f} ms, RSS {m['peak_rss_mb']:.0f} MB "
                 f"(others used {m['others_cpu']:.0%} of the CPU)")
    for ctx in config.contexts:
        if ctx + config.context_new_tokens > c.block_size:
            result.note = f"contexts beyond block_size {c.block_size} skipped"
            continue
        job = {**base, "batch": 1, "prompt_tokens": ctx, "new_tokens": config.context_new_tokens + 1}
        result.ms_per_token_at[str(ctx)] = run_worker(job, config.max_others)["ms_per_token"]
        progress(f"{name} {weights} context {ctx}: {result.ms_per_token_at[str(ctx)]:.1f} ms/token")
    return result


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _machine() -> dict:
    import platform

    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "load_average": os.getloadavg()[0]}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# ---- rendering ------------------------------------------------------------------------------------

def _find(report: dict, runtime: str, weights: str = "fp32") -> dict | None:
    return next((r for r in report["results"] if r["runtime"] == runtime and r["weights"] == weights), None)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}×" if a and b and a == a and b == b else "–"


def floor_tok_s(report: dict, result: dict, stream: str = "copy") -> float | None:
    """The decode rate memory bandwidth allows at most: bandwidth / weight bytes read per token."""
    wb = result.get("weight_bytes_per_token")
    return report["memory_bandwidth_bytes_s"][stream] / wb if wb else None


def table(report: dict) -> str:
    """The report as a markdown table plus the bandwidth floor, ratios against the baselines."""
    b1 = lambda r, k: r["by_batch"].get("1", {}).get(k)
    nano, hf = _find(report, "nanoGPT"), _find(report, "transformers")
    bmax = str(max(report["config"]["batches"]))
    c_lo, c_hi = (str(c) for c in (list(report["config"]["contexts"]) + [None, None])[:2])
    rows = ["| runtime | weights | decode tok/s (B=1) | × nanoGPT | × transformers | ÷ floor (copy) | ÷ floor (read) "
            f"| prefill tok/s | TTFT ms | decode tok/s (B={bmax}) | peak RSS MB (B=1) | ms/token @{c_lo} | @{c_hi} | ratio |",
            "|" + "---|" * 14]
    for r in report["results"]:
        d = b1(r, "decode_tok_s")
        lo, hi = r["ms_per_token_at"].get(c_lo), r["ms_per_token_at"].get(c_hi)
        rows.append("| " + " | ".join([
            r["runtime"], r["weights"], _fmt(d), _ratio(d, nano and b1(nano, "decode_tok_s")),
            _ratio(d, hf and b1(hf, "decode_tok_s")),
            *(_ratio_plain(d, floor_tok_s(report, r, k)).rstrip("×") for k in ("copy", "read")),
            _fmt(b1(r, "prefill_tok_s")), _fmt(b1(r, "ttft_ms")), _fmt(r["by_batch"].get(bmax, {}).get("decode_tok_s")),
            _fmt(b1(r, "peak_rss_mb")),
            _fmt(lo), _fmt(hi), f"{hi / lo:.2f}" if lo and hi else "–"]) + " |")
    bw = report["memory_bandwidth_bytes_s"]
    lines = [f"memory bandwidth ({report['config']['threads']} threads): copy {bw['copy'] / 1e9:.1f} GB/s "
             f"(read + write), read {bw['read'] / 1e9:.1f} GB/s; decode floor = bandwidth / weight bytes "
             f"read per token:"]
    for r in report["results"]:
        if r.get("weight_bytes_per_token"):
            rss = r["by_batch"].get("1", {}).get("peak_rss_mb")
            lines.append(f"  {r['weights']}: {r['weight_bytes_per_token'] / MB:.0f} MB/token -> "
                         f"{floor_tok_s(report, r, 'copy'):.0f} tok/s (copy), "
                         f"{floor_tok_s(report, r, 'read'):.0f} tok/s (read); peak RSS at batch 1 = "
                         f"{_ratio_plain(rss and rss * MB, r.get('weight_bytes'))} the {r['weight_bytes'] / MB:.0f} MB of weights")
    return "\n".join(rows + [""] + lines + [f"note: {n}" for n in report["notes"]])


def _ratio_plain(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def _fmt(x: float | None) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def plot(report: dict, path: str | Path) -> None:
    """Decode tok/s per runtime and batch (with the bandwidth floors), and ms/token per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    labels = [f"{r['runtime']}\n{r['weights']}" for r in results]
    x = np.arange(len(results))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    batches = report["config"]["batches"]
    w = 0.8 / max(len(batches), 1)
    for i, b in enumerate(batches):
        vals = [r["by_batch"].get(str(b), {}).get("decode_tok_s", 0) for r in results]
        ax1.bar(x + (i - (len(batches) - 1) / 2) * w, vals, w, label=f"batch {b}")
    for i, r in enumerate(results):  # each precision's floor, over its own bars
        for stream, style in (("copy", ":"), ("read", "--")):
            f = floor_tok_s(report, r, stream)
            if f:
                ax1.hlines(f, i - 0.45, i + 0.45, ls=style, lw=1.2, color="black",
                           label=f"bandwidth floor, B=1 ({stream})" if i == 0 else None)
    ax1.set(yscale="log", ylabel="decode tokens/s (all sequences)", title="Decode throughput")
    ax1.set_xticks(x, labels, fontsize=8)
    ax1.legend(fontsize=8)
    contexts = report["config"]["contexts"]
    w = 0.8 / max(len(contexts), 1)
    for i, c in enumerate(contexts):
        vals = [r["ms_per_token_at"].get(str(c), 0) for r in results]
        ax2.bar(x + (i - (len(contexts) - 1) / 2) * w, vals, w, label=f"context {c}")
    ax2.set(yscale="log", ylabel="ms per decoded token (batch 1)", title="Decode cost as the context grows")
    ax2.set_xticks(x, labels, fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{report['model']['n_layer']}-layer, {report['model']['n_embd']}-wide GPT; "
                 f"{report['config']['threads']} threads; {report['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    print(json.dumps(measure(json.loads(sys.argv[2]))))
