"""The CPU runner's one hook into our kernels: the model a session loads, and the library it registers.

`session_model(onnx_path, mode)` is called when the CPU provider's session is created. With the
kernels on, it reads model.onnx, swaps our ops in for the nodes they can run (Int4MatMul for
MatMulNBits, Int8MatMul for quantize_dynamic's DynamicQuantizeLinear + MatMulInteger pattern,
CachedAttention for each layer's float32 attention subgraph; runtime/kernels/onnxgraph.py and
attention_pattern.py) and returns the rewritten bytes with the library to register; the
model directory itself is never changed, so it still runs anywhere ONNX Runtime runs.

Modes (`--kernels`):
- "off": the graph as it is.
- "auto" (default): the kernels when the graph has nodes they take and the library builds or is
  built here; otherwise the graph as it is, and why is logged once at INFO on the
  "gptexport.kernels" logger (`--verbose` shows it).
- "on": the kernels, or BackendUnavailable with one line saying why not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import BackendUnavailable, UsageError
from ..kernels import build, onnxgraph

MODES = ("off", "auto", "on")
# what each of our ops replaces: the op type a model must hold for a swap to be worth a look, and
# what the log calls the nodes swapped
SWAPS = {"Int4MatMul": (b"MatMulNBits", "MatMulNBits"), "Int8MatMul": (b"MatMulInteger", "int8 MatMul patterns"),
         "CachedAttention": (b"Softmax", "attention subgraphs")}
# the ops each mode swaps in: "auto" only where they measured faster than ONNX Runtime's own path
# (docs/performance.md, "Our own kernels"); "on" every op we have
OPS = {"off": (), "auto": ("Int4MatMul", "Int8MatMul", "CachedAttention"),
       "on": ("Int4MatMul", "Int8MatMul", "CachedAttention")}
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"
log = logging.getLogger("gptexport.kernels")
_said: set[str] = set()


@dataclass
class SessionModel:
    """What InferenceSession loads: the model's path, or its rewritten bytes and our library."""

    model: str | bytes
    folder: Path  # model.onnx's folder: where its external weights (model.onnx.data) are
    library: Path | None = None
    swapped: int = 0  # nodes now ours (MatMulNBits as Int4MatMul, int8 patterns as Int8MatMul)
    ops: dict[str, int] = field(default_factory=dict)  # how many of each of our ops

    def configure(self, options) -> None:
        """Register the library and, for bytes, say where the external weights lie."""
        if self.library is not None:
            options.register_custom_ops_library(str(self.library))
        if isinstance(self.model, bytes):
            options.add_session_config_entry(EXTERNAL_FOLDER, str(self.folder))


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"--kernels: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    return mode


def session_model(onnx_path: Path, mode: str = "auto") -> SessionModel:
    """The model and library a CPU session should load under `mode` (see the module docstring)."""
    plain = SessionModel(str(onnx_path), onnx_path.parent)
    if check_mode(mode) == "off":
        return plain
    data = onnx_path.read_bytes()
    ops = OPS[mode]
    if mode == "auto" and not any(SWAPS[op][0] in data for op in ops):
        return plain  # nothing to swap: no reason to build anything
    try:
        library = build.ensure_library()
    except build.KernelsUnavailable as e:
        if mode == "on":
            raise BackendUnavailable(f"--kernels on: gptexport's kernel library is unavailable: {e}") from None
        _say_once(f"kernels off: {e}; running ONNX Runtime's own ops")
        return plain
    try:
        rewritten, swapped = onnxgraph.swap_model(data, ops)
    except ValueError as e:  # not a protobuf we can walk; ONNX Runtime will say what it thinks of it
        _say_once(f"kernels off: {onnx_path} could not be read for the swap ({e})")
        return plain
    if not swapped:
        return plain
    said = ", ".join(f"{n} {SWAPS[op][1]} as {op}" for op, n in swapped.items())
    _say_once(f"kernels on: {said} ({build.isa(library)}, {library})")
    return SessionModel(rewritten, onnx_path.parent, library, sum(swapped.values()), swapped)


def availability() -> str:
    """One line for a report: the library's path and code path, or why it is unavailable."""
    try:
        library = build.ensure_library()
        return f"available ({build.isa(library)}): {library}"
    except build.KernelsUnavailable as e:
        return f"unavailable: {e}"


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info(message)
