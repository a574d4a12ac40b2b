"""`gptexport bench`: our runtime in each precision against nanoGPT and transformers, in one run.

Every runtime generates greedily from the same random prompts with the same weights:
  gptexport-ort  the model directory on ONNX Runtime's CPU provider (fp32, and int8/int4 made by
                 `quantize`)
  gptexport-ort-cuda, -ort-tensorrt, -tensorrt
                 with `--backend`: the model directory on that GPU backend, in its own dtype, with
                 and/or without CUDA graphs for decode (`--cuda-graphs on|off|both`)
  nanoGPT        gptexport.convert.model.GPT.generate: nanoGPT's loop, a full forward per new token
  transformers   GPT2LMHeadModel.generate with its KV cache (optional: skipped when not installed);
                 transformers-cuda: the same on the GPU, in the model directory's dtype, when GPU
                 backends are benchmarked and torch has CUDA
  llama.cpp, CTranslate2
                 the peers (bench/peers.py), when scripts/prepare_peers.sh has installed them and the
                 Hugging Face directory of the same weights is given (`hf_dir`, or `ckpt` when it is
                 one): their own converters make their models, their own tools time them; skipped
                 with a note otherwise
Each measurement runs in its own subprocess (`python -m gptexport.bench.worker JOB`), so its peak
RSS is that runtime's alone. Every token is time-stamped as it is sampled: time to first token
(prefill), then the mean time per token of the rest (decode). Every runtime is measured once per
round, for several rounds; medians over the rounds are reported, with their min-max bands. Next to them, the machine's
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

from ..errors import GptExportError, UsageError
from . import peers
from .report import ONNX_RUNTIME_OPS

PRECISIONS = ("fp32", "int8", "int4")
GPU_BACKENDS = ("ort-cuda", "ort-tensorrt", "tensorrt")
GRAPH_BACKENDS = ("ort-cuda", "tensorrt")  # the backends with CUDA graphs for decode
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
    backends: tuple[str, ...] = ("onnxruntime",)  # and/or GPU_BACKENDS
    cuda_graphs: tuple[bool, ...] = (True,)  # the GPU backends' decode with CUDA graphs, without, or both
    peers: bool = True  # llama.cpp and CTranslate2, when installed and hf_dir (or an HF ckpt) is given
    peers_dir: str | None = None  # where peers.json is [default: $GPTEXPORT_PEERS or ~/.cache/gptexport-peers]
    hf_dir: str | None = None  # the Hugging Face directory the model directory was converted from
    kernels: tuple[str, ...] = ("off", "on")  # ONNX Runtime's own ops and/or our kernels (runtime/kernels)


@dataclass
class Result:
    """One runtime: throughput per batch size and decode cost per context length."""

    runtime: str
    weights: str
    device: str = "cpu"
    variant: str = ""  # e.g. "no CUDA graphs"
    weight_bytes: int | None = None  # every initializer, as stored
    weight_bytes_per_token: int | None = None  # what a decode step reads (see weight_bytes())
    by_batch: dict = field(default_factory=dict)  # str(batch) -> {prefill_tok_s, decode_tok_s, ttft_ms, peak_rss_mb}
    ms_per_token_at: dict = field(default_factory=dict)  # str(context) -> decode ms per token (batch 1)
    note: str = ""


def run_worker(job: dict, max_others: float | None = None, attempts: int = 3,
               once: Callable[[dict], tuple[dict, float]] | None = None) -> dict:
    """`measure(job)` in a fresh Python, so imports, weights and peak RSS are its own.

    On a shared machine other processes can steal the cores mid-measurement. The CPU time the rest
    of the machine used during the job is measured (/proc/stat minus the worker's own rusage) and
    recorded as `others_cpu`. With `max_others`, a job above that share of the machine waits for a
    quiet moment and runs again, up to `attempts` times in all (the last result is kept). `once`
    runs the job and returns (its result, the CPU seconds it used): the gptexport worker by default,
    peers.run_job for the peers.
    """
    for _ in range(attempts if max_others is not None else 1):
        if max_others is not None:
            _wait_for_quiet(max_others)
        before = _cpu_seconds()
        result, own = (once or _run_once)(job)
        busy, total = (a - b for a, b in zip(_cpu_seconds(), before))
        result["others_cpu"] = max(0.0, (busy - own) / total) if total > 0 else 0.0
        if max_others is None or result["others_cpu"] <= max_others:
            break
    return result


def _run_once(job: dict) -> tuple[dict, float]:
    """(the worker's result, the CPU seconds it used)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker is our only child meanwhile
    proc = subprocess.run([sys.executable, "-m", "gptexport.bench.worker", json.dumps(job)],
                          capture_output=True, text=True, env=env, check=False)
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


def precision_dirs(model_dir: Path, precisions: tuple[str, ...], work_dir: Path,
                   progress: Callable[[str], None] = print) -> dict[str, Path]:
    """fp32 is the model directory itself; int8/int4 are quantized into work_dir once and reused."""
    from ..artifacts.modeldir import load_model_dir
    from ..convert.quantize import quantize, source_files

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
            quantize(model_dir, out, p, force=True, progress=progress)
        dirs[p] = out
    return dirs


def run_bench(model_dir: str | Path, ckpt: str | Path | None = None, config: BenchConfig = BenchConfig(),
              precisions: tuple[str, ...] = PRECISIONS, work_dir: str | Path | None = None,
              progress: Callable[[str], None] = print) -> dict:
    """Measure every runtime; returns the JSON-able report that `table` and `plot` render."""
    from ..artifacts.modeldir import load_model_dir

    model_dir = Path(model_dir)
    md = load_model_dir(model_dir)
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise UsageError(f"--precision {bad[0]!r} is not one of {', '.join(PRECISIONS)}")
    bad = [b for b in config.backends if b != "onnxruntime" and b not in GPU_BACKENDS]
    if bad:
        raise UsageError(f"--backend {bad[0]!r} is not one of onnxruntime, {', '.join(GPU_BACKENDS)}")
    runtimes, notes = _runtimes(model_dir, md, ckpt, config, precisions,
                                Path(work_dir) if work_dir else model_dir.parent, progress)
    rounds = []
    for runtime in runtimes:
        progress(f"{runtime.name} {runtime.weights}: {runtime.path}")
    for i in range(config.rounds):
        progress(f"round {i + 1} of {config.rounds}")
        bandwidth = memory_bandwidth(config.threads)
        progress(f"memory bandwidth ({config.threads} threads): copy {bandwidth['copy'] / 1e9:.1f} GB/s, "
                 f"read {bandwidth['read'] / 1e9:.1f} GB/s")
        results = [_bench_runtime(md.config, runtime, config, progress) for runtime in runtimes]
        rounds.append({"memory_bandwidth_bytes_s": bandwidth, "results": [asdict(r) for r in results]})
    return {"config": asdict(config), "model": {"path": str(model_dir), **md.config.to_dict()},
            "memory_bandwidth_bytes_s": _medians([r["memory_bandwidth_bytes_s"] for r in rounds]), "notes": notes,
            "results": [{**_medians(per), "bands": _bands(per)}
                        for per in ([r["results"][i] for r in rounds] for i in range(len(runtimes)))],
            "rounds": rounds, "machine": _machine()}


@dataclass
class Runtime:
    """What one row of the report measures: a worker runtime, its weights and its job settings."""

    name: str
    weights: str
    path: str
    sizes: tuple[int, int] | None = None  # (weight bytes, weight bytes per token) of an ONNX model
    device: str = "cpu"
    job: dict = field(default_factory=dict)  # extra job settings: cuda_graphs, dtype, a peer's tools
    variant: str = ""

    @property
    def peer(self) -> bool:
        """Measured by peers.run_job, not the gptexport worker."""
        return self.name in peers.NAMES


def _runtimes(model_dir: Path, md, ckpt, config: BenchConfig, precisions: tuple[str, ...],
              work_dir: Path, progress: Callable[[str], None] = lambda m: None) -> tuple[list[Runtime], list[str]]:
    """The rows to measure, and notes on what was skipped and why."""
    from ..artifacts.modeldir import load_model_dir

    runtimes, notes = [], []
    if "onnxruntime" in config.backends:
        dirs = precision_dirs(model_dir, precisions, work_dir, progress)
        for p, d in dirs.items():
            sizes = weight_bytes(load_model_dir(d, verify=False).onnx_path)
            runtimes += [Runtime("gptexport-ort", p, str(d), sizes, job={"kernels": k}, variant=v)
                         for k, v in _kernel_variants(p, config.kernels, notes)]
    for backend in (b for b in config.backends if b in GPU_BACKENDS):
        for graphs in (config.cuda_graphs if backend in GRAPH_BACKENDS else (True,)):
            variant = "" if graphs or backend not in GRAPH_BACKENDS else "no CUDA graphs"
            runtimes.append(Runtime(f"gptexport-{backend}", md.dtype, str(model_dir), device="cuda",
                                    job={"cuda_graphs": graphs}, variant=variant))
    if ckpt is None:
        notes.append("nanoGPT and transformers skipped: no --ckpt given")
    else:
        _baselines(runtimes, notes, md, ckpt, config)
    if config.peers and "onnxruntime" in config.backends:
        _peers(runtimes, notes, md, ckpt, config, precisions, work_dir, progress)
    return runtimes, notes


def _kernel_variants(precision: str, modes: tuple[str, ...], notes: list[str]) -> list[tuple[str, str]]:
    """(kernels mode, row variant) of a precision's rows: fp32, int4 and int8 with ONNX Runtime's own
    ops (the mask-graph attention; MatMulNBits; DynamicQuantizeLinear + MatMulInteger) and/or our
    kernels, when they are available here (else a note why not); fp16 once, as it is."""
    if precision not in ONNX_RUNTIME_OPS:
        return [("off", "")]
    from ..runtime.backends.kernels import availability

    variants = [("off", ONNX_RUNTIME_OPS[precision])] if "off" in modes else []
    if "on" in modes:
        status = availability()
        if status.startswith("available"):
            variants.append(("on", "our kernels"))
            if not any(n.startswith("gptexport's kernels") for n in notes):
                notes.append(f"gptexport's kernels {status}")
        else:
            notes.append(f"{precision} with our kernels skipped: {status}")
    return variants



def _baselines(runtimes: list[Runtime], notes: list[str], md, ckpt, config: BenchConfig) -> None:
    """nanoGPT's generate and transformers' on the checkpoint (transformers also on the GPU)."""
    if "onnxruntime" in config.backends:
        runtimes.append(Runtime("nanoGPT", "fp32", str(ckpt)))
    if not _has_transformers():
        notes.append("transformers skipped: not installed (pip install transformers)")
        return
    if "onnxruntime" in config.backends:
        runtimes.append(Runtime("transformers", "fp32", str(ckpt)))
    if any(b in GPU_BACKENDS for b in config.backends):
        if md.dtype in ("fp32", "fp16") and _torch_has_cuda():
            runtimes.append(Runtime("transformers-cuda", md.dtype, str(ckpt), device="cuda", job={"dtype": md.dtype}))
        else:
            notes.append(f"transformers on the GPU skipped: torch without CUDA here, or a {md.dtype} model")


def _peers(runtimes: list[Runtime], notes: list[str], md, ckpt, config: BenchConfig, precisions: tuple[str, ...],
           work_dir: Path, progress: Callable[[str], None]) -> None:
    """llama.cpp's and CTranslate2's rows at our precisions, their models converted from the same
    Hugging Face directory."""
    found, missing = peers.find_peers(config.peers_dir)
    notes += missing
    hf_dir = Path(config.hf_dir) if config.hf_dir else None
    if hf_dir is None and ckpt is not None and (Path(ckpt) / "config.json").is_file():
        hf_dir = Path(ckpt)  # an HF directory as the checkpoint: the peers convert the same one
    if found and hf_dir is None:
        notes += [f"{name} skipped: no --hf-dir given (the Hugging Face directory OUTDIR was converted from, "
                  "which the peers convert with their own tools)" for name in found]
        return
    if found and hf_dir.name != (md.manifest.get("source") or {}).get("checkpoint", hf_dir.name):
        notes.append(f"the peers' models come from {hf_dir}, but OUTDIR was converted from "
                     f"{md.manifest['source']['checkpoint']!r}: check that they hold the same weights")
    for name, tools in found.items():
        wanted = {peers.SAME_PRECISION[name].get(p) for p in precisions} - {None}
        if not wanted:
            notes.append(f"{name} skipped: none of its weights is at the precisions asked for "
                         f"({', '.join(precisions)})")
            continue
        try:
            models = peers.prepare_models(name, tools, hf_dir, work_dir, progress)
        except GptExportError as e:
            notes.append(f"{name} skipped: {e}")
            continue
        runtimes += [Runtime(name, m.weights, str(m.path), (m.weight_bytes, None),
                             job={"tools": tools, "weights": m.weights})
                     for m in models if m.weights in wanted]


def _bands(items: list):
    """The element-wise [min, max] of equally shaped dicts of numbers (None where not a number)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _bands([it[k] for it in items if k in it]) for k in first}
    nums = [x for x in items if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x]
    return [min(nums), max(nums)] if nums and len(nums) == len(items) else None


def _medians(items: list):
    """The element-wise median of equally shaped dicts of numbers (strings and None are kept)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _medians([it[k] for it in items if k in it]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(items)
    return first


def _bench_runtime(c, runtime: Runtime, config: BenchConfig, progress: Callable[[str], None]) -> Result:
    result = Result(runtime.name, runtime.weights, runtime.device, runtime.variant, *(runtime.sizes or (None, None)))
    name, weights = runtime.name + (f" ({runtime.variant})" if runtime.variant else ""), runtime.weights
    base = {"runtime": runtime.name, "path": runtime.path, "threads": config.threads, "seed": config.seed,
            "vocab_size": c.vocab_size, "repeats": config.repeats, "budget_s": config.budget_s,
            "device": runtime.device, **runtime.job}
    once = peers.run_job if runtime.peer else None
    for b in config.batches:
        job = {**base, "batch": b, "prompt_tokens": config.prompt_tokens, "new_tokens": config.new_tokens}
        m = run_worker(job, config.max_others, once=once)
        result.note = m.get("about", result.note)
        keys = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "others_cpu")
        result.by_batch[str(b)] = {k: m[k] for k in keys}
        progress(f"{name} {weights} batch {b}: decode {m['decode_tok_s']:.1f} tok/s, "
                 f"prefill {m['prefill_tok_s']:.0f} tok/s, TTFT {m['ttft_ms']:.0f} ms, RSS {m['peak_rss_mb']:.0f} MB "
                 f"(others used {m['others_cpu']:.0%} of the CPU)")
    for ctx in config.contexts:
        if ctx + config.context_new_tokens > c.block_size:
            skipped = f"contexts beyond block_size {c.block_size} skipped"
            result.note = result.note if skipped in result.note else "; ".join(filter(None, [result.note, skipped]))
            continue
        job = {**base, "batch": 1, "prompt_tokens": ctx, "new_tokens": config.context_new_tokens + 1, "context": True}
        result.ms_per_token_at[str(ctx)] = run_worker(job, config.max_others, once=once)["ms_per_token"]
        progress(f"{name} {weights} context {ctx}: {result.ms_per_token_at[str(ctx)]:.1f} ms/token")
    return result


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _torch_has_cuda() -> bool:
    """Whether torch here sees a CUDA device, asked in a subprocess: the bench never imports torch itself."""
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=False)
        return proc.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu() -> tuple[str, str]:
    """This CPU's model name and its vector flags of VECTOR_FLAGS (what every figure names)."""
    import platform

    cpuinfo = _read("/proc/cpuinfo").splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo if ln.startswith("flags")), [])
    return name, " ".join(f for f in VECTOR_FLAGS if f in flags)


def _machine() -> dict:
    import onnxruntime

    name, flags = cpu()
    return {"cpu": name, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "load_average": os.getloadavg()[0], "cpu_flags": flags}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
