"""Stage 1, convert: a nanoGPT checkpoint or a Hugging Face GPT-2 directory -> a validated model
directory (ONNX with a KV cache); quantize one to int8/int4. Needs torch (quantize: onnxruntime)."""
