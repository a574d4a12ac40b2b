"""Swap our Int4MatMul in for MatMulNBits, and our Int8MatMul for ONNX Runtime's dynamic int8
pattern, in a serialized ONNX model, without the onnx package.

The runtime may not import onnx (a serving box has only onnxruntime), and ONNX Runtime offers no
graph editing from Python. Nor can our op simply take MatMulNBits' name: a custom-op domain named
com.microsoft would collide with ONNX Runtime's own schemas, and it would take every MatMulNBits,
those our kernel cannot run (zero points, other block sizes, fp16) included. So the swap edits the
protobuf itself: a model is a sequence of tagged fields (protobuf's wire format), and only three
kinds are touched: ModelProto.graph (7) and .opset_import (8), GraphProto.node (1), and in a node
its input (1), op_type (4) and domain (7). Every other field, the initializers' weight bytes
included, is copied as it was read, so the rewrite costs one copy of the file.

Field numbers are those of onnx/onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto,
TensorProto); they are part of the format and never change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

OP_NAME, DOMAIN = "Int4MatMul", "gptexport"
FLOAT, INT8 = 1, 3  # TensorProto.DataType

# wire types
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


@dataclass
class Field:
    number: int
    wire: int
    raw: memoryview  # the whole field: tag and value
    value: memoryview | int  # LEN: the payload; VARINT: the integer; FIXED: the bytes


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def fields(buf: memoryview) -> Iterator[Field]:
    """The top-level fields of one protobuf message, in order."""
    pos = 0
    while pos < len(buf):
        start = pos
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == VARINT:
            value, pos = _varint(buf, pos)
        elif wire == LEN:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield Field(number, wire, buf[start:pos], value)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def len_field(number: int, payload: bytes | memoryview) -> bytes:
    return _encode_varint(number << 3 | LEN) + _encode_varint(len(payload)) + bytes(payload)


def varint_field(number: int, value: int) -> bytes:
    return _encode_varint(number << 3 | VARINT) + _encode_varint(value)


@dataclass
class Node:
    """What the swap needs to know of a NodeProto."""

    op_type: str = ""
    domain: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    ints: dict[str, int] = field(default_factory=dict)  # its integer attributes


def read_node(buf: memoryview) -> Node:
    node = Node()
    for f in fields(buf):
        if f.number == 1 and f.wire == LEN:
            node.inputs.append(bytes(f.value).decode())
        elif f.number == 2 and f.wire == LEN:
            node.outputs.append(bytes(f.value).decode())
        elif f.number == 4 and f.wire == LEN:
            node.op_type = bytes(f.value).decode()
        elif f.number == 7 and f.wire == LEN:
            node.domain = bytes(f.value).decode()
        elif f.number == 5 and f.wire == LEN:
            name, value = _int_attribute(f.value)
            if name is not None:
                node.ints[name] = value
    return node


def _int_attribute(buf: memoryview) -> tuple[str | None, int]:
    name, value = None, None
    for f in fields(buf):
        if f.number == 1 and f.wire == LEN:
            name = bytes(f.value).decode()
        elif f.number == 3 and f.wire == VARINT:
            value = f.value - (1 << 64) if f.value >= 1 << 63 else f.value
    return (name, value) if value is not None else (None, 0)


def initializers(graph: memoryview) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The graph's initializers: name -> (TensorProto data type, dims)."""
    found = {}
    for f in fields(graph):
        if f.number == 5 and f.wire == LEN:  # GraphProto.initializer: TensorProto
            name, dtype, dims = "", 0, []
            for t in fields(f.value):
                if t.number == 8 and t.wire == LEN:
                    name = bytes(t.value).decode()
                elif t.number == 2 and t.wire == VARINT:
                    dtype = t.value
                elif t.number == 1:  # dims: packed (LEN) or one varint each
                    dims += _packed_varints(t.value) if t.wire == LEN else [t.value]
            found[name] = (dtype, tuple(dims))
    return found


