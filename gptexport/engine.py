"""TensorRT engines: `gptexport build` and the plain logic around them.

Most of this module is plain code, tested on a CPU: the optimization profiles derived from the
I/O spec, the engine record written beside the engine (engine.json), the checks that an engine
may run here, and the layout of the device KV cache. The part that calls TensorRT is kept thin
(`_build_serialized`) and is written to the TensorRT 10.x and 11.x Python API: one strongly typed
path, since 11.x accepts nothing else and precision is decided by the ONNX graph (convert --dtype).

TensorRT and cuda-python are imported only when an engine is built or run.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .config import GPTConfig, IOSpec, profiles
from .errors import BackendUnavailable, GptExportError, ModelDirError, UsageError
from .modeldir import ModelDir, add_files_to_manifest, load_model_dir, sha256_file, write_json_atomic

ENGINE_FILE = "model.engine"
RECORD_FILE = "engine.json"
TIMING_CACHE_FILE = "timing.cache"
RECORD_FORMAT = "gptexport-engine"
RECORD_VERSION = 1
INSTALL_HINT = ("TensorRT is not installed: pip install tensorrt cuda-python "
                "(needs an NVIDIA GPU and driver; see docs/tensorrt.md)")

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)


# ---- optimization profiles --------------------------------------------------------------------

@dataclass(frozen=True)
class ProfileShapes:
    """One optimization profile as TensorRT takes it: (min, opt, max) shape of each dynamic input."""

    name: str
    shapes: dict[str, ShapeRange]

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                                              for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "ProfileShapes":
        return cls(d["name"], {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
                               for k, v in d["shapes"].items()})

    def contains(self, shapes: dict[str, Shape]) -> bool:
        """Whether every given input shape lies within this profile's range."""
        for name, shape in shapes.items():
            if name not in self.shapes:
                continue  # a fixed-shape input (past_length)
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
        return True


def profile_shapes(config: GPTConfig, spec: IOSpec, max_batch: int = 1,
                   opt_seq: int | None = None) -> list[ProfileShapes]:
    """The prefill and decode profiles of config.profiles, as input shapes, checked for consistency."""
    if max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {max_batch}")
    if opt_seq is not None and not 1 <= opt_seq <= config.block_size:
        raise UsageError(f"--opt-seq must be in 1..{config.block_size} (block_size), got {opt_seq}")
    result = [ProfileShapes(p.name, p.shapes(spec)) for p in profiles(config, max_batch, opt_seq)]
    problems = profile_problems(config, spec, result)
    if problems:
        raise GptExportError(f"inconsistent optimization profiles: {problems[0]}")
    return result


def profile_problems(config: GPTConfig, spec: IOSpec, profs: list[ProfileShapes]) -> list[str]:
    """What would make TensorRT refuse these profiles, or the graph fail inside them ([] if none).

    Every cache input must have the same range as the others (one KV layout for all layers), the
    batch dim must agree across inputs, and positions must stay within block_size (wpe's rows).
    """
    dynamic = [t for t in spec.inputs if not all(isinstance(d, int) for d in t.shape)]
    problems = []
    for p in profs:
        own = _range_problems(p, dynamic)
        problems += own or _consistency_problems(config, spec, p)
    return problems


