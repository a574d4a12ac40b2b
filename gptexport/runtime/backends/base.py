"""The one small contract every backend follows, after Polygraphy's runners.

A Runner runs the exported graph (see config.py for its I/O):
- `infer(feeds)`: one forward with numpy arrays in and out, every output (for parity).
- `new_cache(batch, capacity)` and `forward(input_ids, cache)`: what the generation loop uses; the
  cache lives wherever the backend keeps it (host arrays here, device memory for TensorRT) and
  only the logits come back.
- `new_batch_cache(rows, capacity)`: the scheduler's cache (batchcache.py), sequences at their own
  lengths in one forward. Here on host memory, running `infer`; the ONNX Runtime and TensorRT
  runners put it in their memory core and run it through their bound (and captured) steps.
Runners are context managers: `activate` loads the heavy parts, `deactivate` frees them.
A loaded runner may be shared by threads: all per-generation state is in the cache object.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod

import numpy as np

from ...config import GPTConfig, IOSpec, numpy_dtype
from ...errors import GptExportError
from .batchcache import BatchCache
from .device import HostMemory


ROOM_STEP = 64  # positions: the buffers grow to the next multiple of this as the context does


class HostCache:
    """Key/value buffers in host memory, (B, nh, room, hs) per past input, room <= capacity.

    The graph reads the whole buffer and masks the slots at and beyond `length`; each forward's
    new keys/values are written into the next slots, so nothing is copied as the context grows
    within the room. The room grows in steps of ROOM_STEP positions (one copy of the cache each
    time) rather than starting at the full capacity: the attention's cost per step is the room's,
    so it stays that of the context so far (+ at most ROOM_STEP), not that of prompt + every token
    still to come (a 16-token prompt with 128 to generate attended over 144 slots from the first step).
    """

    def __init__(self, spec: IOSpec, config: GPTConfig, batch: int, capacity: int, dtype=np.float32):
        shape = (batch, config.n_head, 0, config.head_dim)
        self.buffers = {name: np.zeros(shape, dtype=dtype) for name in spec.past_names}
        self.batch, self.capacity, self.length = batch, capacity, 0
        self.room_step = ROOM_STEP

    @property
    def room(self) -> int:
        return next(iter(self.buffers.values())).shape[2] if self.buffers else self.capacity

    def reset(self) -> None:
        self.length = 0

    def reserve(self, end: int) -> bool:
        """Room for `end` positions, the cached ones kept; True if the buffers were replaced."""
        if end > self.capacity:
            raise GptExportError(f"KV cache overflow: {end} positions, capacity {self.capacity}")
        if end <= self.room:
            return False
        room = min(self.capacity, -(-end // self.room_step) * self.room_step)
        for name, buf in self.buffers.items():
            grown = np.zeros(buf.shape[:2] + (room,) + buf.shape[3:], dtype=buf.dtype)
            grown[:, :, :self.length] = buf[:, :, :self.length]
            self.buffers[name] = grown
        return True

    def past_feeds(self) -> dict[str, np.ndarray]:
        # a zero-length past (prefill) is given as such, so the graph does no masked work
        end = self.room if self.length else 0
        return {name: buf[:, :, :end] for name, buf in self.buffers.items()}

    def append(self, new: dict[str, np.ndarray], steps: int) -> None:
        start, end = self.length, self.length + steps
        self.reserve(end)
        for name, buf in self.buffers.items():
            buf[:, :, start:end] = new[name.replace("past_", "new_", 1)]
        self.length = end


class Runner(ABC):
    """A backend that runs one exported model."""

    name: str = "runner"
    config: GPTConfig
    spec: IOSpec

    def activate(self) -> None:
        """Load what the backend needs (sessions, engines, device memory)."""

    def deactivate(self) -> None:
        """Free what `activate` loaded."""

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward of the graph: every input by name in, every output by name out."""

    def cache_dtype(self) -> np.dtype:
        """The dtype of the past/new key and value tensors, as the I/O spec gives it."""
        return numpy_dtype(self.spec.cache_dtype)

    def new_cache(self, batch: int, capacity: int) -> HostCache:
        """An empty cache for `batch` sequences of up to `capacity` positions."""
        return HostCache(self.spec, self.config, batch, capacity, self.cache_dtype())

    def new_batch_cache(self, rows: int, capacity: int) -> BatchCache:
        """A cache for up to `rows` sequences at their own lengths, `capacity` positions each (it grows)."""
        memory = HostMemory()

        def run(_, ins: dict, outs: dict, addresses: dict) -> None:
            view = lambda t, shapes: memory.view(addresses[t.name], shapes[t.name], numpy_dtype(t.dtype))
            out = self.infer({t.name: view(t, ins) for t in self.spec.inputs})
            for t in self.spec.outputs:
                view(t, outs)[...] = out[t.name]

        def run_bucket(bucket) -> None:
            d = bucket.decode_buffers()
            run(None, d.input_shapes, d.output_shapes, d.addresses)

        return BatchCache(memory, self.spec, self.config, rows, capacity, run, run_bucket)

    def forward(self, input_ids: np.ndarray, cache: HostCache, all_logits: bool = False) -> np.ndarray:
        """Run (B, T) new tokens after the cached ones; logits (B, V) of the last, or (B, T, V)."""
        T = input_ids.shape[1]
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "past_length": np.full(input_ids.shape[0], cache.length, dtype=np.int64),  # every row alike
            "logit_positions": np.arange(T, dtype=np.int64) if all_logits else np.array([T - 1], np.int64),
            **cache.past_feeds(),
        }
        out = self.infer(feeds)
        cache.append(out, T)
        logits = out["logits"]
        return logits if all_logits else logits[:, -1, :]


def notice(message: str) -> None:
    """A runner's `notice:` line on stderr: something worth knowing that does not stop the run."""
    print(f"notice: {message}", file=sys.stderr)
