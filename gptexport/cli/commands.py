"""The commands of `gptexport`: each a thin shell over one library call."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import GptExportError, ParameterError, UsageError
from ..runtime.sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING, DEFAULT_SEED
from ..runtime.scheduler import PREFILL_CHUNK
from ..runtime.session import DEFAULT_MAX_BATCH
from . import inputs
from .app import main


@main.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Weights and cache precision; LayerNorm, softmax and logits stay fp32.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="meta.pkl, or a directory with meta.pkl or GPT-2's encoder.json + vocab.bpe.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch check (not recommended).")
def convert(ckpt: Path, out_dir: Path, dtype: str, tokenizer: Path | None, force: bool, no_validate: bool) -> None:
    """Convert a nanoGPT ckpt.pt (or a local Hugging Face GPT-2 directory) into a model directory."""
    from ..convert.export import convert as run_convert

    run_convert(ckpt, out_dir, dtype=dtype, tokenizer=tokenizer, force=force, validate=not no_validate)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text (default: a newline, as nanoGPT's sample.py).")
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None,
              help="Read the prompt from a file (- reads standard input).")
@click.option("--prompt-tokens", default=None, help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Many prompts: one per line, or JSON Lines with per-prompt settings; results as JSON Lines.")
@click.option("--max-batch", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH, show_default=True,
              help="With --prompts: sequences generated at once, in one forward per step.")
@click.option("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, show_default=True)
@click.option("--temperature", type=float, default=DEFAULT_SAMPLING.temperature, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=DEFAULT_SAMPLING.top_k, show_default=True, help="0: no top-k.")
@click.option("--top-p", type=float, default=DEFAULT_SAMPLING.top_p, help="Nucleus sampling, in (0, 1].")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
              help="> 1 discourages every token seen (prompt included), as Hugging Face's processor.")
@click.option("--presence-penalty", type=float, default=0.0, show_default=True,
              help="Subtracted from each seen token's logit (after the temperature, as TensorRT-LLM).")
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True,
              help="Times each seen token's count, subtracted from its logit.")
@click.option("--stop-word", "stop_words", multiple=True, help="Stop after the token that completes it; repeatable.")
@click.option("--bad-word", "bad_words", multiple=True, help="Never complete this word; repeatable.")
@click.option("--end-id", type=int, default=None, help="Stop when this token is sampled (it is not output).")
@click.option("--min-tokens", type=int, default=0, show_default=True,
              help="No stop (end id, stop word) before this many tokens.")
@click.option("--logprobs", is_flag=True, help="With --json: each token's log-probability.")
@click.option("--num-samples", type=int, default=1, show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True,
              help="onnxruntime (CPU), ort-cuda, ort-tensorrt, or tensorrt (an engine built by `gptexport build`).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for ONNX Runtime (default: all cores).")
@click.option("--tf32", is_flag=True, help="ort-cuda: let fp32 matmuls use TF32 (faster, less exact; off by default).")
@click.option("--no-cuda-graphs", is_flag=True, help="ort-cuda, tensorrt: run decode steps without CUDA graphs.")
@click.option("--kernels", type=click.Choice(["off", "auto", "on"]), default="auto", show_default=True,
              help="onnxruntime: run the int4 and int8 matmuls and the float32 attention on gptexport's own CPU "
                   "kernels (auto: when they build here; on: fail if they cannot).")
@click.option("--verbose", is_flag=True, help="Say on stderr whether the kernels run, and why not.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of streaming text.")
def generate(model_dir: Path, prompt: str | None, prompt_file: Path | None, prompt_tokens: str | None,
             prompts_file: Path | None, max_batch: int, num_samples: int, backend: str, threads: int | None,
             tf32: bool, no_cuda_graphs: bool, kernels: str, verbose: bool, as_json: bool, **settings) -> None:
    """Sample text from a model directory, streaming it as it is produced (or many prompts at once)."""
    from ..artifacts.modeldir import load_model_dir
    from ..runtime.session import GenerationSession, generate_samples

    # settings: the flags named as params.SETTINGS names them (--top-k is top_k)
    if verbose:
        show_kernels_log()
    runner_options = dict(tf32=tf32, cuda_graphs=False if no_cuda_graphs else None,
                          kernels=None if kernels == "auto" else kernels)
    if prompts_file is not None:
        if any(x is not None for x in (prompt, prompt_file, prompt_tokens)) or num_samples != 1:
            raise UsageError("--prompts: give the prompts in the file, without --prompt, --prompt-file, "
                             "--prompt-tokens or --num-samples")
        items, line_numbers = inputs.read_batch_file(prompts_file)
        with GenerationSession.open(model_dir, backend, threads, max_batch, **runner_options) as session:
            return generate_many(session, prompts_file, items, line_numbers, session.params(settings))
    md = load_model_dir(model_dir)  # once: the session below takes it as loaded, and its tokenizer
    ids = inputs.prompt_ids(prompt, prompt_file, prompt_tokens, md.tokenizer(), md.config.vocab_size)
    stream = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    with GenerationSession.open(md, backend, threads, **runner_options) as session:
        samples = generate_samples(session, prompt_ids=ids, params=session.params(settings),
                                   num_samples=num_samples, stream=stream)
    if as_json:
        click.echo(json.dumps({"samples": [s.to_dict() for s in samples]}, ensure_ascii=False))


def show_kernels_log() -> None:
    """The kernels' one line (on, or why not) as a `notice:` on stderr."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("notice: %(message)s"))
    logger = logging.getLogger("gptexport.kernels")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def generate_many(session, prompts_file: Path, items: list, line_numbers: list[int], params) -> None:
    """`generate --prompts FILE`: every line through the scheduler; JSON Lines in input order on
    stdout as they complete, a progress line on stderr."""
    from ..runtime.batch import generate_batch

    tty = sys.stderr.isatty()

    def write(i: int, sample) -> None:
        click.echo(json.dumps({"index": i, "line": line_numbers[i], **sample.to_dict(), "finish": sample.finish},
                              ensure_ascii=False))

    def progress(p) -> None:
        if tty:
            bar = "#" * (30 * p.done // p.total)
            click.echo(f"\r[{bar:<30}] {p.done}/{p.total} sequences, {p.tokens} tokens, "
                       f"{p.tokens / max(p.seconds, 1e-9):.0f} tok/s", err=True, nl=False)

    try:
        samples = generate_batch(session, items, params=params, on_result=write, progress=progress)
    except ParameterError as e:
        if not e.param.startswith("items["):
            raise
        index, _, param = e.param[len("items["):].partition("].")
        raise GptExportError(f"{prompts_file} line {line_numbers[int(index)]}: {param} {e.problem}") from None
    tokens = sum(len(s.tokens) for s in samples)
    click.echo(("\n" if tty else "") + f"notice: generated {len(samples)} sequences, {tokens} tokens", err=True)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path), metavar="[CKPT] OUTDIR")