def _range_problems(p: ProfileShapes, dynamic: list) -> list[str]:
    problems = []
    for t in dynamic:
        if t.name not in p.shapes:
            problems.append(f"{p.name}: no range for dynamic input {t.name}")
            continue
        lo, opt, hi = p.shapes[t.name]
        if not len(lo) == len(opt) == len(hi) == len(t.shape):
            problems.append(f"{p.name}: {t.name} has rank {len(t.shape)}, its range does not")
        elif any(not 0 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
            problems.append(f"{p.name}: {t.name} needs 0 <= min <= opt <= max, got {lo} {opt} {hi}")
        elif any(isinstance(d, int) and not a == c == d for d, a, c in zip(t.shape, lo, hi)):
            problems.append(f"{p.name}: {t.name} has fixed dims {t.shape}, its range is {lo}..{hi}")
    return problems


def _consistency_problems(config: GPTConfig, spec: IOSpec, p: ProfileShapes) -> list[str]:
    problems = []
    past = [p.shapes[n] for n in spec.past_names]
    ids, pos = p.shapes["input_ids"], p.shapes["logit_positions"]
    if any(r != past[0] for r in past):
        problems.append(f"{p.name}: the past_key/past_value inputs have different ranges")
    if past and any(ids[k][0] != past[0][k][0] for k in range(3)):
        problems.append(f"{p.name}: input_ids and the cache inputs have different batch ranges")
    if ids[0][0] < 1:
        problems.append(f"{p.name}: batch must be >= 1")
    if ids[0][1] < 1 or pos[0][0] < 1:
        problems.append(f"{p.name}: sequence and num_logits must be >= 1")
    if ids[2][1] > config.block_size or (past and past[0][2][2] > config.block_size):
        problems.append(f"{p.name}: sequence and past_sequence must be <= block_size {config.block_size}")
    if pos[2][0] > ids[2][1]:
        problems.append(f"{p.name}: num_logits max {pos[2][0]} exceeds sequence max {ids[2][1]}")
    return problems


def select_profile(profs: list[ProfileShapes], shapes: dict[str, Shape]) -> int | None:
    """Index of the first profile whose ranges hold every input shape, or None."""
    return next((i for i, p in enumerate(profs) if p.contains(shapes)), None)


def describe_profiles(profs: list[ProfileShapes]) -> str:
    """e.g. `prefill (batch x sequence 1x1..4x1024, past_sequence 0..0), decode (...)`, for messages."""
    parts = []
    for p in profs:
        ids = p.shapes.get("input_ids")
        past = next((v for k, v in p.shapes.items() if k.startswith("past_")), None)
        text = f"batch x sequence {_dims(ids[0])}..{_dims(ids[2])}" if ids else ""
        if past:
            text += f", past_sequence {past[0][2]}..{past[2][2]}"
        parts.append(f"{p.name} ({text})")
    return ", ".join(parts)


def union_profile(profs: list[ProfileShapes], opt_from: ProfileShapes | None = None) -> ProfileShapes:
    """One profile covering them all, tuned for `opt_from`'s opt shapes (default: the last, decode).

    For ONNX Runtime's TensorRT provider, whose execution context stays on its first profile.
    """
    opt_from = opt_from or profs[-1]
    shapes = {}
    for name in profs[0].shapes:
        ranges = [p.shapes[name] for p in profs]
        lo = tuple(min(r[0][k] for r in ranges) for k in range(len(ranges[0][0])))
        hi = tuple(max(r[2][k] for r in ranges) for k in range(len(ranges[0][0])))
        opt = tuple(min(max(a, o), b) for a, o, b in zip(lo, opt_from.shapes[name][1], hi))
        shapes[name] = (lo, opt, hi)
    return ProfileShapes("+".join(p.name for p in profs), shapes)


def ort_profile_options(prof: ProfileShapes) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes in ONNX Runtime's "name:1x2x3,name2:..." format."""
    return {f"trt_profile_{which}_shapes": ",".join(f"{name}:{_dims(r[k])}" for name, r in prof.shapes.items())
            for k, which in enumerate(("min", "opt", "max"))}


def step_shapes(spec: IOSpec, batch: int, steps: int, past: int, num_logits: int) -> dict[str, Shape]:
    """Every input's shape for one forward: `steps` new tokens after a past buffer of `past` slots."""
    dims = {"batch": batch, "sequence": steps, "past_sequence": past, "num_logits": num_logits}
    return {t.name: tuple(d if isinstance(d, int) else dims[d] for d in t.shape) for t in spec.inputs}


def output_shapes(spec: IOSpec, batch: int, steps: int, num_logits: int) -> dict[str, Shape]:
    dims = {"batch": batch, "sequence": steps, "num_logits": num_logits}
    return {t.name: tuple(d if isinstance(d, int) else dims[d] for d in t.shape) for t in spec.outputs}


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


# ---- the device KV cache's layout --------------------------------------------------------------

@dataclass(frozen=True)
class Copy2D:
    """A cudaMemcpy2D: `height` rows of `width` bytes, rows `spitch`/`dpitch` bytes apart."""

    dst_offset: int
    dpitch: int
    spitch: int
    width: int
    height: int


@dataclass(frozen=True)
class KVLayout:
    """One cache buffer, (batch, n_head, capacity, head_dim) contiguous, as the graph reads it."""

    batch: int
    n_head: int
    head_dim: int
    capacity: int
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.batch * self.n_head * self.capacity * self.head_dim * self.itemsize

    def append(self, start: int, steps: int) -> Copy2D:
        """Copy a new_key/new_value output (batch, n_head, steps, head_dim) into slots start..start+steps.

        Each (batch, head) row of the output is `steps * head_dim` contiguous elements; in the
        buffer that row begins `capacity * head_dim` elements after the previous one.
        """
        if start < 0 or steps < 1 or start + steps > self.capacity:
            raise GptExportError(f"KV cache overflow: slots {start}..{start + steps} of {self.capacity}")
        row = self.head_dim * self.itemsize
        return Copy2D(dst_offset=start * row, dpitch=self.capacity * row, spitch=steps * row,
                      width=steps * row, height=self.batch * self.n_head)


def memcpy2d_host(dst: np.ndarray, src: np.ndarray, plan: Copy2D) -> None:
    """What cudaMemcpy2D does with `plan`, on host byte arrays: the reference for the device copy."""
    for r in range(plan.height):
        d, s = plan.dst_offset + r * plan.dpitch, r * plan.spitch
        dst[d:d + plan.width] = src[s:s + plan.width]


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a spec dtype name; bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# TensorRT DataType names (trt.DataType.X.name) of the spec's dtypes
TRT_DTYPE_NAMES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64",
                   "int32": "INT32", "bool": "BOOL"}


