"""Peers in the benchmark: llama.cpp and CTranslate2 on the same weights, each in a process of its own.

`bash scripts/prepare_peers.sh` installs them from the package registries and writes peers.json
({tool: absolute path}) into $GPTEXPORT_PEERS (default ~/.cache/gptexport-peers). From the Hugging
Face directory our model was converted from, the bench converts the peers' models with the peers'
own tools, once (they are remade when the directory's weights are newer):
  llama.cpp    convert_hf_to_gguf.py --outtype f32, then llama-quantize to q8_0 and q4_0 (its
               default mix: q4_0 keeps the tied token_embd/output tensor in q6_K)
  CTranslate2  ct2-transformers-converter --quantization float32 and int8
and measures them:
  llama.cpp    batch 1: llama-bench -p PROMPT -n NEW (prefill pp, decode tg); where prepare_peers.sh
               built llama-bench-amx (a CPU with AMX), decode tg from that one (-p 0 -n NEW);
               decode cost at a
               context: llama-bench -p 0 -n K -d CONTEXT; batch B: llama-batched-bench -npp PROMPT
               -ntg NEW -npl B (prompts not shared). Random tokens, no sampling: llama.cpp's tools
               time the forward passes only.
  CTranslate2  bench/ct2_worker.py, run by the CTranslate2 venv's python: greedy generate_batch,
               decode rate from the time for 16 + NEW new tokens minus the time for 16.
Each job returns what the gptexport worker returns (prefill and decode tok/s, TTFT, ms per token,
peak RSS) and the CPU seconds it used, for bench/run.py's rounds and its quiet-machine check.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import GptExportError

PEERS_ENV = "GPTEXPORT_PEERS"
PREPARE = "bash scripts/prepare_peers.sh"
LLAMA, CT2 = "llama.cpp", "CTranslate2"
NAMES = (LLAMA, CT2)
TOOLS = {LLAMA: ("llama-bench", "llama-batched-bench", "llama-quantize", "convert_hf_to_gguf.py",
                 "convert_hf_to_gguf-python"),
         CT2: ("ct2-transformers-converter", "ct2-python")}
OPTIONAL = {LLAMA: ("llama-bench-amx",)}  # used where listed
WEIGHTS = {LLAMA: ("f32", "q8_0", "q4_0"), CT2: ("fp32", "int8")}
# our precision -> the peer's weights at the same precision
SAME_PRECISION = {LLAMA: {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}, CT2: {"fp32": "fp32", "int8": "int8"}}
# ggml's AMX backend crashes on more than one row at a time in this llama.cpp (ggml-org/llama.cpp#20824)
# and runs one: its batch-1 decode is llama.cpp's fastest here, so it is taken where prepared
AMX_NOTE = "from an empty context; its prompts, contexts and batches crash: ggml-org/llama.cpp#20824"
CT2_QUANTIZATION = {"fp32": "float32", "int8": "int8"}
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CT2_BASE_TOKENS = 16  # decode rate = (time for BASE + N new tokens - time for BASE) / N
MB = 1e6
CONVERT_TIMEOUT_S = 1800
JOB_TIMEOUT_S = 900


def peers_dir(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get(PEERS_ENV) or Path.home() / ".cache" / "gptexport-peers").expanduser()


def find_peers(explicit: str | Path | None = None) -> tuple[dict[str, dict[str, str]], list[str]]:
    """({peer: {tool: path}} for every peer whose tools are all there, [a note for each one that is not])."""
    where = peers_dir(explicit)
    listing = where / "peers.json"
    try:
        paths = json.loads(listing.read_text())
        if not isinstance(paths, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {}, [f"{name} skipped: no {listing} (run {PREPARE})" for name in NAMES]
    except (OSError, ValueError) as e:
        return {}, [f"{name} skipped: {listing} unreadable: {e} (run {PREPARE})" for name in NAMES]
    found, notes = {}, []
    for name in NAMES:
        missing = [t for t in TOOLS[name] if t not in paths]
        gone = [t for t in TOOLS[name] if t in paths and not os.access(str(paths[t]), os.R_OK)]
        if missing or gone:
            why = (f"{', '.join(missing)} not in {listing}" if missing else
                   f"{', '.join(f'{t} ({paths[t]})' for t in gone)} listed in {listing} but not there")
            notes.append(f"{name} skipped: {why} (run {PREPARE})")
        else:
            found[name] = {t: str(paths[t]) for t in TOOLS[name]}
            found[name].update({t: str(paths[t]) for t in OPTIONAL.get(name, ())
                                if t in paths and os.access(str(paths[t]), os.X_OK)})
    return found, notes


@dataclass
class PeerModel:
    peer: str
    weights: str
    path: Path  # a GGUF file or a CTranslate2 directory

    @property
    def weight_bytes(self) -> int:
        return (self.path / "model.bin" if self.path.is_dir() else self.path).stat().st_size


def _weights_mtime(hf_dir: Path) -> float:
    """When the Hugging Face directory's weights (or config) last changed: a peer model older is remade."""
    files = [hf_dir / n for n in ("config.json", *HF_WEIGHTS)] + sorted(hf_dir.glob("*.safetensors"))
    times = [f.stat().st_mtime for f in files if f.is_file()]
    if not times:
        raise GptExportError(f"{hf_dir}: no config.json or weights: not a Hugging Face GPT-2 directory")
    return max(times)


