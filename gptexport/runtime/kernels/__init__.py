"""gptexport's own CPU kernels: an ONNX Runtime custom-op library built from this package.

- int4_matmul.cc: Int4MatMul, a faster MatMulNBits (4 bits, blocks of 32, symmetric) for few rows,
  and the library's registration;
- int8_matmul.cc: Int8MatMul, ONNX Runtime's dynamic int8 matmul (DynamicQuantizeLinear +
  MatMulInteger) as one op, exact in int32;
- build.py: compiles it on first use into a cache folder (headers found or fetched from Debian);
- onnxgraph.py: swaps them in for those nodes in a serialized model, without the onnx package.
backends/kernels.py joins them when the CPU runner creates its session (`--kernels off|auto|on`).
"""
