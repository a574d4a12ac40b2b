"""Checkpoint -> model directory: torch.export to ONNX, validated against PyTorch before it is kept.

`convert(ckpt, out_dir)` writes into a temporary directory beside out_dir and renames it at the
end, so out_dir is either complete and validated or absent (or the old one, with --force).

Peak memory stays near the larger of (the PyTorch model) and (an ONNX Runtime session), never
their sum: the checkpoint's weights are memory-mapped and become the model's parameters
(checkpoint.load_model), the export writes them to model.onnx.data one tensor at a time, and
PyTorch's validation logits are computed before the model is freed and ONNX Runtime loads the file.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..artifacts.files import staging_dir, write_json_atomic
from ..artifacts.modeldir import FORMAT, FORMAT_VERSION, MANIFEST, ONNX_FILE, file_records
from ..config import GPTConfig, IOSpec, dynamic_dims, io_spec
from ..errors import GptExportError, UsageError
from .checkpoint import check_unchanged
from .loader import load_checkpoint, load_model
from .model import GPT, ExportableGPT

OPSET = 18
# Weights above this go to model.onnx.data beside model.onnx (protobuf caps a file at 2 GB anyway):
# ONNX Runtime memory-maps external data instead of parsing it out of the protobuf, which cuts a
# GPT-2-small session's RSS from 1.6x to 1.1x its weight bytes (peak at load: 2.0x to 1.4x).
EXTERNAL_DATA_BYTES = 64 * 1024**2
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Max |ORT - PyTorch| allowed on logits right after export, per dtype (logits are O(10)).
VALIDATION_ATOL = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}
# (batch, sequence, past_length of each row, capacity): prefill, decode, past 0 with batch > 1, a
# padded cache, and sequences at different lengths in one step (one of them with no past at all)
VALIDATION_SHAPES = [(1, 1, (0,), 0), (3, 5, (0, 0, 0), 0), (2, 1, (6, 6), 6), (2, 3, (4, 4), 9),
                     (3, 1, (7, 0, 3), 8)]


def _progress(msg: str) -> None:
    print(msg, flush=True)


def convert(ckpt: str | Path, out_dir: str | Path, *, dtype: str = "fp32", tokenizer: str | Path | None = None,
            force: bool = False, validate: bool = True, progress: Callable[[str], None] = _progress) -> Path:
    """Export the nanoGPT checkpoint `ckpt` into the model directory `out_dir` and return its path."""
    if dtype not in TORCH_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UsageError(f"{out_dir}: already exists; pass --force to replace it")
    from ..artifacts.tokenizer import find_tokenizer  # no torch; imported here to keep `import export` light

    t0 = time.perf_counter()
    checkpoint = load_checkpoint(ckpt)
    config, source, stamps = checkpoint.config, checkpoint.source_record(), checkpoint.stamps
    tok = find_tokenizer(Path(ckpt), checkpoint.train_config, Path(tokenizer) if tokenizer else None,
                         config.vocab_size)
    model = load_model(checkpoint, TORCH_DTYPES[dtype])
    del checkpoint  # the model holds the weights now, and nothing else may: see the module docstring
    cast = f", {source['precision']} weights cast to {dtype}" if source["precision"] != dtype else ""
    progress(f"loaded {ckpt}: {model.get_num_params(False) / 1e6:.2f}M parameters{cast}, "
             f"tokenizer {tok.name if tok else 'none (raw token ids)'} ({time.perf_counter() - t0:.1f}s)")
    spec = io_spec(config, dtype)
    with staging_dir(out_dir, force) as tmp:
        onnx_path = tmp / ONNX_FILE
        t = time.perf_counter()
        export_onnx(model, spec, onnx_path)
        progress(f"exported {ONNX_FILE} with torch.export, opset {OPSET} ({time.perf_counter() - t:.1f}s)")
        t = time.perf_counter()
        check_onnx(onnx_path, spec)
        cases = torch_cases(model, spec) if validate else []
        check_unchanged(stamps)  # the last read of the mapped weights is done: were they one checkpoint's?
        release_weights(model)  # before ONNX Runtime loads its own copy: never both at once
        del model
        gc.collect()
        if validate:
            err = check_against_onnx(cases, spec, onnx_path, VALIDATION_ATOL[dtype])
            progress(f"validated: {evaluator_name(spec)} matches PyTorch at {len(cases)} shapes, "
                     f"max |diff| {err:.2e} ({time.perf_counter() - t:.1f}s)")
        tok_json = None
        if tok is not None:  # the BPE files are copied in: the directory must stand alone
            tok_json = tok.save_files(tmp) if hasattr(tok, "save_files") else tok.to_json()
        write_json_atomic(tmp / MANIFEST, manifest(source, config, spec, dtype, tok_json, tmp))
    progress(f"wrote {out_dir} ({time.perf_counter() - t0:.1f}s)")
    return out_dir


def export_onnx(model: GPT, spec: IOSpec, path: Path) -> None:
    """torch.export the cached forward with dynamic batch, sequence, past and logit count."""
    c = model.config
    Dim = torch.export.Dim
    # Example sizes are all >= 2 and distinct: torch.export specialises sizes 0 and 1.
    batch, seq, past, n_logits = 2, min(3, c.block_size), min(4, c.block_size), 2
    param = next(model.parameters())
    past_shape = (batch, c.n_head, past, c.head_dim)
    args = (torch.zeros(batch, seq, dtype=torch.long), torch.full((batch,), past), torch.arange(n_logits),
            *[torch.zeros(past_shape, dtype=param.dtype) for _ in spec.past_names])
    # the spec names each input's dynamic dims; config.dynamic_dims gives their bounds
    dims = {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in dynamic_dims(c).items()}
    axes = {t.name: {i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} or None for t in spec.inputs}
    dynamic_shapes = {"input_ids": axes["input_ids"], "past_length": axes["past_length"],
                      "logit_positions": axes["logit_positions"], "past": tuple(axes[n] for n in spec.past_names)}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                ExportableGPT(model).eval(), args, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes,
                input_names=spec.input_names, output_names=spec.output_names, verbose=False)
    except Exception as e:  # torch.export raises many types; none is the user's fault
        raise GptExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    try:
        program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    finally:
        # The graph outlives this function: onnxscript's rewrite rules are module-level objects
        # that keep the last graph they matched (onnxscript 0.7). Its initializers wrap our
        # weights (the Linear ones as transposed numpy views, folded from Transpose nodes), so
        # detach them; the file has them now. release_weights() empties the Parameters that the
        # graph's replaced values still name.
        for value in program.model.graph.initializers.values():
            value.const_value = None


def release_weights(model: GPT) -> None:
    """Empty every parameter in place, so the weights' memory (or file mapping) is freed now,
    even where the exporter's leftovers still hold the Parameter objects (see export_onnx)."""
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs and warns about things that concern its developers, not our users."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_onnx(path: Path, spec: IOSpec) -> None:
    """onnx.checker, and every graph input/output has the spec's dtype and dims (symbolic stay symbolic)."""
    import onnx
    from onnx import helper

    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    graph_io = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for t in (*spec.inputs, *spec.outputs):
        if t.name not in graph_io:
            raise GptExportError(f"{path}: graph has no tensor {t.name!r} (I/O spec mismatch)")
        tt = graph_io[t.name].type.tensor_type
        got_dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        got_shape = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in tt.shape.dim)
        if got_dtype != t.dtype or not _dims_match(got_shape, t.shape):
            raise GptExportError(f"{path}: {t.name} is {got_dtype}{list(got_shape)}, "
                                 f"spec says {t.dtype}{list(t.shape)} (a dynamic dim was specialised?)")


