"""`gptexport build`: ONNX -> TensorRT engine, recorded in engine.json and the manifest.

The part that calls TensorRT is kept thin (`_build_serialized`) and is written to the TensorRT
10.x and 11.x Python API: one strongly typed path, since 11.x accepts nothing else and precision
is decided by the ONNX graph (convert --dtype). What the build shares with the runtime (profiles,
the engine record and its checks) lives in profiles.py and engine_record.py, so a runner never
imports this module. TensorRT and cuda-python are imported only when an engine is built.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..artifacts.engine_record import ENGINE_FILE, RECORD_FILE, DeviceInfo, EngineRecord, import_tensorrt
from ..artifacts.files import sha256_file, write_bytes_atomic, write_json_atomic
from ..artifacts.modeldir import ModelDir, add_files_to_manifest, load_model_dir
from ..errors import GptExportError, UsageError
from ..profiles import ProfileShapes, describe_profiles, profile_shapes
from ..runtime.backends.device import current_device, import_cudart

TIMING_CACHE_FILE = "timing.cache"


# ---- build -------------------------------------------------------------------------------------

@dataclass
class BuildOptions:
    max_batch: int = 1
    opt_seq: int | None = None
    workspace_mb: int | None = None
    timing_cache: Path | None = None  # default: OUTDIR/timing.cache
    tf32: bool = False  # an fp32 engine may use TF32 only when asked (`build --tf32`)


def build_engine(model_dir: str | Path, options: BuildOptions | None = None,
                 progress: Callable[[str], None] = print) -> EngineRecord:
    """Build OUTDIR/model.engine from OUTDIR/model.onnx and record it in engine.json and the manifest.

    Both files are written atomically and listed in gptexport.json, so hash verification covers
    them; a failed build leaves a previous engine as it was.
    """
    options = options or BuildOptions()
    md = load_model_dir(model_dir)
    if options.workspace_mb is not None and options.workspace_mb < 1:
        raise UsageError(f"--workspace must be >= 1 (MiB), got {options.workspace_mb}")
    profs = profile_shapes(md.config, md.spec, options.max_batch, options.opt_seq)
    trt = import_tensorrt()
    device = current_device(import_cudart())
    from .check import check_model_dir  # what the static check finds, TensorRT's parser will likely refuse

    target = "11" if trt.__version__.startswith("11.") else "10"
    for finding in check_model_dir(md, target, options.max_batch, options.opt_seq):
        progress(f"warning: {finding}")
    cache_path = Path(options.timing_cache) if options.timing_cache else md.path / TIMING_CACHE_FILE
    cache_in = _read_timing_cache(cache_path)
    progress(f"building a {md.dtype} engine with TensorRT {trt.__version__} on {device.name}: "
             f"{describe_profiles(profs)}")
    plan, cache_out, tf32 = _build_serialized(trt, md.onnx_path, profs, options.workspace_mb, cache_in,
                                              options.tf32 or md.dtype != "fp32")
    _write_bytes_atomic(cache_path, cache_out)
    record = install_engine(md, plan, trt.__version__, device, options, profs, tf32)
    progress(f"wrote {md.path / ENGINE_FILE} ({len(plan) / 2**20:.1f} MiB) and {RECORD_FILE}; "
             f"timing cache {cache_path}")
    return record


def install_engine(md: ModelDir, plan: bytes, tensorrt_version: str, device: DeviceInfo, options: BuildOptions,
                   profs: list[ProfileShapes], tf32: bool) -> EngineRecord:
    """Write a serialized engine and its record into the model directory and list both in the manifest.

    Each file is replaced atomically and the manifest last: an interrupted install leaves files
    whose sha256 the manifest does not match, which loading refuses, never a silent mix.
    """
    _write_bytes_atomic(md.path / ENGINE_FILE, plan)
    record = EngineRecord(
        engine=ENGINE_FILE, engine_sha256=sha256_file(md.path / ENGINE_FILE),
        onnx_sha256=md.manifest["files"][md.onnx_path.relative_to(md.path).as_posix()]["sha256"],
        precision=md.dtype, tensorrt_version=tensorrt_version, gpu_name=device.name,
        compute_capability=device.compute_capability, max_batch=options.max_batch,
        opt_seq=profs[0].shapes["input_ids"][1][1], profiles=profs, workspace_mb=options.workspace_mb,
        tf32=tf32, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    write_json_atomic(md.path / RECORD_FILE, record.to_dict())
    add_files_to_manifest(md, [ENGINE_FILE, RECORD_FILE], {"tensorrt": {"engine": ENGINE_FILE, "record": RECORD_FILE}})
    return record


def _build_serialized(trt, onnx_path: Path, profs: list[ProfileShapes], workspace_mb: int | None,
                      timing_cache: bytes, allow_tf32: bool) -> tuple[bytes, bytes, bool]:
    """ONNX parser -> strongly typed network -> serialized engine. Returns (plan, timing cache, tf32)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: required to opt in on 10.x; on 11.x always on, the flag kept and ignored
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        raise GptExportError(f"{onnx_path}: TensorRT's ONNX parser failed: {_parser_error(errors)}")
    config = builder.create_builder_config()
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb * 2**20)
    # BuilderFlag.TF32 is on in a fresh builder config (TensorRT API docs: "Enabled by default").
    # fp32 means fp32, as in ONNX Runtime with use_tf32=0 and the PyTorch reference: an fp32 graph
    # is built without it unless `build --tf32` asks. fp16/bf16 graphs keep TensorRT's default for
    # the few fp32 layers they have (LayerNorm, softmax, the logits cast).
    tf32 = hasattr(trt.BuilderFlag, "TF32") and allow_tf32
    if hasattr(trt.BuilderFlag, "TF32") and not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    for p in profs:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    # a cache from another GPU or TensorRT version is not used (ignore_mismatch=False): start afresh
    if not config.set_timing_cache(config.create_timing_cache(timing_cache), ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise GptExportError(f"{onnx_path}: TensorRT failed to build an engine (its log above says why)")
    return bytes(plan), bytes(config.get_timing_cache().serialize()), tf32


def _parser_error(errors: list) -> str:
    if not errors:
        return "no error reported"
    e = errors[0]
    node = f"node {e.node_name()} ({e.node_operator()}): " if hasattr(e, "node_name") and e.node_name() else ""
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return node + " ".join(str(e.desc()).split()) + more


def _read_timing_cache(path: Path) -> bytes:
    """A previous build's timing cache, or b"" for a fresh one. A mismatching cache is refused by TensorRT."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise UsageError(f"{path}: cannot read timing cache ({e.strerror})") from None


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write beside `path` and rename, so a reader sees the old file or the new one, never half."""
    try:
        write_bytes_atomic(path, data)
    except OSError as e:
        raise GptExportError(f"{path}: cannot write ({e.strerror})") from None
