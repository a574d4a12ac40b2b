"""Checkpoint -> model directory: torch.export to ONNX, validated against PyTorch before it is kept.

`convert(ckpt, out_dir)` writes into a temporary directory beside out_dir and renames it at the
end, so out_dir is either complete and validated or absent (or the old one, with --force).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .checkpoint import Checkpoint, load_checkpoint, load_model
from .config import GPTConfig, IOSpec, io_spec
from .errors import GptExportError, UsageError
from .model import GPT, ExportableGPT
from .modeldir import FORMAT, FORMAT_VERSION, MANIFEST, ONNX_FILE, file_records, staging_dir, write_json_atomic

OPSET = 18
# Weights above this go to model.onnx.data beside model.onnx (protobuf caps a file at 2 GB anyway):
# ONNX Runtime memory-maps external data instead of parsing it out of the protobuf, which cuts a
# GPT-2-small session's RSS from 1.6x to 1.1x its weight bytes (peak at load: 2.0x to 1.4x).
EXTERNAL_DATA_BYTES = 64 * 1024**2
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Max |ORT - PyTorch| allowed on logits right after export, per dtype (logits are O(10)).
VALIDATION_ATOL = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}
# (batch, sequence, past_length, capacity): prefill, decode, past 0 with batch > 1, a padded cache
VALIDATION_SHAPES = [(1, 1, 0, 0), (3, 5, 0, 0), (2, 1, 6, 6), (2, 3, 4, 9)]


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
    from .tokenizer import find_tokenizer  # no torch; imported here to keep `import export` light

    t0 = time.perf_counter()
    checkpoint = load_checkpoint(ckpt)
    model = load_model(checkpoint)
    tok = find_tokenizer(Path(ckpt), checkpoint.train_config, Path(tokenizer) if tokenizer else None,
                         checkpoint.config.vocab_size)
    progress(f"loaded {ckpt}: {model.get_num_params(False) / 1e6:.2f}M parameters, "
             f"tokenizer {tok.name if tok else 'none (raw token ids)'} ({time.perf_counter() - t0:.1f}s)")
    model = model.to(TORCH_DTYPES[dtype])
    spec = io_spec(model.config, dtype)
    with staging_dir(out_dir, force) as tmp:
        onnx_path = tmp / ONNX_FILE
        t = time.perf_counter()
        export_onnx(model, spec, onnx_path)
        progress(f"exported {ONNX_FILE} with torch.export, opset {OPSET} ({time.perf_counter() - t:.1f}s)")
        t = time.perf_counter()
        check_onnx(onnx_path, spec)
        if validate:
            err = validate_against_torch(model, spec, onnx_path, VALIDATION_ATOL[dtype])
            progress(f"validated: {evaluator_name(spec)} matches PyTorch at {len(VALIDATION_SHAPES)} shapes, "
                     f"max |diff| {err:.2e} ({time.perf_counter() - t:.1f}s)")
        tok_json = None
        if tok is not None:  # the BPE files are copied in: the directory must stand alone
            tok_json = tok.save_files(tmp) if hasattr(tok, "save_files") else tok.to_json()
        write_json_atomic(tmp / MANIFEST, manifest(checkpoint, model.config, spec, dtype, tok_json, tmp))
    progress(f"wrote {out_dir} ({time.perf_counter() - t0:.1f}s)")
    return out_dir


def export_onnx(model: GPT, spec: IOSpec, path: Path) -> None:
    """torch.export the cached forward with dynamic batch, sequence, past and logit count."""
    c = model.config
    Dim = torch.export.Dim
    # Example sizes are all >= 2 and distinct: torch.export specialises sizes 0 and 1.
    batch, seq, past, n_logits = 2, min(3, c.block_size), min(4, c.block_size), 2
    dyn_batch = Dim("batch", min=1, max=4096)
    dyn_past = Dim("past_sequence", min=0, max=c.block_size)
    param = next(model.parameters())
    past_shape = (batch, c.n_head, past, c.head_dim)
    args = (torch.zeros(batch, seq, dtype=torch.long), torch.tensor([past]), torch.arange(n_logits),
            *[torch.zeros(past_shape, dtype=param.dtype) for _ in spec.past_names])
    dynamic_shapes = {
        "input_ids": {0: dyn_batch, 1: Dim("sequence", min=1, max=c.block_size)},
        "past_length": None,
        "logit_positions": {0: Dim("num_logits", min=1, max=c.block_size)},
        "past": tuple({0: dyn_batch, 2: dyn_past} for _ in spec.past_names),
    }
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                ExportableGPT(model).eval(), args, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes,
                input_names=spec.input_names, output_names=spec.output_names, verbose=False)
    except Exception as e:  # torch.export raises many types; none is the user's fault
        raise GptExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)


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


def validation_feeds(config: GPTConfig, spec: IOSpec, batch: int, seq: int, past: int, capacity: int,
                     rng: np.random.Generator, cache_dtype=np.float32) -> dict[str, np.ndarray]:
    """Random but valid feeds: tokens, a past of `past` valid positions in a `capacity` buffer."""
    feeds = {
        "input_ids": rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int64),
        "past_length": np.array([past], dtype=np.int64),
        "logit_positions": np.arange(seq, dtype=np.int64),
    }
    for name in spec.past_names:
        buf = np.zeros((batch, config.n_head, capacity, config.head_dim), dtype=np.float32)
        buf[:, :, :past] = rng.standard_normal((batch, config.n_head, past, config.head_dim))
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

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(["logits"], feeds)[0]


def validate_against_torch(model: GPT, spec: IOSpec, onnx_path: Path, atol: float) -> float:
    """Run the ONNX on the CPU (onnx_evaluator) and the model in PyTorch on the same feeds; fail beyond atol."""
    run = onnx_evaluator(onnx_path, spec)
    rng = np.random.default_rng(0)
    param = next(model.parameters())
    worst = 0.0
    for batch, seq, past, capacity in VALIDATION_SHAPES:
        seq = min(seq, model.config.block_size - past)
        feeds = validation_feeds(model.config, spec, batch, seq, past, capacity, rng)
        ort_feeds = dict(feeds)
        with torch.no_grad():
            t = {k: torch.from_numpy(v) for k, v in feeds.items()}
            past_t = [t[n].to(param.dtype) for n in spec.past_names]
            for n, p in zip(spec.past_names, past_t):
                ort_feeds[n] = _to_numpy(p)
            logits, _ = model.forward_cached(t["input_ids"], t["past_length"], t["logit_positions"], past_t)
        got = run(ort_feeds)
        err = float(np.abs(got - logits.float().numpy()).max())
        worst = max(worst, err)
        if not err <= atol:
            raise GptExportError(f"{onnx_path.name}: {evaluator_name(spec)} logits differ from PyTorch by {err:.3g} "
                                 f"(> {atol}) at batch={batch} seq={seq} past={past}")
    return worst


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def manifest(checkpoint: Checkpoint, config: GPTConfig, spec: IOSpec, dtype: str, tokenizer: dict | None,
             root: Path) -> dict:
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
        "source": {"checkpoint": Path(checkpoint.path).name, "kind": checkpoint.kind,
                   "iter_num": checkpoint.iter_num, "best_val_loss": checkpoint.best_val_loss},
        "versions": {"gptexport": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": file_records(root),
    }
