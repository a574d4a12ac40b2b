"""The one small contract every backend follows, after Polygraphy's runners.

A Runner runs the exported graph (see config.py for its I/O):
- `infer(feeds)`: one forward with numpy arrays in and out, every output (the export's own
  validation; the PyTorch reference's forward).
- `new_batch_cache(rows, capacity)`: the generation engine's cache (batchcache.py), sequences at
  their own lengths in one forward; the scheduler (scheduler.py), the one engine, is the only
  caller of its forwards. Here on host memory, running `infer`; the ONNX Runtime and TensorRT
  runners put it in their memory core and run it through their bound (and captured) steps, and
  only the logits that are sampled come back.
Runners are context managers: `activate` loads the heavy parts, `deactivate` frees them.
A loaded runner may be shared by threads: all per-generation state is in the cache object.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod

import numpy as np

from ...config import GPTConfig, IOSpec, numpy_dtype
from .batchcache import BatchCache
from .device import HostMemory


class Runner(ABC):
    """A backend that runs one exported model."""

    name: str = "runner"
    config: GPTConfig
    spec: IOSpec

    # Optional hooks, so not abstract: a runner with nothing to load or free keeps these no-ops.
    def activate(self) -> None:  # noqa: B027
        """Load what the backend needs (sessions, engines, device memory)."""

    def deactivate(self) -> None:  # noqa: B027
        """Free what `activate` loaded."""

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward of the graph: every input by name in, every output by name out."""

    # whether the graph takes a prompt's chunk after a past of its earlier chunks (the scheduler
    # prefills prompts in chunks only then); a TensorRT engine says by its profiles
    chunked_prefill = True

    def cache_dtype(self) -> np.dtype:
        """The dtype of the past/new key and value tensors, as the I/O spec gives it."""
        return numpy_dtype(self.spec.cache_dtype)

    def new_batch_cache(self, rows: int, capacity: int) -> BatchCache:
        """A cache for up to `rows` sequences at their own lengths, `capacity` positions each (it grows)."""
        memory = HostMemory()

        def run(_, ins: dict, outs: dict, addresses: dict) -> None:
            def view(t, shapes: dict) -> np.ndarray:
                return memory.view(addresses[t.name], shapes[t.name], numpy_dtype(t.dtype))

            out = self.infer({t.name: view(t, ins) for t in self.spec.inputs})
            for t in self.spec.outputs:
                view(t, outs)[...] = out[t.name]

        def run_bucket(bucket) -> None:
            d = bucket.decode_buffers()
            run(None, d.input_shapes, d.output_shapes, d.addresses)

        return BatchCache(memory, self.spec, self.config, rows, capacity, run, run_bucket)


def notice(message: str) -> None:
    """A runner's `notice:` line on stderr: something worth knowing that does not stop the run."""
    print(f"notice: {message}", file=sys.stderr)