def engine_io_problems(spec: IOSpec, io: dict[str, tuple[str, str]]) -> list[str]:
    """Differences between the spec and an engine's I/O, given as {name: (INPUT|OUTPUT, dtype name)}."""
    want = {t.name: ("INPUT", TRT_DTYPE_NAMES.get(t.dtype, t.dtype)) for t in spec.inputs}
    want.update({t.name: ("OUTPUT", TRT_DTYPE_NAMES.get(t.dtype, t.dtype)) for t in spec.outputs})
    problems = [f"{n}: missing from the engine" for n in want if n not in io]
    problems += [f"{n}: not in the I/O spec" for n in io if n not in want]
    problems += [f"{n}: engine has {io[n][0].lower()} {io[n][1]}, spec says {w[0].lower()} {w[1]}"
                 for n, w in want.items() if n in io and io[n] != w]
    return problems


# ---- the engine record ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "9.0"


@dataclass
class EngineRecord:
    """engine.json: what an engine was built from, with what, for which GPU."""

    engine: str
    engine_sha256: str
    onnx_sha256: str
    precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    max_batch: int
    opt_seq: int
    profiles: list[ProfileShapes]
    workspace_mb: int | None = None
    tf32: bool = False
    strongly_typed: bool = True
    gptexport_version: str = __version__
    created: str = ""
    format: str = RECORD_FORMAT
    format_version: int = RECORD_VERSION
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["profiles"] = [p.to_dict() for p in self.profiles]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "EngineRecord":
        if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT:
            raise ModelDirError(f"{where}: not a gptexport engine record (format must be {RECORD_FORMAT!r})")
        if d.get("format_version") != RECORD_VERSION:
            raise ModelDirError(f"{where}: format_version {d.get('format_version')!r} is not supported "
                                f"(this gptexport reads {RECORD_VERSION}); rebuild with `gptexport build`")
        try:
            d = dict(d, profiles=[ProfileShapes.from_dict(p) for p in d["profiles"]])
            record = cls(**d)
            for key in ("engine", "engine_sha256", "onnx_sha256", "precision", "tensorrt_version",
                        "gpu_name", "compute_capability"):
                if not isinstance(getattr(record, key), str):
                    raise TypeError(f"{key} must be a string")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelDirError(f"{where}: malformed engine record ({type(e).__name__}: {e})") from None
        return record