def _fresh(out: Path, since: float) -> bool:
    marker = out / "model.bin" if out.suffix != ".gguf" else out
    return marker.is_file() and marker.stat().st_mtime > since


def models_dir(hf_dir: Path, work_dir: Path) -> Path:
    """work_dir/peers/<name>-<hash of its path>: two HF directories of the same name never share models."""
    tag = hashlib.sha256(str(hf_dir.resolve()).encode()).hexdigest()[:8]
    return work_dir / "peers" / f"{hf_dir.name}-{tag}"


def prepare_models(peer: str, tools: dict[str, str], hf_dir: str | Path, work_dir: str | Path,
                   progress: Callable[[str], None] = print) -> list[PeerModel]:
    """The peer's models of hf_dir's weights, converted with its own tools into work_dir (cached)."""
    hf_dir = Path(hf_dir)
    since = _weights_mtime(hf_dir)
    out = models_dir(hf_dir, Path(work_dir))
    out.mkdir(parents=True, exist_ok=True)
    models = []
    if peer == LLAMA:
        f32 = out / "model-f32.gguf"
        if not _fresh(f32, since):
            progress(f"llama.cpp: convert_hf_to_gguf.py {hf_dir} --outtype f32")
            tmp = f32.with_suffix(".tmp")
            _tool([tools["convert_hf_to_gguf-python"], tools["convert_hf_to_gguf.py"], str(hf_dir), "--outtype", "f32",
                   "--outfile", str(tmp)], out / "convert_hf_to_gguf.log")
            os.replace(tmp, f32)
        models.append(PeerModel(peer, "f32", f32))
        for q in WEIGHTS[LLAMA][1:]:
            path = out / f"model-{q}.gguf"
            if not _fresh(path, f32.stat().st_mtime):
                progress(f"llama.cpp: llama-quantize {q}")
                tmp = path.with_suffix(".tmp")
                _tool([tools["llama-quantize"], str(f32), str(tmp), q], out / f"llama-quantize-{q}.log")
                os.replace(tmp, path)
            models.append(PeerModel(peer, q, path))
    elif peer == CT2:
        for w in WEIGHTS[CT2]:
            path = out / f"ct2-{w}"
            if not _fresh(path, since):
                progress(f"CTranslate2: ct2-transformers-converter --quantization {CT2_QUANTIZATION[w]}")
                tmp = path.with_name(path.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                _tool([tools["ct2-transformers-converter"], "--model", str(hf_dir), "--output_dir", str(tmp),
                       "--quantization", CT2_QUANTIZATION[w]], out / f"ct2-{w}.log")
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
            models.append(PeerModel(peer, w, path))
    else:
        raise GptExportError(f"bench: unknown peer {peer!r}")
    return models


def _tool(cmd: list[str], log: Path) -> None:
    """Run a conversion tool; its output goes to log; a failure names the tool and its last line."""
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=CONVERT_TIMEOUT_S,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, check=False).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] or ["no output"]
        raise GptExportError(f"{Path(cmd[1] if cmd[0].endswith('python') else cmd[0]).name} failed ({code}): "
                             f"{lines[-1].strip()} (log: {log})")