def _packed_varints(buf: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        values.append(value)
    return values


def graph_values(graph: memoryview, number: int) -> set[str]:
    """Names of the graph's inputs (number 11) or outputs (12): ValueInfoProto, its name is field 1."""
    names = set()
    for f in fields(graph):
        if f.number == number and f.wire == LEN:
            names |= {bytes(v.value).decode() for v in fields(f.value) if v.number == 1 and v.wire == LEN}
    return names


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


def _node(buf: memoryview, op: str, inputs: list[str], outputs: list[str]) -> bytes:
    """A NodeProto of our domain: `buf`'s other fields (name, attributes) with these inputs, outputs, op."""
    out = bytearray()
    for name in inputs:
        out += len_field(1, name.encode())
    for name in outputs:
        out += len_field(2, name.encode())
    for f in fields(buf):
        if f.number not in (1, 2, 4, 7):
            out += f.raw
    return bytes(out + len_field(4, op.encode()) + len_field(7, DOMAIN.encode()))


def _swapped_node(buf: memoryview, node: Node, add: Node | None) -> bytes:
    ins = node.inputs + [""] * (6 - len(node.inputs))
    if add is not None:
        ins[5] = add.inputs[1] if add.inputs[0] == node.outputs[0] else add.inputs[0]
    inputs = ins[:3] + ([ins[5]] if ins[5] else [])  # A, B, scales[, bias]
    return _node(buf, OP_NAME, inputs, add.outputs if add is not None else node.outputs)


@dataclass
class Swap:
    """One of our nodes in place of `removed` graph nodes, written where node `at` stood."""

    node: bytes  # the NodeProto
    at: int
    removed: set[int]


def int4_swaps(nodes: list[Node], inits: dict, outputs: set[str], node_bytes: list[memoryview]) -> list[Swap]:
    """Every swappable MatMulNBits as an Int4MatMul, with the bias Add after it."""
    swap = {i for i, node in enumerate(nodes) if swappable(node, inits)}
    fused = bias_adds(nodes, swap, inits, outputs)
    return [Swap(_swapped_node(node_bytes[i], nodes[i], nodes[fused[i]] if i in fused else None), i,
                 {i} | ({fused[i]} if i in fused else set())) for i in sorted(swap)]


# ---- the int8 pattern: what onnxruntime.quantization.quantize_dynamic writes for a MatMul ----
#   DynamicQuantizeLinear(x) -> xq, xs, xzp;  Mul(xs, b_scale) -> s;  MatMulInteger(xq, B, xzp, b_zp) -> i
#   Cast(i, to=FLOAT) -> f;  Mul(f, s) -> y;  [Add(y, bias) -> z]
# becomes Int8MatMul(x, B, b_scale, b_zp[, bias]) -> y (or z), when every intermediate has that one
# use and is no graph output, and B, b_scale, b_zp (and bias) are constants of the shapes it takes.


def _count(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def _other(node: Node, name: str) -> str | None:
    """The other input of a two-input node that takes `name`."""
    if len(node.inputs) != 2 or name not in node.inputs:
        return None
    return node.inputs[1] if node.inputs[0] == name else node.inputs[0]


class _Int8Graph:
    """The lookups the pattern needs: who makes and who uses each value."""

    def __init__(self, nodes: list[Node], inits: dict, outputs: set[str]):
        self.nodes, self.inits, self.outputs = nodes, inits, outputs
        self.uses: dict[str, list[int]] = {}
        self.producer: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for name in node.inputs:
                self.uses.setdefault(name, []).append(i)
            for name in node.outputs:
                self.producer[name] = i

    def only_user(self, name: str, op: str) -> int | None:
        """The one node using `name`, if it is an `op` of the default domain and `name` no graph output."""
        users = self.uses.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        node = self.nodes[users[0]]
        return users[0] if (node.op_type, node.domain) == (op, "") and len(node.outputs) == 1 else None

    def constant(self, name: str | None, dtype: int, counts: tuple[int, ...]) -> bool:
        info = self.inits.get(name or "")
        return info is not None and info[0] == dtype and _count(info[1]) in counts

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
            swaps.append(Swap(_node(node_bytes[m], "Int8MatMul", inputs, nodes[last].outputs), last, set(chain)))
    return swaps


def swap_graph(graph: memoryview, ops: tuple[str, ...] = ("Int4MatMul", "Int8MatMul")) -> tuple[bytes, dict[str, int]]:
    """The GraphProto with the nodes our `ops` compute swapped for them (MatMulNBits for
    Int4MatMul, the int8 pattern for Int8MatMul), and how many of each."""
    # an initializer that is also a graph input can be overridden at run time: not a constant
    inputs = graph_values(graph, 11)
    inits = {name: info for name, info in initializers(graph).items() if name not in inputs}
    node_bytes = [f.value for f in fields(graph) if f.number == 1 and f.wire == LEN]
    nodes = [read_node(b) for b in node_bytes]
    outputs = graph_values(graph, 12)
    swaps = {"Int4MatMul": int4_swaps, "Int8MatMul": int8_swaps}
    found = {op: swaps[op](nodes, inits, outputs, node_bytes) for op in ops}
    placed = {s.at: s for found_op in found.values() for s in found_op}
    removed = {i for s in placed.values() for i in s.removed}
    out, index = bytearray(), 0
    for f in fields(graph):
        if f.number == 1 and f.wire == LEN:
            i, index = index, index + 1
            if i in placed:
                out += len_field(1, placed[i].node)
            elif i not in removed:
                out += f.raw
            continue
        out += f.raw
    return bytes(out), {op: len(s) for op, s in found.items() if s}


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
