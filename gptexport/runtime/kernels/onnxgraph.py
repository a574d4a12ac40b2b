"""Swap our Int4MatMul in for MatMulNBits, our Int8MatMul for ONNX Runtime's dynamic int8 pattern,
and our CachedAttention for each layer's attention, in a serialized ONNX model, without the onnx
package.

The runtime may not import onnx (a serving box has only onnxruntime), and ONNX Runtime offers no
graph editing from Python. Nor can our op simply take MatMulNBits' name: a custom-op domain named
com.microsoft would collide with ONNX Runtime's own schemas, and it would take every MatMulNBits,
those our kernel cannot run (zero points, other block sizes, fp16) included. So the swap edits the
protobuf itself: a model is a sequence of tagged fields (protobuf's wire format), and only three
kinds are touched: ModelProto.graph (7) and .opset_import (8), GraphProto.node (1), .output (12:
CachedAttention's presents are added) and .input (11: a flat batch's), and in a node its input (1),
output (2), op_type (4) and domain (7). Every other field, the initializers' weight bytes
included, is copied as it was read, so the rewrite costs one copy of the file.

The wire format itself (reading fields, nodes, initializers; writing nodes) is onnxproto.py; each
layer's attention subgraph is found in attention_pattern.py.
"""

from __future__ import annotations

from .attention_pattern import attention_swaps
from .onnxproto import (
    DOMAIN,
    FLOAT,
    INT8,
    LEN,
    Graph,
    Node,
    Swap,
    fields,
    initializer_name,
    initializers,
    len_field,
    our_node,
    read_node,
    value_types,
    varint_field,
)

OP_NAME = "Int4MatMul"
__all__ = ["DOMAIN", "swap_graph", "swap_model"]


def swappable(node: Node, inits: dict) -> bool:
    """A MatMulNBits our Int4MatMul computes: 4 bits, blocks of 32, symmetric (no zero points, no
    g_idx), fp32 (its scales are), weights and scales constant."""
    if (node.op_type, node.domain) != ("MatMulNBits", "com.microsoft"):
        return False
    ins = node.inputs + [""] * (6 - len(node.inputs))
    return (node.ints.get("bits") == 4 and node.ints.get("block_size") == 32 and not ins[3] and not ins[4]
            and ins[1] in inits and inits.get(ins[2], (0,))[0] == FLOAT)


def bias_adds(nodes: list[Node], swap: set[int], inits: dict, outputs: set[str]) -> dict[int, int]:
    """{swapped node: the Add it absorbs}: an Add of its output (used nowhere else, not a graph
    output) and a float initializer of shape [N], as torch's Linear exports with a bias. ONNX
    Runtime fuses those Adds into MatMulNBits itself; swapped before its optimizer runs, our node
    must take them the same way or each stays a node of its own."""
    uses: dict[str, list[int]] = {}
    for j, node in enumerate(nodes):
        for name in node.inputs:
            uses.setdefault(name, []).append(j)
    fused = {}
    for i in swap:
        node = nodes[i]
        y = node.outputs[0] if node.outputs else ""
        if len(node.inputs) > 5 and node.inputs[5] or y in outputs or len(uses.get(y, [])) != 1:
            continue
        j = uses[y][0]
        add = nodes[j]
        if (add.op_type, add.domain) != ("Add", "") or len(add.inputs) != 2 or len(add.outputs) != 1:
            continue
        bias = add.inputs[1] if add.inputs[0] == y else add.inputs[0]
        if bias != y and inits.get(bias) == (FLOAT, (node.ints.get("N"),)):
            fused[i] = j
    return fused



def _swappedour_node(buf: memoryview, node: Node, add: Node | None) -> bytes:
    ins = node.inputs + [""] * (6 - len(node.inputs))
    if add is not None:
        ins[5] = add.inputs[1] if add.inputs[0] == node.outputs[0] else add.inputs[0]
    inputs = ins[:3] + ([ins[5]] if ins[5] else [])  # A, B, scales[, bias]
    return our_node(buf, OP_NAME, inputs, add.outputs if add is not None else node.outputs)



def int4_swaps(nodes: list[Node], inits: dict, outputs: set[str], node_bytes: list[memoryview]) -> list[Swap]:
    """Every swappable MatMulNBits as an Int4MatMul, with the bias Add after it."""
    swap = {i for i, node in enumerate(nodes) if swappable(node, inits)}
    fused = bias_adds(nodes, swap, inits, outputs)
    return [Swap(_swappedour_node(node_bytes[i], nodes[i], nodes[fused[i]] if i in fused else None), i,
                 {i} | ({fused[i]} if i in fused else set())) for i in sorted(swap)]


# ---- the int8 pattern: what onnxruntime.quantization.quantize_dynamic writes for a MatMul ----
#   DynamicQuantizeLinear(x) -> xq, xs, xzp;  Mul(xs, b_scale) -> s;  MatMulInteger(xq, B, xzp, b_zp) -> i
#   Cast(i, to=FLOAT) -> f;  Mul(f, s) -> y;  [Add(y, bias) -> z]
# becomes Int8MatMul(x, B, b_scale, b_zp[, bias]) -> y (or z), when every intermediate has that one
# use and is no graph output, and B, b_scale, b_zp (and bias) are constants of the shapes it takes.



def _other(node: Node, name: str) -> str | None:
    """The other input of a two-input node that takes `name`."""
    if len(node.inputs) != 2 or name not in node.inputs:
        return None
    return node.inputs[1] if node.inputs[0] == name else node.inputs[0]


