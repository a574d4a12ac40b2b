"""Serving on NVIDIA Triton Inference Server.

protocol.py   the request/response tensors (TensorRT-LLM's names) and their validation
model.py      the Python-backend model (TritonPythonModel) that a repository's model.py imports, over
              a ServedModel: the runtime's generation session and the request limits
repository.py `gptexport triton`: a model directory -> a self-contained Triton model repository
server.py     `gptexport serve`: finds and runs a real tritonserver on a repository

Nothing here imports torch.
"""
