"""Stage 3, run: sampling in numpy, the generation loop, the generation session the CLI and the
server share, and one runner per backend (runtime/backends). Never imports torch, onnx, TensorRT
or anything of convert/, build/ or verify/ (tests/test_layout.py checks it)."""