def _dims_match(got: tuple, want: tuple) -> bool:
    if len(got) != len(want):
        return False
    # symbolic dims must stay symbolic (any name: the exporter may rename them), fixed ones equal
    return all(isinstance(g, str) and g != "" if isinstance(w, str) else g == w for g, w in zip(got, want))


def validation_feeds(config: GPTConfig, spec: IOSpec, batch: int, seq: int, past: int | tuple[int, ...],
                     capacity: int, rng: np.random.Generator, cache_dtype=np.float32) -> dict[str, np.ndarray]:
    """Random but valid feeds: tokens, and row b's past of past[b] valid positions (`past` for every
    row if one number) in a `capacity` buffer; the slots beyond are random too, as a shared cache's
    are (another row's, or a finished sequence's): the mask must hide them."""
    lengths = np.broadcast_to(np.asarray(past, dtype=np.int64), (batch,)).copy()
    feeds = {
        "input_ids": rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int64),
        "past_length": lengths,
        "logit_positions": np.arange(seq, dtype=np.int64),
    }
    for name in spec.past_names:
        buf = rng.standard_normal((batch, config.n_head, capacity, config.head_dim)).astype(np.float32)
        feeds[name] = buf.astype(cache_dtype)
    return feeds


def evaluator_name(spec: IOSpec) -> str:
    return "the ONNX reference evaluator" if spec.cache_dtype == "bfloat16" else "ONNX Runtime"


