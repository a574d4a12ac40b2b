"""What a TensorRT engine is and whether it may run here: engine.json, its checks, the I/O check.

Runtime-side (the TensorRT runner reads it before TensorRT is even imported, so "no engine built"
and "built for another GPU" need no TensorRT); `gptexport build` writes the record through it.
Imports neither TensorRT nor the builder; `import_tensorrt` imports TensorRT when asked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .. import __version__
from ..config import IOSpec
from ..errors import BackendUnavailable, ModelDirError, check_format
from ..profiles import ProfileShapes
from .files import read_json
from .modeldir import ModelDir

ENGINE_FILE = "model.engine"
RECORD_FILE = "engine.json"
RECORD_FORMAT = "gptexport-engine"
RECORD_VERSION = 1
INSTALL_HINT = ("TensorRT is not installed: pip install tensorrt cuda-python "
                "(needs an NVIDIA GPU and driver; see docs/tensorrt.md)")


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
        check_format(d, where, "engine record", RECORD_FORMAT, RECORD_VERSION, ModelDirError,
                     "; rebuild with `gptexport build`")
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
    return EngineRecord.from_dict(read_json(path, "engine record", ModelDirError), str(path))


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