class _Int8Graph(Graph):
    """The int8 pattern's matcher on the graph's lookups."""

    def match(self, m: int) -> tuple[list[str], list[int]] | None:
        """Int8MatMul's inputs and the pattern's nodes (in order), for the MatMulInteger at `m`."""
        mm = self.nodes[m]
        if len(mm.inputs) != 4 or len(mm.outputs) != 1:
            return None
        xq, b, xzp, b_zp = mm.inputs
        info = self.inits.get(b)
        if info is None or info[0] != INT8 or len(info[1]) != 2 or not self.constant(b_zp, INT8, (1, info[1][1])):
            return None
        n = info[1][1]
        d = self.producer.get(xq)
        dql = self.nodes[d] if d is not None else None
        if (dql is None or (dql.op_type, dql.domain) != ("DynamicQuantizeLinear", "") or len(dql.outputs) != 3
                or dql.outputs[::2] != [xq, xzp]
                or self.only_user(xq, "MatMulInteger") != m or self.only_user(xzp, "MatMulInteger") != m):
            return None
        s, c = self.only_user(dql.outputs[1], "Mul"), self.only_user(mm.outputs[0], "Cast")
        if s is None or c is None or self.nodes[c].ints.get("to") != FLOAT:
            return None
        b_scale = _other(self.nodes[s], dql.outputs[1])
        f = self.only_user(self.nodes[c].outputs[0], "Mul")
        scaled = self.nodes[s].outputs[0]  # a_scale * b_scale
        if (not self.constant(b_scale, FLOAT, (1, n)) or f is None or self.only_user(scaled, "Mul") != f
                or _other(self.nodes[f], self.nodes[c].outputs[0]) != scaled):
            return None
        inputs, chain = [dql.inputs[0], b, b_scale, b_zp], [d, s, m, c, f]
        a = self.only_user(self.nodes[f].outputs[0], "Add")
        bias = _other(self.nodes[a], self.nodes[f].outputs[0]) if a is not None else None
        if bias is not None and self.inits.get(bias) == (FLOAT, (n,)):
            inputs, chain = inputs + [bias], chain + [a]
        return inputs, chain


def int8_swaps(nodes: list[Node], inits: dict, outputs: set[str], node_bytes: list[memoryview]) -> list[Swap]:
    """Every int8 pattern (above) as an Int8MatMul, written where its last node stood."""
    graph, swaps = _Int8Graph(nodes, inits, outputs), []
    for m, node in enumerate(nodes):
        found = graph.match(m) if (node.op_type, node.domain) == ("MatMulInteger", "") else None
        if found is not None:
            inputs, chain = found
            last = chain[-1]
            swaps.append(Swap(our_node(node_bytes[m], "Int8MatMul", inputs, nodes[last].outputs), last, set(chain)))
    return swaps


def swap_graph(graph: memoryview, ops: tuple[str, ...] = ("Int4MatMul", "Int8MatMul")) -> tuple[bytes, dict[str, int]]:
    """The GraphProto with the nodes our `ops` compute swapped for them (MatMulNBits for
    Int4MatMul, the int8 pattern for Int8MatMul, a layer's attention subgraph for CachedAttention),
    and how many of each."""
    # an initializer that is also a graph input can be overridden at run time: not a constant
    inputs = value_types(graph, 11)
    inits = {name: info for name, info in initializers(graph).items() if name not in inputs}
    node_bytes = [f.value for f in fields(graph) if f.number == 1 and f.wire == LEN]
    nodes = [read_node(b) for b in node_bytes]
    outputs = set(value_types(graph, 12))
    swaps = {"Int4MatMul": int4_swaps, "Int8MatMul": int8_swaps,
             "CachedAttention": lambda *found: attention_swaps(graph, *found)}
    found = {op: swaps[op](nodes, inits, outputs, node_bytes) for op in ops}
    placed = {s.at: s for found_op in found.values() for s in found_op}
    removed = {i for s in placed.values() for i in s.removed}
    # initializers only the removed nodes used (the attention's -inf and slice bounds) go with them:
    # ONNX Runtime would warn of each at every session's creation
    still_used = {name for i, node in enumerate(nodes) if i not in removed for name in node.inputs}
    still_used |= {name for s in placed.values() for name in read_node(memoryview(s.node)).inputs} | outputs
    dropped = {name for i in removed for name in nodes[i].inputs if name in inits and name not in still_used}
    out, index = bytearray(), 0
    for f in fields(graph):
        if f.number == 1 and f.wire == LEN:
            i, index = index, index + 1
            if i in placed:
                out += len_field(1, placed[i].node)
            elif i not in removed:
                out += f.raw
            continue
        if f.number == 5 and f.wire == LEN and dropped and initializer_name(f.value) in dropped:
            continue
        out += f.raw
    for s in placed.values():
        out += b"".join([*(len_field(12, i) for i in s.graph_outputs), *(len_field(11, i) for i in s.graph_inputs)])
    # (the attention's swaps include the position embedding's Gather, rewired: not one of ours)
    ours = {op: sum(read_node(memoryview(s.node)).op_type == op for s in found_op) for op, found_op in found.items()}
    return bytes(out), {op: n for op, n in ours.items() if n}



def swap_model(model: bytes, ops: tuple[str, ...] = ("Int4MatMul", "Int8MatMul")) -> tuple[bytes, dict[str, int]]:
    """The ModelProto with the nodes our `ops` compute swapped and our domain imported, and how
    many of each op (the model's own bytes and {} when none)."""
    buf = memoryview(model)
    out, swapped = bytearray(), {}
    for f in fields(buf):
        if f.number == 7 and f.wire == LEN:
            graph, swapped = swap_graph(f.value, ops)
            out += len_field(7, graph)
        else:
            out += f.raw
    if not swapped:
        return model, {}
    out += len_field(8, len_field(1, DOMAIN.encode()) + varint_field(2, 1))  # opset_import {domain, version}
    return bytes(out), swapped
