"""`gptexport parity`: numbers showing that every backend reproduces the PyTorch model.

The reference is the checkpoint's GPT in PyTorch fp32 (reference.py), or a golden file of
its outputs (golden.py) on a box without torch. Every backend gets exactly the reference's inputs
and is checked four ways (see docs/parity.md):

  forward     logits at every prefill position and at decode steps with the cache
  generation  greedy tokens for `steps` steps; a divergence at a near-tie is not a failure
  sampling    the same seed gives the same sampled tokens
  cache       decode with the cache (and the block_size crop) against a full recompute
plus, once, `sampler`: the numpy sampler's probabilities against nanoGPT's torch code.

The comparison math is small pure numpy functions; torch is imported only to build a reference
from a checkpoint, matplotlib only to plot. This module never imports torch by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts.modeldir import ModelDir, load_model_dir
from ..errors import BackendUnavailable, GptExportError, ParameterError, TokenizerError, UsageError
from ..runtime.backends import BACKENDS, open_runner, resolve_backends
from ..runtime.backends.base import Runner
from ..runtime.sampling import DEFAULT_SAMPLING, DEFAULT_SEED, SamplingParams
from .checks import Check, backend_checks, sampler_check
from .golden import Reference, load_golden, save_golden
from .reference import build_reference
from .report import ParityReport
from .tolerance import tolerance_for

DEFAULT_STEPS = 32
DEFAULT_PROMPTS = ("\n", "First Citizen:\n", "The meaning of life is")


@dataclass
class ParityOptions:
    """What to run and how strictly. prompts: texts (encoded with the model's tokenizer) or id lists.

    prompts, steps, sampling and seed left None are DEFAULT_PROMPTS, DEFAULT_STEPS and `gptexport
    generate`'s sampling defaults, or, against a golden file, the file's own (then none may be given).
    """

    prompts: list[str | list[int]] | None = None
    steps: int | None = None
    sampling: SamplingParams | None = None
    seed: int | None = None
    backends: tuple[str, ...] | str = BACKENDS  # names, or "all" / "a,b"
    tolerance: str | None = None  # preset name; None: the model directory's dtype
    atol: float | None = None
    rtol: float | None = None
    threads: int | None = None
    tf32: bool = False  # ort-cuda runs fp32 matmuls in TF32; an fp32 directory's default preset becomes tf32


def resolve_prompts(prompts: list[str | list[int]] | None, md: ModelDir) -> list[np.ndarray]:
    """Token id arrays of the prompts; texts go through the model directory's tokenizer."""
    from ..artifacts.tokenizer import check_token_ids

    tok, vocab = md.tokenizer(), md.config.vocab_size
    if not prompts:
        prompts = _default_prompts(tok, vocab)
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tok is None:
                raise UsageError("this model directory has no tokenizer: give prompts with --prompt-tokens")
            p = tok.encode(p)
        if len(p) == 0:
            raise UsageError("a prompt is empty: give at least one token")
        check_token_ids(list(p), vocab)
        out.append(np.asarray(p, dtype=np.int64))
    return out


def _default_prompts(tok, vocab: int) -> list[list[int]]:
    if tok is not None:
        try:
            return [tok.encode(text) for text in DEFAULT_PROMPTS]
        except TokenizerError:
            pass  # a vocabulary without these characters: fall back to token ids
    return [[0], [(7 * i + 3) % vocab for i in range(12)]]


SHAPE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "activation")


def check_same_model(ref: Reference, md: ModelDir) -> None:
    """A reference and a model directory of different architectures cannot be compared at all."""
    a, b = ref.config.to_dict(), md.config.to_dict()
    diff = [f"{k} {a[k]} vs {b[k]}" for k in SHAPE_FIELDS if a.get(k) != b.get(k)]
    if diff:
        raise GptExportError(f"{md.path}: model differs from the reference {ref.source} ({', '.join(diff)}); "
                             "was it converted from another checkpoint?")


def open_backend(name: str, md: ModelDir, threads: int | None, tf32: bool = False) -> Runner:
    """The activated runner; BackendUnavailable when its library, provider, GPU or engine is missing.
    `tf32` applies to ort-cuda (a TensorRT engine's TF32 was chosen at build)."""
    if name == "tensorrt" and "tensorrt" not in md.manifest:  # the manifest records a built engine
        raise BackendUnavailable(f"{md.path} has no TensorRT engine (build one with `gptexport build {md.path}`)")
    if name == "onnxruntime" and md.dtype == "bf16":  # a known gap, not a broken export
        raise BackendUnavailable("ONNX Runtime's CPU provider has no bfloat16 kernels (Add, MatMul, Softmax); "
                                 "check a bf16 model on ort-cuda or tensorrt")
    try:
        runner = open_runner(name, md, threads, tf32=tf32 and name == "ort-cuda")
        runner.activate()
    except ImportError as e:  # e.g. the TensorRT runner or its bindings not installed
        raise BackendUnavailable(f"not installed here ({e})") from e
    return runner


