"""Weight-only quantization of a model directory: int8 (dynamic) or int4 (MatMulNBits) weights.

`quantize(src_dir, out_dir, "int8" | "int4")` writes a complete model directory: the quantized
model.onnx (its layer norms and GELUs fused into ONNX Runtime's CPU ops, see fuse_cpu_ops), the
tokenizer files, and a manifest with "quantization" and the new files' sha256.
The I/O spec, the KV cache and the logits stay fp32; only the weights shrink, and decode on a CPU
is bound by the bytes of weights it reads per token.

The tied embedding / lm_head weight is handled on purpose: the export reads it twice, as the
Gather table for the embedding and through a Transpose as the output projection. Left alone, the
quantizers see a Transpose, not a constant, and the lm_head (a third of GPT-2-small's weights)
stays fp32 behind Transpose -> DequantizeLinear -> MatMul, slower than fp32. So the transpose is
folded into a stored (n_embd, vocab) constant first; the MatMul then quantizes like any other and
the embedding table is quantized as a Gather table.

Also here: perplexity and top-1 agreement of a quantized model against its source on held-out text.
Never imports torch.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..artifacts.files import staging_dir, write_json_atomic
from ..artifacts.modeldir import MANIFEST, ModelDir, file_records, load_model_dir
from ..errors import GptExportError, UsageError

METHODS = ("int8", "int4")
INT4_BLOCK = 32  # weights per int4 scale: 32 keeps int4 perplexity close to fp32 on small models
EVAL_FRACTION = 0.1  # held-out text: the last 10 %, as nanoGPT's prepare.py splits train/val
LOGITS_BUDGET = 1 << 28  # bytes of (B, T, vocab) logits one evaluation batch may hold


def _progress(msg: str) -> None:
    print(msg, flush=True)


def quantize(src_dir: str | Path, out_dir: str | Path, method: str, *, force: bool = False,
             progress: Callable[[str], None] = _progress) -> Path:
    """Quantize the fp32 model directory `src_dir` into `out_dir` and return its path."""
    if method not in METHODS:
        raise UsageError(f"quantization must be one of {', '.join(METHODS)}, got {method!r}")
    if Path(out_dir).exists() and not force:  # before the slow part; staging_dir checks again
        raise UsageError(f"{out_dir}: already exists; pass --force to replace it")
    src = load_model_dir(src_dir)
    if src.dtype != "fp32" or src.manifest.get("quantization"):
        what = src.manifest.get("quantization") or src.dtype
        raise UsageError(f"{src.path}: is {what}; quantize an fp32 model directory (convert --dtype fp32)")
    import onnx

    t0 = time.perf_counter()
    model = onnx.load(str(src.onnx_path))
    folded = fold_constant_transposes(model)
    with _quiet_quantizer():
        model = quantize_int8(model) if method == "int8" else quantize_int4(model)
        model, fused = fuse_cpu_ops(model, src.config)
    progress(f"quantized {src.onnx_path} to {method} weights ({folded} constant transpose folded, "
             f"{', '.join(f'{n} {op}' for op, n in fused.items())} fused, {time.perf_counter() - t0:.1f}s)")
    with staging_dir(Path(out_dir), force) as tmp:
        onnx_name = src.manifest.get("onnx", "model.onnx")
        # the source's layout: weights export put in model.onnx.data (ORT maps them) stay there
        external = len(source_files(src)) > 1
        onnx.save(model, str(tmp / onnx_name), save_as_external_data=external, location=f"{onnx_name}.data")
        check_runs(tmp / onnx_name, src)
        for name in tokenizer_files(src):
            shutil.copyfile(src.path / name, tmp / name)
        write_json_atomic(tmp / MANIFEST, quantized_manifest(src, method, tmp, fused))
    progress(f"wrote {out_dir} ({time.perf_counter() - t0:.1f}s)")
    return Path(out_dir)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Hide two warnings that do not apply here: "run pre-processing" (shape inference, which the
    export already did) and int4's opset bump to 21 (our ops mean the same at 21; check_runs runs it)."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fold_constant_transposes(model) -> int:
    """Replace every Transpose of an initializer by a stored, transposed initializer; return how many.

    The new initializer takes the Transpose's output name, so its consumers are unchanged.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    kept, folded = [], 0
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            w = np.ascontiguousarray(np.transpose(numpy_helper.to_array(inits[node.input[0]]), perm))
            model.graph.initializer.append(numpy_helper.from_array(w, node.output[0]))
            folded += 1
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_unused_initializers(model)
    return folded


