"""gptexport: nanoGPT checkpoints -> ONNX / TensorRT, and a numpy runtime that needs no PyTorch.

The pipeline, one folder per stage:
  convert/    checkpoint (nanoGPT ckpt.pt, Hugging Face GPT-2 directory) -> model directory; quantize
  build/      model directory -> TensorRT engine, and the CPU-side checks that TensorRT will take it
  runtime/    sampling, the generation loop and session, one runner per backend (no torch)
  verify/     parity of every backend against the PyTorch reference or a golden file
  serve/      a Triton Inference Server repository and server on the runtime
  bench/      benchmarks against nanoGPT, transformers and other runtimes
  cli/        the `gptexport` command
  artifacts/  what the stages hand each other: the model directory, tokenizer, engine record, files
The Python API is the five names below; importing the package loads nothing heavy (torch,
onnxruntime and TensorRT are imported by the modules that need them, when they are used):

  convert_checkpoint(ckpt, out_dir, dtype=..., ...) -> Path      a model directory (needs torch)
  load_model_dir(path) -> ModelDir                                read and verify one
  generate(model_dir, prompt, params=..., **settings) -> [Sample]  sample text (no torch)
  parity(model_dir, ckpt | golden=..., options=...) -> ParityReport  check every backend
  open_runner(backend, model_dir) -> Runner                       one backend, for your own loop
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> (module, attribute), imported on first use
_API = {
    "convert_checkpoint": ("gptexport.convert.export", "convert"),
    "load_model_dir": ("gptexport.artifacts.modeldir", "load_model_dir"),
    "generate": ("gptexport.runtime.session", "generate_samples"),
    "parity": ("gptexport.verify.parity", "run_parity"),
    "open_runner": ("gptexport.runtime.backends", "open_runner"),
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'gptexport' has no attribute {name!r}")
    module, attr = _API[name]
    return getattr(import_module(module), attr)


def __dir__() -> list[str]:
    return sorted(__all__)
