"""gptexport: nanoGPT checkpoints -> ONNX / TensorRT, and a numpy runtime that needs no PyTorch.

Importing the package loads nothing heavy: torch, onnxruntime and TensorRT are imported by the
modules that need them, when they are used.
"""

__version__ = "0.1.0"
