"""Backends behind one small interface (see base.Runner). Heavy libraries are imported lazily."""

from __future__ import annotations

from ..errors import UsageError
from ..modeldir import ModelDir
from .base import Runner

# name -> (module, provider) ; "tensorrt" runs a serialized engine directly
BACKENDS = ("onnxruntime", "ort-cuda", "ort-tensorrt", "tensorrt")
_ALIASES = {"ort": "onnxruntime", "ort-cpu": "onnxruntime", "onnxruntime-cpu": "onnxruntime"}


def open_runner(name: str, model_dir: ModelDir, threads: int | None = None) -> Runner:
    """The runner called `name` for a loaded model directory (not yet activated)."""
    name = _ALIASES.get(name, name)
    if name == "onnxruntime":
        from .ort import OrtRunner

        return OrtRunner(model_dir, "cpu", threads)
    if name in ("ort-cuda", "ort-tensorrt"):
        from .ort import OrtRunner

        return OrtRunner(model_dir, name.split("-", 1)[1], threads)
    if name == "tensorrt":
        from .trt import TrtRunner

        return TrtRunner(model_dir)
    raise UsageError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