# ---- measuring: one job, one process ----

def run_job(job: dict) -> tuple[dict, float]:
    """(the measurement, the CPU seconds its process used) of one peer job from bench/run.py."""
    if job["runtime"] == LLAMA:
        return _llama_job(job)
    if job["runtime"] == CT2:
        return _ct2_job(job)
    raise GptExportError(f"bench: unknown peer {job['runtime']!r}")


# The peer runs under a small Python that forks it and reports its peak RSS: a process forked from
# the bench itself would inherit the bench's peak (Linux carries ru_maxrss across fork and exec).
_RSS_MARK = "gptexport-bench peak_rss_kb="
_WRAPPER = f"""
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    except OSError as e:
        sys.stderr.write("%s: %s\\n" % (sys.argv[1], e))
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\\n{_RSS_MARK}%d\\n" % usage.ru_maxrss)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)  # a signal as a shell reports it: 128 + its number
"""


def _run(cmd: list[str], threads: int, what: str) -> tuple[str, float, float]:
    """(stdout, CPU seconds, peak RSS MB) of cmd, run in a process of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the peer is our only child meanwhile
    # a session of its own, so that a timeout or Ctrl-C ends the peer too, not only the wrapper
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT_S)
    except BaseException as e:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            raise GptExportError(f"bench {what}: no result after {JOB_TIMEOUT_S} s") from None
        raise
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    marks = [ln for ln in stderr.splitlines() if ln.startswith(_RSS_MARK)]
    err = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(_RSS_MARK)]
    if proc.returncode != 0:
        code = f"signal {proc.returncode - 128}" if proc.returncode > 128 else f"exit {proc.returncode}"
        raise GptExportError(f"bench {what} failed ({code}): {(err or ['no output'])[-1].strip()}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return stdout, cpu, int(marks[-1][len(_RSS_MARK):]) * 1024 / MB if marks else float("nan")


def _llama_job(job: dict) -> tuple[dict, float]:
    tools, threads, B, T, n = job["tools"], job["threads"], job["batch"], job["prompt_tokens"], job["new_tokens"]
    reps = max(1, job["repeats"])
    what = f"llama.cpp {job.get('weights', '')}".strip()

    def llama_bench(binary: str, prompt: int, gen: int, *depth: str) -> list[str]:
        return [binary, "-m", job["path"], "-p", str(prompt), "-n", str(gen), *depth, "-t", str(threads),
                "-r", str(reps), "-o", "json"]

    if B == 1 and job.get("context"):  # decode cost at a context: tg after a depth of T tokens (not timed)
        out, cpu, rss = _run(llama_bench(tools["llama-bench"], 0, n, "-d", str(T)), threads, what)
        tg = _llama_bench_rate(out, "tg")
        return {"prefill_tok_s": float("nan"), "decode_tok_s": tg, "ttft_ms": float("nan"), "ms_per_token": 1e3 / tg,
                "runs": reps, "peak_rss_mb": rss, "about": _llama_about(out)}, cpu
    if B == 1:
        # with an AMX build: prefill from the build without AMX, decode from the one with it (only
        # its one-row path runs); otherwise both from one llama-bench run
        amx = tools.get("llama-bench-amx")
        out, cpu, rss = _run(llama_bench(tools["llama-bench"], T, 0 if amx else n), threads, what)
        decode_out, about = out, _llama_about(out)
        if amx:
            decode_out, cpu_amx, rss_amx = _run(llama_bench(amx, 0, n), threads, what + " (AMX)")
            cpu, rss = cpu + cpu_amx, max(rss, rss_amx)
            about += f"; batch-1 decode from the AMX build ({AMX_NOTE})"
        pp, tg = _llama_bench_rate(out, "pp"), _llama_bench_rate(decode_out, "tg")
        return {"prefill_tok_s": pp, "decode_tok_s": tg, "ttft_ms": 1e3 * T / pp, "ms_per_token": 1e3 / tg,
                "runs": reps, "peak_rss_mb": rss, "about": about}, cpu
    # batch B: one untimed run first (llama-batched-bench warms up with 16 tokens of one sequence only)
    cmd = [tools["llama-batched-bench"], "-m", job["path"], "-c", str(B * (T + n)), "-npp", str(T), "-ntg", str(n),
           "-npl", ",".join([str(B)] * (reps + 1)), "-t", str(threads), "--output-format", "jsonl"]
    out, cpu, rss = _run(cmd, threads, what)
    rows = batched_bench_rows(out)[1:]
    if len(rows) != reps:
        raise GptExportError(f"bench {what}: llama-batched-bench printed {len(rows) + 1} results, expected {reps + 1}")
    tg = statistics.median(r["speed_tg"] for r in rows)
    t_pp = statistics.median(r["t_pp"] for r in rows)
    return {"prefill_tok_s": B * T / t_pp, "decode_tok_s": tg, "ttft_ms": 1e3 * t_pp, "ms_per_token": 1e3 * B / tg,
            "runs": reps, "peak_rss_mb": rss}, cpu


def llama_bench_tests(out: str) -> list[dict]:
    """llama-bench -o json's tests; each has n_prompt, n_gen, n_depth, avg_ts and samples_ts."""
    try:
        tests = json.loads(out)
    except ValueError as e:
        raise GptExportError(f"bench: llama-bench printed no JSON ({e}): {out[:200]!r}") from None
    if not isinstance(tests, list) or not all(isinstance(t, dict) and "avg_ts" in t for t in tests):
        raise GptExportError("bench: llama-bench's JSON is not a list of tests with avg_ts")
    return tests