@click.option("--backends", default="all", show_default=True,
              help="Comma-separated: onnxruntime, ort-cuda, ort-tensorrt, tensorrt; or all.")
@click.option("--prompt", "prompt_texts", multiple=True, help="A prompt text; repeat for more prompts.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="A file of prompts, one per line (a literal \\n is a newline); - reads standard input.")
@click.option("--prompt-tokens", multiple=True, help="A prompt as comma-separated token ids; repeatable.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Tokens generated per prompt [default: 32].")
@click.option("--tolerance", type=click.Choice(["fp32", "tf32", "fp16", "bf16", "int8", "int4"]), default=None,
              help="Logit tolerance preset [default: the model directory's dtype; tf32 with --tf32].")
@click.option("--atol", type=float, default=None, help="Absolute logit tolerance (instead of --tolerance).")
@click.option("--rtol", type=float, default=None, help="Relative logit tolerance (instead of --tolerance).")
@click.option("--temperature", type=float, default=None,
              help="Sampling temperature of the KL and sampling checks [default: 0.8].")
@click.option("--top-k", type=int, default=None, help="Sampling top-k [default: 200].")
@click.option("--top-p", type=float, default=None, help="Sampling top-p, in (0, 1].")
@click.option("--seed", type=int, default=None, help="Seed of the sampling check [default: 1337].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for ONNX Runtime.")
@click.option("--tf32", is_flag=True,
              help="Run ort-cuda with TF32 matmuls; an fp32 directory is then held to the tf32 preset.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Write every number to this JSON file.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="Write a PNG of the per-position logit error of each backend.")
@click.option("--save-golden", type=click.Path(path_type=Path), default=None,
              help="Also write the reference inputs and outputs to this .npz, for --golden.")
@click.option("--golden", type=click.Path(path_type=Path), default=None,
              help="Check OUTDIR against a golden file instead of CKPT; needs no torch.")
def parity(paths: tuple[Path, ...], backends: str, prompt_texts: tuple[str, ...], prompts_file: Path | None,
           prompt_tokens: tuple[str, ...], steps: int | None, tolerance: str | None, atol: float | None,
           rtol: float | None, temperature: float | None, top_k: int | None, top_p: float | None,
           seed: int | None, threads: int | None, tf32: bool, json_path: Path | None, plot_path: Path | None,
           save_golden: Path | None, golden: Path | None) -> None:
    """Check that every backend reproduces the PyTorch model: forward, generation, sampling, cache.

    `gptexport parity CKPT OUTDIR` compares with CKPT in PyTorch fp32; `gptexport parity --golden
    FILE OUTDIR` with a golden file. Exit 0: all checks pass; 1: a check fails; 2: usage error.
    """
    from ..runtime.sampling import DEFAULT_SAMPLING as d
    from ..runtime.sampling import SamplingParams
    from ..verify.parity import ParityOptions, run_parity
    from ..verify.report import plot_report, write_json_report

    ckpt, out_dir = inputs.parity_paths(paths, golden)
    sampling = None
    if any(v is not None for v in (temperature, top_k, top_p)):  # unset ones: `gptexport generate`'s defaults
        sampling = SamplingParams(d.temperature if temperature is None else temperature,
                                  d.top_k if top_k is None else top_k, top_p)
    options = ParityOptions(prompts=inputs.prompt_sources(prompt_texts, prompts_file, prompt_tokens), steps=steps,
                            sampling=sampling, seed=seed, backends=backends, tolerance=tolerance, atol=atol,
                            rtol=rtol, threads=threads, tf32=tf32)
    report = run_parity(out_dir, ckpt, golden=golden, options=options, save_golden_to=save_golden,
                        progress=lambda msg: click.echo(msg, err=True))
    click.echo(report.table())
    if json_path is not None:
        write_json_report(report, json_path)
    if plot_path is not None:
        plot_report(report, plot_path)
    if not report:
        raise click.exceptions.Exit(1)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path), metavar="OUTDIR")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Largest batch the engine accepts.")
