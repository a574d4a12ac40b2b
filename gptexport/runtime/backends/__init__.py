"""Backends behind one small interface (see base.Runner). Heavy libraries are imported lazily."""

from __future__ import annotations

from pathlib import Path

from ...artifacts.modeldir import ModelDir, load_model_dir
from ...errors import UsageError
from .base import Runner

# "tensorrt" runs a serialized engine directly; the others run model.onnx in ONNX Runtime
BACKENDS = ("onnxruntime", "ort-cuda", "ort-tensorrt", "tensorrt")
ALIASES = {"ort": "onnxruntime", "ort-cpu": "onnxruntime", "onnxruntime-cpu": "onnxruntime"}


def backend_name(name: str, option: str = "--backend", also: tuple[str, ...] = ()) -> str:
    """A backend's name with its alias resolved, or a UsageError naming `option` and what is valid."""
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise UsageError(f"{option}: unknown backend {name!r}; valid: {', '.join((*also, *BACKENDS))}")
    return name


def resolve_backends(backends: tuple[str, ...] | list[str] | str) -> list[str]:
    """Backend names ("a,b" or a list), aliases resolved, duplicates dropped; "all" is every backend."""
    names = backends.split(",") if isinstance(backends, str) else list(backends)
    names = [n.strip() for n in names if n.strip()]
    if not names or names == ["all"]:
        return list(BACKENDS)
    return list(dict.fromkeys(backend_name(n, "--backends", ("all",)) for n in names))


def open_runner(name: str, model_dir: ModelDir | str | Path, threads: int | None = None, tf32: bool = False,
                cuda_graphs: bool | None = None, kernels: str | None = None) -> Runner:
    """The runner called `name` for a model directory (a path is loaded, hashes checked); not yet
    activated: use it as a context manager, or call activate().

    `tf32` lets an fp32 model's matmuls use TF32 on ort-cuda (a TensorRT engine gets it at
    `gptexport build --tf32`); `cuda_graphs` False turns off the decode CUDA graphs of ort-cuda and
    tensorrt (on by default there). `kernels` (off|auto|on, default auto) runs MatMulNBits on our own
    CPU kernels (backends/kernels.py); it applies to onnxruntime only.
    """
    name = backend_name(name)
    model_dir = load_model_dir(model_dir)
    if tf32 and name != "ort-cuda":
        raise UsageError(f"--tf32 applies to --backend ort-cuda, not {name} "
                         f"(a TensorRT engine is built with it: `gptexport build --tf32`)")
    if kernels not in (None, "auto", "off"):
        if kernels != "on":
            raise UsageError(f"--kernels: unknown mode {kernels!r}; valid: off, auto, on")
        if name != "onnxruntime":
            raise UsageError(f"--kernels on applies to --backend onnxruntime (our CPU kernels), not {name}")
    if name == "tensorrt":
        from .trt import TrtRunner

        return TrtRunner(model_dir, cuda_graphs=cuda_graphs)
    from .ort import OrtRunner

    provider = {"onnxruntime": "cpu", "ort-cuda": "cuda", "ort-tensorrt": "tensorrt"}[name]
    return OrtRunner(model_dir, provider, threads, tf32=tf32, cuda_graphs=cuda_graphs, kernels=kernels or "auto")
