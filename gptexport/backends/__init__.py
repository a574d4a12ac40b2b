"""Backends behind one small interface (see base.Runner). Heavy libraries are imported lazily."""

from __future__ import annotations

from ..errors import UsageError
from ..modeldir import ModelDir
from .base import Runner

# "tensorrt" runs a serialized engine directly; the others run model.onnx in ONNX Runtime
BACKENDS = ("onnxruntime", "ort-cuda", "ort-tensorrt", "tensorrt")
_ALIASES = {"ort": "onnxruntime", "ort-cpu": "onnxruntime", "onnxruntime-cpu": "onnxruntime"}


def open_runner(name: str, model_dir: ModelDir, threads: int | None = None, tf32: bool = False,
                cuda_graphs: bool | None = None, binding: str | None = None) -> Runner:
    """The runner called `name` for a loaded model directory (not yet activated).

    `tf32` lets an fp32 model's matmuls use TF32 on ort-cuda (a TensorRT engine gets it at
    `gptexport build --tf32`); `cuda_graphs` False turns off the decode CUDA graphs of ort-cuda and
    tensorrt (on by default there). `binding` "pointer" runs the CPU provider through the memory
    core, as the GPU providers always run (see backends/ort.py).
    """
    name = _ALIASES.get(name, name)
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if tf32 and name != "ort-cuda":
        raise UsageError(f"--tf32 applies to --backend ort-cuda, not {name} "
                         f"(a TensorRT engine is built with it: `gptexport build --tf32`)")
    if name == "tensorrt":
        from .trt import TrtRunner

        return TrtRunner(model_dir, cuda_graphs=cuda_graphs)
    from .ort import OrtRunner

    provider = {"onnxruntime": "cpu", "ort-cuda": "cuda", "ort-tensorrt": "tensorrt"}[name]
    return OrtRunner(model_dir, provider, threads, tf32=tf32, cuda_graphs=cuda_graphs, binding=binding)