@click.option("--opt-seq", type=click.IntRange(min=1), default=None,
              help="Prompt length the prefill profile is tuned for [default: min(64, block_size)].")
@click.option("--workspace", "workspace_mb", type=click.IntRange(min=1), default=None,
              help="Builder workspace limit in MiB [default: TensorRT's, the GPU's memory].")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Timing cache file, read if present and updated [default: OUTDIR/timing.cache].")
@click.option("--tf32", is_flag=True, help="Let an fp32 engine use TF32 (off by default: fp32 means fp32).")
def build(model_dir: Path, max_batch: int, opt_seq: int | None, workspace_mb: int | None,
          timing_cache: Path | None, tf32: bool) -> None:
    """Build a TensorRT engine from OUTDIR/model.onnx (needs TensorRT 10/11 and an NVIDIA GPU).

    Two optimization profiles: prefill (past 0, any prompt length) and decode (one token, any
    cache length). Writes OUTDIR/model.engine and engine.json (TensorRT version, GPU, profiles,
    precision, ONNX sha256) and lists both in gptexport.json. See docs/tensorrt.md.
    """
    from ..build.engine import BuildOptions, build_engine

    build_engine(model_dir, BuildOptions(max_batch, opt_seq, workspace_mb, timing_cache, tf32))


@main.command()
@click.argument("path", type=click.Path(path_type=Path), metavar="(OUTDIR | FILE.onnx)")
@click.option("--target", type=click.Choice(["tensorrt"]), default="tensorrt", show_default=True,
              help="What to check the graph against.")
@click.option("--trt-version", type=click.Choice(["10", "11"]), default="10", show_default=True,
              help="TensorRT major version whose ONNX parser is targeted.")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="As for `gptexport build`: the profiles checked against the inputs.")
