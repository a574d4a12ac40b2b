"""One benchmark measurement, in a process of its own: `python -m gptexport.bench.worker JOB`.

A job (a JSON dict, see bench/run.py) names a runtime and its settings; the worker loads it, generates
greedily from a random prompt, time-stamping every token as it is sampled, and prints one JSON line:
time to first token (prefill), then the mean time per token of the rest (decode), and its peak RSS.

Runtimes:
  gptexport-ort, gptexport-ort-cuda, gptexport-ort-tensorrt, gptexport-tensorrt
                 the model directory on that backend, the batch's rows as sequences of the generation
                 engine (`cuda_graphs` false: decode without CUDA graphs; `kernels` off|auto|on: the int4 and int8
                 matmuls on our CPU kernels, see backends/kernels.py)
  nanoGPT        gptexport.convert.model.GPT.generate: nanoGPT's loop, a full forward per new token (CPU)
  transformers   GPT2LMHeadModel.generate with its KV cache, on the job's `device` ("cpu" or "cuda",
                 there in the model directory's dtype: fp32 or fp16), in PyTorch's eager mode
Only the nanoGPT and transformers jobs import torch.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import GptExportError

MB = 1e6
GPTEXPORT = "gptexport-"
BACKEND_OF = {"gptexport-ort": "onnxruntime", "gptexport-ort-cuda": "ort-cuda",
              "gptexport-ort-tensorrt": "ort-tensorrt", "gptexport-tensorrt": "tensorrt"}

# A generator is gen(prompt (B, T) int64, n, stamp): generate n tokens greedily, calling stamp()
# as each one is sampled, so every runtime is timed token by token the same way.
Generator = Callable[[np.ndarray, int, Callable[[], None]], None]


def gptexport_generator(job: dict) -> Generator:
    """The rows of the prompt as sequences of the generation engine (the scheduler that `gptexport
    generate`, `--prompts` and the server run), greedy; stamped as the first row samples each token.
    With `grow`, the other rows run first with an eighth of the tokens, so the first row's admission
    grows the cache in every run; the generator's `graph_ids()` then says how many decode graphs the
    runner keeps (bounded however many runs: buckets.GraphArena)."""
    from ..artifacts.modeldir import load_model_dir
    from ..runtime.backends import open_runner
    from ..runtime.params import GenerationParams
    from ..runtime.sampling import SamplingParams
    from ..runtime.scheduler import Scheduler, Sequence

    runner = open_runner(BACKEND_OF[job["runtime"]], load_model_dir(job["path"], verify=False), job["threads"],
                         cuda_graphs=job.get("cuda_graphs"), kernels=job.get("kernels"))
    runner.activate()
    grow = bool(job.get("grow"))

    def gen(prompt: np.ndarray, n: int, stamp: Callable[[], None]) -> None:
        s = Scheduler(runner, max_batch=len(prompt))
        params = GenerationParams(n, SamplingParams(0.0), 0)
        if grow:
            for row in prompt[1:]:
                s.submit(Sequence(row.tolist(), GenerationParams(max(1, n // 8), SamplingParams(0.0), 0)))
            s.step()  # the short ones first: the cache grows under them as the long first row decodes
        for i, row in enumerate(prompt[:1] if grow else prompt):
            s.submit(Sequence(row.tolist(), params, (lambda seq, ids, text: stamp()) if i == 0 else None))
        s.run()

    arenas = getattr(runner, "graph_arenas", None)
    gen.graph_ids = lambda: arenas.graph_ids() if arenas is not None else 0
    return gen


def nanogpt_generator(job: dict) -> Generator:
    import torch

    from ..convert.loader import load_model

    torch.set_num_threads(job["threads"])
    model = load_model(job["path"]).float().eval()

    def gen(prompt: np.ndarray, n: int, stamp: Callable[[], None]) -> None:
        idx = torch.from_numpy(prompt)
        for _ in range(n):  # nanoGPT's generate one token at a time: the same full recompute per token
            idx = model.generate(idx, 1, top_k=1)  # top_k=1: greedy, like the other runtimes
            stamp()
    return gen


def transformers_generator(job: dict) -> Generator:
    import torch

    torch.set_num_threads(job["threads"])
    device = job.get("device", "cpu")
    model = hf_gpt2(job["path"])
    if device != "cpu":
        model = model.to(device, torch.float16 if job.get("dtype") == "fp16" else torch.float32)

    class Stamps:  # transformers' streamer protocol: put() the prompt, then each new token
        def __init__(self, stamp):
            self.stamp, self.prompt_seen = stamp, False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.stamp()  # generate() hands the streamer each token on the host: it has been computed
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def gen(prompt: np.ndarray, n: int, stamp: Callable[[], None]) -> None:
        ids = torch.from_numpy(prompt).to(device)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=0, streamer=Stamps(stamp))
    return gen


def hf_gpt2(ckpt: str):
    """The checkpoint as a transformers GPT2LMHeadModel (fp32, eval), weights copied over."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..convert.hf_dir import CONV1D_WEIGHTS
    from ..convert.loader import load_checkpoint

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


def generator(job: dict) -> Generator:
    runtime = job["runtime"]
    if runtime in BACKEND_OF:
        return gptexport_generator(job)
    if runtime == "nanoGPT":
        return nanogpt_generator(job)
    if runtime in ("transformers", "transformers-cuda"):
        return transformers_generator(job)
    raise GptExportError(f"bench: unknown runtime {runtime!r}")


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
    gen = generator(job)
    rng = np.random.default_rng(job["seed"])
    B, T, n = job["batch"], job["prompt_tokens"], job["new_tokens"]
    prompt = rng.integers(0, job["vocab_size"], (B, T), dtype=np.int64)
    # warm-up: first-run allocations and lazy initialisation; on a GPU the whole length, so the timed
    # runs reuse the cache slot (and the CUDA graph captured for it) of the same capacity
    gen(prompt, n if job.get("device", "cpu") != "cpu" else 2, lambda: None)
    runs, start = [], time.perf_counter()
    while len(runs) < job["repeats"] and (not runs or time.perf_counter() - start < job["budget_s"]):
        runs.append(_token_times(gen, prompt, n))
    first = statistics.median(r[0] for r in runs)
    step = statistics.median((r[-1] - r[0]) / (n - 1) for r in runs)
    result = {"prefill_tok_s": B * T / first, "decode_tok_s": B / step, "ttft_ms": first * 1e3,
              "ms_per_token": step * 1e3, "runs": len(runs), "peak_rss_mb": peak_rss() / MB}
    if hasattr(gen, "graph_ids"):
        result["graph_ids"] = gen.graph_ids()
    return result


def peak_rss() -> int:
    """This process's peak resident set in bytes since exec (VmHWM; ru_maxrss survives exec on Linux)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__" and len(sys.argv) == 2:
    try:
        print(json.dumps(measure(json.loads(sys.argv[1]))))
    except GptExportError as e:  # e.g. a backend that cannot run here: one line, for bench.run_worker
        print(" ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(1)