def onnx_evaluator(onnx_path: Path, spec: IOSpec) -> Callable[[dict], np.ndarray]:
    """feeds -> logits of the ONNX graph, on the CPU.

    ONNX Runtime's CPU provider runs fp32 and fp16 graphs (fp16 ops it has no kernel for run in
    fp32 between inserted casts, fp16 at their boundaries). It has no bfloat16 kernel for Add,
    MatMul, Softmax and most of our ops (onnxruntime 1.32: NOT_IMPLEMENTED), so a bf16 graph is
    run by onnx's reference evaluator: numpy with ml_dtypes, each op in its declared type (MatMul
    accumulates in fp32 and rounds to bf16, as TensorRT does). Slow, but it runs the very graph
    TensorRT builds, unchanged.
    """
    if spec.cache_dtype == "bfloat16":
        import onnx
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(onnx.load(str(onnx_path)))
        return lambda feeds: evaluator.run(["logits"], feeds)[0]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # A few runs only: pre-packing MatMul weights would hold a second copy of them for nothing
    # (it is the peak of a session's memory; see docs/performance.md).
    opts.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(["logits"], feeds)[0]


@dataclass
class ValidationCase:
    feeds: dict[str, np.ndarray]  # the ONNX graph's inputs
    logits: np.ndarray  # PyTorch's, float32
    shape: str  # for messages: batch=.. seq=.. past=..


def torch_cases(model: GPT, spec: IOSpec) -> list[ValidationCase]:
    """PyTorch's logits at VALIDATION_SHAPES (prefill, decode, batched, a padded cache) on random feeds."""
    rng = np.random.default_rng(0)
    param = next(model.parameters())
    cases = []
    for batch, seq, past, capacity in VALIDATION_SHAPES:
        seq = min(seq, model.config.block_size - max(past))
        feeds = validation_feeds(model.config, spec, batch, seq, past, capacity, rng)
        with torch.no_grad():
            t = {k: torch.from_numpy(v) for k, v in feeds.items()}
            past_t = [t[n].to(param.dtype) for n in spec.past_names]
            feeds.update({n: _to_numpy(p) for n, p in zip(spec.past_names, past_t)})  # the same values for ONNX
            logits, _ = model.forward_cached(t["input_ids"], t["past_length"], t["logit_positions"], past_t)
        cases.append(ValidationCase(feeds, logits.float().numpy(), f"batch={batch} seq={seq} past={past}"))
    return cases


def check_against_onnx(cases: list[ValidationCase], spec: IOSpec, onnx_path: Path, atol: float) -> float:
    """Run the ONNX on the CPU (onnx_evaluator) on each case's feeds; fail beyond atol of PyTorch's logits."""
    run = onnx_evaluator(onnx_path, spec)
    worst = 0.0
    for case in cases:
        err = float(np.abs(run(case.feeds) - case.logits).max())
        worst = max(worst, err)
        if not err <= atol:
            raise GptExportError(f"{onnx_path.name}: {evaluator_name(spec)} logits differ from PyTorch by {err:.3g} "
                                 f"(> {atol}) at {case.shape}")
    return worst


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def manifest(source: dict, config: GPTConfig, spec: IOSpec, dtype: str, tokenizer: dict | None, root: Path) -> dict:
    """gptexport.json; `source` is Checkpoint.source_record(): file, kind, stored precision, training step."""
    import onnx

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "onnx": ONNX_FILE,
        "opset": OPSET,
        "dtype": dtype,
        "config": config.to_dict(),
        "io_spec": spec.to_dict(),
        "tokenizer": tokenizer,
        "source": source,
        "versions": {"gptexport": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": file_records(root),
    }