@click.option("--opt-seq", type=click.IntRange(min=1), default=None, help="As for `gptexport build`.")
def check(path: Path, target: str, trt_version: str, max_batch: int, opt_seq: int | None) -> None:
    """Check on a CPU that TensorRT can build OUTDIR's (or FILE.onnx's) graph; no TensorRT needed.

    Prints one line per offending node, input or initializer (op, dtype or attribute TensorRT's
    ONNX parser does not take; a dynamic dim without a profile range; oversized weights) and
    exits 1 if there is any.
    """
    from ..build.check import check_path

    report = check_path(path, trt_version, max_batch, opt_seq)
    for finding in report.findings:
        click.echo(f"{report.onnx_path}: {finding}")
    if report.findings:
        raise GptExportError(f"{report.onnx_path}: {len(report.findings)} problem(s) for TensorRT "
                             f"{trt_version}.x (listed above)")
    profiles = "every dynamic dim has a profile range" if report.profiles_checked else "profiles not checked"
    click.echo(f"ok: {report.onnx_path}: {report.nodes} nodes, {report.op_types} op types, opset {report.opset}: "
               f"TensorRT {trt_version}.x's ONNX parser takes them; {profiles}; no shape reads the value of "
               f"past_length or logit_positions (decode may run in a CUDA graph)")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path), metavar="OUTDIR")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory to write.")
@click.option("--int8", "method", flag_value="int8", help="int8 weights (ONNX Runtime dynamic quantization).")
@click.option("--int4", "method", flag_value="int4", help="int4 weights (ONNX Runtime MatMulNBits).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--eval-text", type=click.Path(path_type=Path), default=None,
              help="Report perplexity and top-1 agreement against OUTDIR on the end of this text file.")
@click.option("--eval-fraction", type=float, default=0.1, show_default=True,
              help="The held-out end of --eval-text (0.1: nanoGPT's validation split).")
def quantize(model_dir: Path, out_dir: Path, method: str | None, force: bool, eval_text: Path | None,
             eval_fraction: float) -> None:
    """Quantize an fp32 model directory's weights to int8 or int4 into a new model directory."""
    from ..convert.quantize import compare_quality
    from ..convert.quantize import quantize as run_quantize
    from ..errors import UsageError

    if method is None:
        raise UsageError("give --int8 or --int4")
    text = inputs.read_eval_text(eval_text) if eval_text is not None else None
    run_quantize(model_dir, out_dir, method, force=force)
    if text is not None:
        click.echo(json.dumps(compare_quality(model_dir, out_dir, text, eval_fraction).to_dict(), indent=2))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path), metavar="OUTDIR")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="The checkpoint OUTDIR was converted from: adds the nanoGPT and transformers baselines.")
@click.option("--backend", "backends", multiple=True,
              type=click.Choice(["onnxruntime", "ort-cuda", "ort-tensorrt", "tensorrt"]),
              help="Backends to time; repeatable [default: onnxruntime]. A GPU backend runs OUTDIR in its own dtype "
                   "and adds transformers on the same GPU when torch has CUDA.")
@click.option("--cuda-graphs", type=click.Choice(["on", "off", "both"]), default="on", show_default=True,
              help="GPU backends: decode with CUDA graphs, without, or both in the same run.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "int8", "int4"]),
              help="Precisions of the onnxruntime (CPU) rows; repeatable [default: all three].")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), help="Batch sizes [default: 1 and 8].")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--context", "contexts", multiple=True, type=click.IntRange(min=1),
              help="Context lengths of the decode-cost test [default: 64 and 900].")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Every runtime once per round; medians over the rounds.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True, help="Timed runs per round.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Where the int8/int4 model directories and the peers' models are made [default: beside OUTDIR].")
@click.option("--hf-dir", type=click.Path(path_type=Path), default=None,
              help="The Hugging Face directory OUTDIR was converted from: llama.cpp and CTranslate2 convert it with "
                   "their own tools and are timed beside us [default: --ckpt when it is one].")
@click.option("--peers", "peers_dir", type=click.Path(path_type=Path), default=None,
              help="Where scripts/prepare_peers.sh put the peers (peers.json) "
                   "[default: $GPTEXPORT_PEERS or ~/.cache/gptexport-peers].")
@click.option("--kernels", type=click.Choice(["both", "on", "off"]), default="both", show_default=True,
              help="fp32, int4 and int8 rows: with gptexport's CPU kernels (on), with ONNX Runtime's own ops "
                   "(off), or both.")
