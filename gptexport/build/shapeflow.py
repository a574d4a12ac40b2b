"""Which shape computations of an ONNX graph read the *values* of given inputs: a static data-flow check.

A CUDA graph replays the kernels, launch sizes and addresses of the step it recorded. `past_length`
and `logit_positions` change every decode step, so they may reach device kernels only (the mask,
the position embedding's Gather): if a shape were computed from their values, ONNX Runtime would
read them on the host each step (a copy from the device on its CUDA provider) and a captured graph
would keep replaying the shape of the step it was captured at. The check follows every tensor
computed from those inputs' values through the graph and reports each operator input that decides
an output's shape from them (Reshape's `shape`, Slice's `starts`/`ends`, Range, TopK's `K`, ...).

`Shape(x)` and `Size(x)` read only x's shape, never its values, so they end a value's flow: the
shape of `past_key.0` (the cache capacity) may freely decide shapes, the value of `past_length`
may not. The flow is conservative: any other operator's outputs carry the values of all its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

# Operator inputs (by position) whose values decide the shape of an output (or which branch / how
# many iterations run). From the ONNX operator specs, opsets 13-24.
SHAPE_INPUTS: dict[str, dict[int, str]] = {
    "Reshape": {1: "shape"},
    "Expand": {1: "shape"},
    "Slice": {1: "starts", 2: "ends", 3: "axes", 4: "steps"},
    "Range": {0: "start", 1: "limit", 2: "delta"},
    "ConstantOfShape": {0: "input"},
    "Tile": {1: "repeats"},
    "TopK": {1: "K"},
    "Pad": {1: "pads", 3: "axes"},
    "Resize": {2: "scales", 3: "sizes"},
    "Upsample": {1: "scales"},
    "Squeeze": {1: "axes"},
    "Unsqueeze": {1: "axes"},
    "Split": {1: "split"},
    "OneHot": {1: "depth"},
    "CenterCropPad": {1: "shape"},
    "Col2Im": {1: "image_shape", 2: "block_shape"},
    "DFT": {1: "dft_length", 2: "axis"},
    "STFT": {1: "frame_step", 3: "frame_length"},
    "NonZero": {0: "X"},  # data-dependent output shapes: the count of what passes
    "Compress": {1: "condition"},
    "Unique": {0: "X"},
    "NonMaxSuppression": {0: "boxes", 1: "scores", 2: "max_output_boxes_per_class", 3: "iou_threshold",
                          4: "score_threshold"},
    "If": {0: "cond"},
    "Loop": {0: "M", 1: "cond"},
    **{op: {1: "axes"} for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                                  "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}
# Operators whose outputs do not depend on their inputs' values (only on shapes, or on nothing)
VALUE_FREE = {"Shape", "Size", "EyeLike", "RandomNormalLike", "RandomUniformLike"}


@dataclass(frozen=True)
class ShapeRead:
    """One operator input that decides a shape from the value of watched inputs."""

    node: str
    op_type: str
    input_index: int
    role: str
    sources: tuple[str, ...]

    def __str__(self) -> str:
        return (f"input {self.input_index} ({self.role}) is computed from the value of {', '.join(self.sources)}: "
                f"a shape read on the host each step, which a CUDA graph would replay frozen")


def shape_reads(graph, watched: tuple[str, ...]) -> list[ShapeRead]:
    """Every operator input of `graph` (subgraphs included) whose value flows from a watched input."""
    names = {v.name for v in graph.input}
    flows = {name: frozenset([name]) for name in watched if name in names}
    return _walk(graph, flows, [])


def _walk(graph, flows: dict[str, frozenset], found: list[ShapeRead]) -> list[ShapeRead]:
    flows = dict(flows)  # a subgraph sees the outer scope's flows; its own stay inside it
    for i, node in enumerate(graph.node):  # ONNX graphs are topologically sorted
        incoming = [flows.get(name, frozenset()) for name in node.input]
        for index, role in SHAPE_INPUTS.get(node.op_type, {}).items():
            if index < len(incoming) and incoming[index]:
                found.append(ShapeRead(node.name or f"node #{i}", node.op_type, index, role,
                                       tuple(sorted(incoming[index]))))
        carried = frozenset().union(*incoming) if node.op_type not in VALUE_FREE else frozenset()
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == attr.GRAPH else list(attr.graphs):
                inner = {**flows, **{v.name: carried for v in sub.input}}  # loop-carried values, conservatively
                _walk(sub, inner, found)
                carried = carried.union(*(_outer_flows(sub, flows)))
        for name in node.output:
            if name and carried:
                flows[name] = carried
    return found


def _outer_flows(sub, flows: dict[str, frozenset]) -> list[frozenset]:
    """The flows of outer-scope tensors a subgraph reads (its outputs may carry them)."""
    local = {v.name for v in sub.input} | {o for n in sub.node for o in n.output} | {t.name for t in sub.initializer}
    return [flows[name] for n in sub.node for name in n.input if name in flows and name not in local]