def run_parity(model_dir: str | Path, ckpt: str | Path | None = None, *, golden: str | Path | None = None,
               options: ParityOptions | None = None, save_golden_to: str | Path | None = None,
               progress: Callable[[str], None] | None = None) -> ParityReport:
    """Check every backend of `model_dir` against `ckpt` in PyTorch fp32, or against a golden file.

    With `golden` torch is never imported; prompts, steps and sampling settings then come from
    the file. `save_golden_to` writes the reference built from `ckpt` for later golden runs.
    """
    options, say = options or ParityOptions(), progress or (lambda m: None)
    if (ckpt is None) == (golden is None):
        raise UsageError("give either a checkpoint CKPT or --golden FILE, exactly one")
    if golden is not None and save_golden_to is not None:
        raise UsageError("--save-golden needs CKPT: a golden file is written from the PyTorch reference")
    if options.steps is not None and options.steps < 1:
        raise ParameterError("steps", f"must be >= 1, got {options.steps}")
    backends = resolve_backends(options.backends)
    md = load_model_dir(model_dir)
    precision = md.manifest.get("quantization") or md.dtype  # `gptexport quantize` keeps dtype fp32
    if options.tf32 and precision == "fp32":
        precision = "tf32"
    tol = tolerance_for(precision, options.tolerance, options.atol, options.rtol)
    notes: list[str] = []
    ref = _reference(md, ckpt, golden, options, say, notes)
    check_same_model(ref, md)
    if save_golden_to is not None:
        say(f"wrote golden file {save_golden(ref, save_golden_to)}")
    source = ref.source if golden is None else f"{golden} (golden file of {ref.source})"
    settings = {"prompts": [p.tolist() for p in ref.prompts], "steps": ref.steps, "sampling": ref.sampling,
                "seed": ref.seed, "backends": backends, "tf32": options.tf32,
                "source_precision": ref.source_precision}
    if ref.source_precision not in (None, "fp32"):
        notes.append(f"the checkpoint stores its weights in {ref.source_precision}: the reference runs them "
                     "upcast to fp32")
    report = ParityReport(tol, source, str(md.path), settings, notes=notes)
    report.checks.append(sampler_check(ref.sampler_logits, ref.probes, ref.sampler_probs))
    for name in backends:
        check_backend(report, name, md, ref, options.threads, say, options.tf32)
    return report


def check_backend(report: ParityReport, name: str, md: ModelDir, ref: Reference, threads: int | None,
                  say: Callable[[str], None], tf32: bool = False) -> None:
    """Add one backend's checks to `report`, or the reason it cannot run here to report.skipped."""
    try:
        runner = open_backend(name, md, threads, tf32)
    except UsageError:
        raise
    except BackendUnavailable as e:
        report.skipped[name] = str(e)
        say(f"{name}: skipped ({e})")
        return
    except GptExportError as e:  # it could run here but cannot load the model: a failure
        report.checks.append(Check("run", name, False, f"cannot load: {e}"))
        return
    say(f"{name}: checking")
    try:
        report.checks += backend_checks(name, runner, ref, report.tolerance)
    finally:
        runner.deactivate()


def _reference(md: ModelDir, ckpt, golden, options: ParityOptions, say: Callable[[str], None],
               notes: list[str]) -> Reference:
    if golden is not None:
        if options.prompts or any(v is not None for v in (options.steps, options.sampling, options.seed)):
            raise UsageError("--golden: prompts, --steps, --seed and sampling settings come from the golden file; "
                             "drop them")
        ref = load_golden(golden)
        say(f"reference: golden file {golden} ({len(ref.prompts)} prompts, {ref.steps} steps)")
        return ref
    prompts = resolve_prompts(options.prompts, md)
    block = md.config.block_size
    notes += [f"prompt {i} has {len(p)} tokens, more than block_size {block}: its last {block} are used"
              for i, p in enumerate(prompts) if len(p) > block]
    steps = DEFAULT_STEPS if options.steps is None else options.steps
    say(f"reference: {ckpt} in PyTorch fp32 ({len(prompts)} prompts, {steps} steps)")
    return build_reference(ckpt, prompts, steps, options.sampling or DEFAULT_SAMPLING,
                           DEFAULT_SEED if options.seed is None else options.seed)
