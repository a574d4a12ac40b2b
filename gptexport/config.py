"""GPTConfig and the I/O spec of the exported graph: the one place that names tensors, dtypes and dims.

Export, every runtime backend and the TensorRT builder read the spec from here (or from the copy
written into gptexport.json), so the names and the cache layout cannot drift apart.

The graph (one graph for prefill and decode):
  inputs   input_ids        int64  [batch, sequence]
           past_length      int64  [batch]             each sequence's valid positions in its past buffer
           logit_positions  int64  [num_logits]        positions of input_ids whose logits to return
           past_key.{i}     dtype  [batch, n_head, past_sequence, head_dim]   for each layer i
           past_value.{i}   dtype  [batch, n_head, past_sequence, head_dim]
  outputs  logits           float32 [batch, num_logits, vocab_size]
           new_key.{i}      dtype  [batch, n_head, sequence, head_dim]   keys of the new positions only
           new_value.{i}    dtype  [batch, n_head, sequence, head_dim]

A past buffer may be longer than past_length (a pre-allocated cache): slots at or beyond
past_length are masked out. The graph returns only the new positions' keys and values, so the
caller appends them in place instead of the graph copying the whole cache every step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

DTYPES = ("fp32", "fp16", "bf16")
ONNX_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64, as nanoGPT does
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    activation: str = "gelu"  # nanoGPT uses exact GELU; Hugging Face GPT-2 checkpoints use the tanh form

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: int64, float32, float16, bfloat16
    shape: tuple  # ints for fixed dims, names for dynamic ones

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


MAX_BATCH = 4096  # the largest batch the graph is exported for


def dynamic_dims(config: GPTConfig) -> dict[str, tuple[int, int]]:
    """Every dynamic dim of the I/O spec and the (min, max) the graph is exported for."""
    T = config.block_size
    return {"batch": (1, MAX_BATCH), "sequence": (1, T), "past_sequence": (0, T), "num_logits": (1, T)}


@dataclass(frozen=True)
class IOSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    n_layer: int
    cache_dtype: str

    @cached_property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @cached_property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @cached_property
    def past_names(self) -> list[str]:
        return [n for n in self.input_names if n.startswith("past_key.") or n.startswith("past_value.")]

    @cached_property
    def new_names(self) -> list[str]:
        return [n for n in self.output_names if n.startswith("new_")]

    def to_dict(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "n_layer": self.n_layer,
            "cache_dtype": self.cache_dtype,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "IOSpec":
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        return cls(tensors(d["inputs"]), tensors(d["outputs"]), int(d["n_layer"]), d["cache_dtype"])


def past_key_name(layer: int) -> str:
    return f"past_key.{layer}"


def past_value_name(layer: int) -> str:
    return f"past_value.{layer}"


def io_spec(config: GPTConfig, dtype: str = "fp32") -> IOSpec:
    """The graph's inputs and outputs for `config` exported in `dtype` (fp32, fp16 or bf16)."""
    cache = ONNX_DTYPE_NAMES[dtype]
    kv_past = ("batch", config.n_head, "past_sequence", config.head_dim)
    kv_new = ("batch", config.n_head, "sequence", config.head_dim)
    inputs = [
        TensorSpec("input_ids", "int64", ("batch", "sequence")),
        TensorSpec("past_length", "int64", ("batch",)),
        TensorSpec("logit_positions", "int64", ("num_logits",)),
    ]
    outputs = [TensorSpec("logits", "float32", ("batch", "num_logits", config.vocab_size))]
    for i in range(config.n_layer):
        inputs += [TensorSpec(past_key_name(i), cache, kv_past), TensorSpec(past_value_name(i), cache, kv_past)]
        outputs += [TensorSpec(f"new_key.{i}", cache, kv_new), TensorSpec(f"new_value.{i}", cache, kv_new)]
    return IOSpec(tuple(inputs), tuple(outputs), config.n_layer, cache)


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a spec dtype name (float32, int64, ...); bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16; ONNX Runtime reads ml_dtypes' layout

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