def _llama_bench_rate(out: str, kind: str) -> float:
    """Tokens/s of the pp (prompt, n_gen 0) or tg (generation) test: the median of its samples."""
    tests = [t for t in llama_bench_tests(out) if (t.get("n_gen", 0) == 0) == (kind == "pp")]
    if len(tests) != 1:
        raise GptExportError(f"bench: llama-bench printed {len(tests)} {kind} tests, expected 1")
    return float(statistics.median(tests[0].get("samples_ts") or [tests[0]["avg_ts"]]))


def _llama_about(out: str) -> str:
    tests = llama_bench_tests(out)
    t = next((t for t in tests if "build_commit" in t), tests[0])
    return f"llama.cpp build {t.get('build_commit', '?')}, KV cache {t.get('type_k', '?')}/{t.get('type_v', '?')}"


def batched_bench_rows(out: str) -> list[dict]:
    """llama-batched-bench --output-format jsonl's results (pp, tg, pl, t_pp, speed_pp, t_tg, speed_tg, ...)."""
    rows = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "speed_tg" in row and "t_pp" in row:
                rows.append(row)
    return rows


def _ct2_job(job: dict) -> tuple[dict, float]:
    worker = Path(__file__).with_name("ct2_worker.py")
    spec = {k: job[k] for k in ("path", "threads", "batch", "prompt_tokens", "new_tokens", "repeats", "budget_s",
                                "seed", "vocab_size")}
    spec["base_tokens"] = CT2_BASE_TOKENS
    out, cpu, rss = _run([job["tools"]["ct2-python"], str(worker), json.dumps(spec)], job["threads"],
                         f"CTranslate2 {job.get('weights', '')}".strip())
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise GptExportError(f"bench: the CTranslate2 worker printed no result: {out[-200:]!r}")
    m = json.loads(lines[-1])
    m["peak_rss_mb"] = rss
    return m, cpu