@click.option("--no-peers", is_flag=True, help="Leave llama.cpp and CTranslate2 out.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a PNG plot.")
def bench(model_dir: Path, ckpt: Path | None, backends: tuple[str, ...], cuda_graphs: str,
          precisions: tuple[str, ...], batches: tuple[int, ...],
          prompt_tokens: int, new_tokens: int, contexts: tuple[int, ...], rounds: int, repeats: int, threads: int,
          work_dir: Path | None, hf_dir: Path | None, peers_dir: Path | None, kernels: str, no_peers: bool,
          as_json: bool, plot_path: Path | None) -> None:
    """Benchmark OUTDIR on ONNX Runtime (fp32, int8, int4) or GPU backends against nanoGPT, transformers,
    llama.cpp and CTranslate2 (the peers: installed by scripts/prepare_peers.sh, else skipped with a note)."""
    from ..bench import report as r
    from ..bench import run as b

    graphs = {"on": (True,), "off": (False,), "both": (True, False)}[cuda_graphs]
    config = b.BenchConfig(prompt_tokens=prompt_tokens, new_tokens=new_tokens, batches=batches or (1, 8),
                           contexts=contexts or (64, 900), rounds=rounds, repeats=repeats, threads=threads,
                           backends=backends or ("onnxruntime",), cuda_graphs=graphs, peers=not no_peers,
                           peers_dir=str(peers_dir) if peers_dir else None, hf_dir=str(hf_dir) if hf_dir else None,
                           kernels=("off", "on") if kernels == "both" else (kernels,))
    report = b.run_bench(model_dir, ckpt, config, precisions or b.PRECISIONS, work_dir,
                         progress=lambda msg: click.echo(msg, err=True))
    click.echo(json.dumps(report, indent=2) if as_json else r.table(report))
    if plot_path is not None:
        r.plot(report, plot_path)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path), metavar="OUTDIR")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Model repository to write.")
@click.option("--name", default=None, help="Model name in the repository [default: OUTDIR's folder name].")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances (processes), each with its own runner and scheduler.")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequences in flight per instance, all in one forward per step (1: one request at a time).")
@click.option("--backend", type=click.Choice(["onnxruntime", "ort-cuda", "tensorrt"]), default="onnxruntime",
              show_default=True, help="Runner of each instance; ort-cuda and tensorrt run on GPU instances.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="The largest max_tokens a request may ask for.")
@click.option("--chat-template", default=None, metavar="FILE|NAME",
              help="A Jinja2 chat template (Hugging Face's form) for /v1/chat/completions, "
                   "or a shipped one: shakespeare.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=PREFILL_CHUNK, show_default=True,
              help="Prompt tokens prefilled per step, beside the running sequences' next tokens "
                   "(at most: with our CPU attention fewer as more sequences decode, e.g. 24 beside 16).")
@click.option("--max-cache-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="KV cache the running sequences of an instance may hold; more wait "
                   "[default: on the CPU a quarter of the machine's memory, shared by the instances].")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def triton(model_dir: Path, out_dir: Path, name: str | None, instances: int, max_batch: int, backend: str,
           max_tokens: int, chat_template: str | None, prefill_chunk: int, max_cache_mb: float | None,
           force: bool) -> None:
    """Write a Triton Inference Server model repository that serves OUTDIR (streaming, decoupled).

    The model is a Python-backend model running gptexport's own runtime, with TensorRT-LLM's
    tensor names (text_input, max_tokens, temperature, top_k, top_p, seed, stream, stop_words ->
    text_output); OUTDIR's files are copied into it. Start it with `gptexport serve OUT`.
    """
    from ..serve.repository import write_repository

    write_repository(model_dir, out_dir, name, instances, backend, max_tokens, force, max_batch, chat_template,
                     prefill_chunk, max_cache_mb)
    click.echo(f"wrote {out_dir}: start it with `gptexport serve {out_dir}`")


@main.command()
@click.argument("path", type=click.Path(path_type=Path), metavar="REPO|OUTDIR")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="Address the server listens on.")
@click.option("--openai-port", type=click.IntRange(0, 65535), default=9000, show_default=True,
              help="Port of the OpenAI-compatible API (/v1/completions, ...); 0: none.")
@click.option("--verbose", is_flag=True, help="Show tritonserver's log.")
def serve(path: Path, http_port: int, grpc_port: int, address: str, openai_port: int, verbose: bool) -> None:
    """Run a real tritonserver on a repository from `gptexport triton` (or on OUTDIR) until Ctrl-C.

    Uses the tritonserver on the PATH, else the one in the nvidia-pytriton wheel (see
    docs/serving.md for the install). Beside it, in this process, the OpenAI-compatible API on
    --openai-port, forwarding to the model.
    """
    from ..serve.server import serve as run_serve

    echo = (lambda line: click.echo(line, err=True)) if verbose else None
    run_serve(path, http_port, grpc_port, address, echo, say=lambda msg: click.echo(msg, err=True),
              openai_port=openai_port or None)
