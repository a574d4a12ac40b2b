"""gptexport's own CPU kernels: an ONNX Runtime custom-op library built from this package.

- int4_matmul.cc: Int4MatMul, a faster MatMulNBits (4 bits, blocks of 32, symmetric) for few rows;
- build.py: compiles it on first use into a cache folder (headers found or fetched from Debian);
- onnxgraph.py: swaps it in for MatMulNBits in a serialized model, without the onnx package.
backends/kernels.py joins them when the CPU runner creates its session (`--kernels off|auto|on`).
"""
