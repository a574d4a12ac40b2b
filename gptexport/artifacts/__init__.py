"""What the stages hand each other, read and written by all of them: the model directory and its
manifest, the tokenizer, the TensorRT engine record, and the file helpers (hashes, atomic writes,
staging). Runtime-side: nothing here imports torch, onnx or TensorRT."""
