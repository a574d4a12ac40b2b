"""Stage 2, build: a model directory's ONNX -> a TensorRT engine, and the checks that run on a CPU
first (TensorRT's ONNX operator table, profile coverage, shapes a CUDA graph would freeze)."""