def _drop_unused_initializers(model) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def quantize_int8(model):
    """ONNX Runtime's dynamic quantization: int8 weights per output channel, activations
    quantized at run time (MatMulInteger, fused into DynamicQuantizeMatMul), int8 Gather tables."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:  # quantize_dynamic writes its result to a file
        out = Path(tmp) / "model.onnx"
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
                         weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(out))


def quantize_int4(model):
    """MatMulNBits: symmetric int4 weights in blocks of INT4_BLOCK along the input dimension,
    the Gather table as GatherBlockQuantized; accuracy_level 4 multiplies in int8 on the CPU."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=4,
                                          op_types_to_quantize=("MatMul", "Gather"),
                                          quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    return quantizer.model.model


FUSED_OPS = ("SkipLayerNormalization", "FastGelu", "Gelu", "BiasGelu")


def fuse_cpu_ops(model, config) -> tuple[object, dict[str, int]]:
    """ONNX Runtime's own fusions of the layer norms and GELUs into its contrib ops, for its CPU provider.

    At batch 1 a decode step is partly a cost per node (a GPT-2-small int4 step ran ~470 nodes, most
    of them under 20 us of work), and ONNX Runtime's session optimizer does not match these two
    patterns as torch.export writes them. Its transformers optimizer does: each residual Add and the
    LayerNormalization after it become one SkipLayerNormalization (which also returns the sum for
    the residual stream), and the eight nodes of the tanh GELU one FastGelu (with the bias when the
    MatMul before it has one). Only those: its attention fusions stay off, so the attention remains
    the explicit causal-mask graph. The quantized graph is ONNX Runtime's already (MatMulNBits and
    DynamicQuantizeMatMul are its contrib ops); the fp32 export, which TensorRT also reads, is not touched.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    _give_layer_norms_a_bias(model)  # its SkipLayerNormalization fusion fails on one without (bias=False)
    options = FusionOptions("gpt2")
    for name in ("enable_attention", "enable_rotary_embeddings", "enable_embed_layer_norm", "enable_qordered_matmul"):
        setattr(options, name, False)
    optimized = optimize_model(model, model_type="gpt2", num_heads=config.n_head, hidden_size=config.n_embd,
                               optimization_options=options, opt_level=0, use_gpu=False)
    ops = [node.op_type for node in optimized.model.graph.node]
    return optimized.model, {op: ops.count(op) for op in FUSED_OPS if op in ops}


def _give_layer_norms_a_bias(model) -> None:
    """An explicit zero bias for each LayerNormalization without one (nanoGPT's bias=False): the same
    op, and the form onnxruntime.transformers' SkipLayerNormalization fusion indexes (it raises
    IndexError on a LayerNormalization with two inputs)."""
    from onnx import numpy_helper

    sizes = {t.name: t.dims[0] for t in model.graph.initializer if len(t.dims) == 1}
    names = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and (len(node.input) < 3 or not node.input[2]):
            name = f"{node.input[1]}.zero_bias"
            if name not in names:  # one per weight: blocks whose norms share a weight share it
                zeros = np.zeros(sizes[node.input[1]], np.float32)
                model.graph.initializer.append(numpy_helper.from_array(zeros, name))
                names.add(name)
            del node.input[2:]
            node.input.append(name)


def check_runs(onnx_path: Path, src: ModelDir) -> None:
    """The quantized graph loads in ONNX Runtime and gives finite logits of the right shape."""
    import onnxruntime as ort

    c, spec = src.config, src.spec
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        T = min(4, c.block_size)
        feeds = {"input_ids": np.arange(T, dtype=np.int64)[None] % c.vocab_size,
                 "past_length": np.zeros(1, np.int64), "logit_positions": np.arange(T, dtype=np.int64)}
        feeds.update({n: np.zeros((1, c.n_head, 0, c.head_dim), np.float32) for n in spec.past_names})
        logits = session.run(["logits"], feeds)[0]
    except Exception as e:  # onnxruntime raises its own types
        raise GptExportError(f"{onnx_path.name}: quantized model does not run in ONNX Runtime "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if logits.shape != (1, T, c.vocab_size) or not np.isfinite(logits).all():
        raise GptExportError(f"{onnx_path.name}: quantized model gives bad logits (shape {logits.shape} "
                             f"or NaN/inf)")


def tokenizer_files(src: ModelDir) -> list[str]:
    """The files the tokenizer description names (GPT-2's BPE files); a char vocab has none."""
    tok = src.manifest.get("tokenizer") or {}
    return sorted(set((tok.get("files") or {}).values()))


def source_files(src: ModelDir) -> dict:
    """sha256 of the source's graph and its external weights: what the quantized model came from."""
    onnx_name = src.manifest.get("onnx", "model.onnx")
    return {name: info["sha256"] for name, info in src.manifest["files"].items()
            if name == onnx_name or name.startswith(f"{onnx_name}.")}


def quantized_manifest(src: ModelDir, method: str, root: Path, fused: dict[str, int]) -> dict:
    """The source manifest, with the quantization recorded and the new files' hashes."""
    import onnxruntime

    manifest = {k: v for k, v in src.manifest.items() if k not in ("files", "engines")}
    manifest["quantization"] = method
    manifest["quantization_config"] = {
        "weights": method,
        "method": "onnxruntime.quantize_dynamic per-channel" if method == "int8"
                  else f"onnxruntime MatMulNBits symmetric, block {INT4_BLOCK}, accuracy_level 4",
        "tied_lm_head": "transpose folded into a stored constant, then quantized",
        "fused_for_onnxruntime_cpu": fused,
        "source_files": source_files(src),
        "onnxruntime": onnxruntime.__version__,
    }
    manifest["files"] = file_records(root)
    return manifest


# ---- quality: perplexity and top-1 agreement on held-out text -------------------------------------

@dataclass
class Quality:
    """One quantized model against its fp32 source on the same held-out tokens."""

    tokens: int
    perplexity_fp32: float
    perplexity: float
    top1_agreement: float  # fraction of positions where both models' argmax is the same token
    max_abs_logit_diff: float

    @property
    def perplexity_increase(self) -> float:
        return self.perplexity / self.perplexity_fp32 - 1

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity_increase": self.perplexity_increase}


def held_out_ids(text: str, tokenizer, fraction: float = EVAL_FRACTION) -> np.ndarray:
    """Token ids of the last `fraction` of `text` (nanoGPT's val split when fraction is 0.1)."""
    if not 0 < fraction <= 1:
        raise UsageError(f"--eval-fraction must be in (0, 1], got {fraction}")
    if tokenizer is None:
        raise UsageError("this model directory has no tokenizer: cannot evaluate on text")
    return np.array(tokenizer.encode(text[int(len(text) * (1 - fraction)):]), dtype=np.int64)


def evaluate(runner, ids: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean next-token cross-entropy over consecutive block_size windows of `ids`, and the logits.

    Like nanoGPT's estimate_loss but deterministic: window i predicts ids[iT+1 : (i+1)T+1] from
    ids[iT : (i+1)T]. Returns (loss, (windows, T, vocab) float32 logits).
    """
    T, V = runner.config.block_size, runner.config.vocab_size
    n = (len(ids) - 1) // T
    if n < 1:
        raise UsageError(f"held-out text has {len(ids)} tokens; need more than block_size {T}")
    x = ids[: n * T].reshape(n, T)
    y = ids[1 : n * T + 1].reshape(n, T)
    batch = max(1, LOGITS_BUDGET // (T * V * 4))
    logits = np.concatenate([window_logits(runner, x[i: i + batch]) for i in range(0, n, batch)])
    return float(cross_entropy(logits, y)), logits


def window_logits(runner, windows: np.ndarray) -> np.ndarray:
    """(n, T, V) logits at every position of each window: the windows prefilled together on the engine."""
    from ..runtime.params import GenerationParams
    from ..runtime.sampling import SamplingParams
    from ..runtime.scheduler import Probe, Sequence, run_to_end

    seqs = [Sequence(w.tolist(), GenerationParams(1, SamplingParams(0.0)), probe=Probe(all_positions=True))
            for w in windows]
    return np.stack([seq.probe.prefill_logits for seq in run_to_end(runner, seqs)])


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean -log softmax(logits)[target], computed in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    picked = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return float((log_norm - picked).mean())


def compare_quality(ref_dir: str | Path, quant_dir: str | Path, text: str, fraction: float = EVAL_FRACTION,
                    threads: int | None = None) -> Quality:
    """Perplexity of both models and their top-1 agreement on the held-out end of `text`."""
    from ..runtime.backends.ort import OrtRunner

    ref, quant = load_model_dir(ref_dir), load_model_dir(quant_dir)
    ids = held_out_ids(text, ref.tokenizer(), fraction)
    with OrtRunner(ref, threads=threads) as r:
        loss_ref, logits_ref = evaluate(r, ids)
    with OrtRunner(quant, threads=threads) as r:
        loss, logits = evaluate(r, ids)
    return Quality(tokens=int(logits.shape[0] * logits.shape[1]), perplexity_fp32=float(np.exp(loss_ref)),
                   perplexity=float(np.exp(loss)),
                   top1_agreement=float((logits.argmax(-1) == logits_ref.argmax(-1)).mean()),
                   max_abs_logit_diff=float(np.abs(logits - logits_ref).max()))