def load_record(md: ModelDir) -> EngineRecord:
    """The engine record of a model directory; a clear error if no engine was built."""
    info = md.manifest.get("tensorrt")
    if not isinstance(info, dict) or "record" not in info:
        raise ModelDirError(f"{md.path}: has no TensorRT engine; build one with `gptexport build {md.path}`")
    path = md.path / info["record"]
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path}: cannot read engine record ({e})") from None
    return EngineRecord.from_dict(data, str(path))


def compatibility_problems(record: EngineRecord, md: ModelDir, tensorrt_version: str,
                           device: DeviceInfo) -> list[str]:
    """Why this engine must not be deserialized here ([] if it may).

    TensorRT engines are specific to the TensorRT version and GPU they were built with, and
    this one must also come from the directory's current model.onnx, in its precision.
    """
    problems = []
    files = md.manifest.get("files", {})
    onnx_name = md.onnx_path.relative_to(md.path).as_posix()
    if files.get(onnx_name, {}).get("sha256") != record.onnx_sha256:
        problems.append(f"it was built from another {onnx_name} (sha256 differs)")
    if files.get(record.engine, {}).get("sha256") != record.engine_sha256:
        problems.append(f"{record.engine} is not the engine the record describes (sha256 differs)")
    if record.precision != md.dtype:
        problems.append(f"it is {record.precision}, the model directory is {md.dtype}")
    if record.tensorrt_version != tensorrt_version:
        problems.append(f"it was built with TensorRT {record.tensorrt_version}, this is TensorRT {tensorrt_version}")
    if record.compute_capability != device.compute_capability or record.gpu_name != device.name:
        problems.append(f"it was built for {record.gpu_name} (compute capability {record.compute_capability}), "
                        f"this GPU is {device.name} ({device.compute_capability})")
    return problems


def check_compatible(record: EngineRecord, md: ModelDir, tensorrt_version: str, device: DeviceInfo) -> None:
    """Refuse, in one line, an engine this machine must not run."""
    problems = compatibility_problems(record, md, tensorrt_version, device)
    if problems:
        raise ModelDirError(f"{md.path / record.engine}: cannot run here: {'; '.join(problems)}; "
                            f"rebuild it with `gptexport build {md.path}`")


# ---- lazy imports of TensorRT and cuda-python ---------------------------------------------------

def import_tensorrt():
    """The tensorrt module, or BackendUnavailable saying how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(INSTALL_HINT) from None
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(f"TensorRT {tensorrt.__version__} is too old: gptexport needs 10.x or 11.x "
                                 f"(pip install -U tensorrt)")
    return tensorrt


def import_cudart():
    """cuda-python's runtime module (cuda.bindings.runtime; `from cuda import cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise BackendUnavailable("cuda-python is not installed: pip install cuda-python "
                                     "(TensorRT's device memory is managed through it)") from None
    return runtime


def cuda_call(cudart, result, what: str, error: type = GptExportError):
    """Unwrap a cuda-python call's (error, *values) tuple, raising `error` on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise error(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else tuple(values)


def current_device(cudart) -> DeviceInfo:
    """Name and compute capability of the current CUDA device; BackendUnavailable without one."""
    try:
        device = cuda_call(cudart, cudart.cudaGetDevice(), "cudaGetDevice", BackendUnavailable)
        props = cuda_call(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties", BackendUnavailable)
    except BackendUnavailable as e:
        raise BackendUnavailable(f"{e}: TensorRT needs an NVIDIA GPU and its driver") from None
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.strip(), f"{props.major}.{props.minor}")


# ---- build -------------------------------------------------------------------------------------

@dataclass
class BuildOptions:
    max_batch: int = 1
    opt_seq: int | None = None
    workspace_mb: int | None = None
    timing_cache: Path | None = None  # default: OUTDIR/timing.cache


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
    plan, cache_out, tf32 = _build_serialized(trt, md.onnx_path, profs, options.workspace_mb, cache_in, md.dtype)
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
                      timing_cache: bytes, precision: str) -> tuple[bytes, bytes, bool]:
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
    # fp32 means fp32, as in ONNX Runtime and PyTorch: no TF32 in an fp32 graph's matmuls
    tf32 = hasattr(trt.BuilderFlag, "TF32") and precision != "fp32"
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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise GptExportError(f"{path}: cannot write ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
