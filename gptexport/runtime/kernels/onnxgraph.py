"""Swap our Int4MatMul in for MatMulNBits in a serialized ONNX model, without the onnx package.

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
FLOAT = 1  # TensorProto.DataType FLOAT

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


def _swapped_node(buf: memoryview, node: Node, add: Node | None) -> bytes:
    ins = node.inputs + [""] * (6 - len(node.inputs))
    if add is not None:
        ins[5] = add.inputs[1] if add.inputs[0] == node.outputs[0] else add.inputs[0]
    inputs = ins[:3] + ([ins[5]] if ins[5] else [])  # A, B, scales[, bias]
    outputs = add.outputs if add is not None else node.outputs
    out = bytearray()
    for name in inputs:
        out += len_field(1, name.encode())
    for name in outputs:
        out += len_field(2, name.encode())
    for f in fields(buf):
        if f.number not in (1, 2, 4, 7):
            out += f.raw
    return bytes(out + len_field(4, OP_NAME.encode()) + len_field(7, DOMAIN.encode()))


def swap_graph(graph: memoryview) -> tuple[bytes, int]:
    """The GraphProto with every swappable MatMulNBits node made an Int4MatMul (taking the bias
    Add after it), and how many."""
    # an initializer that is also a graph input can be overridden at run time: not a constant
    inputs = graph_values(graph, 11)
    inits = {name: info for name, info in initializers(graph).items() if name not in inputs}
    node_fields = [f for f in fields(graph) if f.number == 1 and f.wire == LEN]
    nodes = [read_node(f.value) for f in node_fields]
    swap = {i for i, node in enumerate(nodes) if swappable(node, inits)}
    fused = bias_adds(nodes, swap, inits, graph_values(graph, 12))
    absorbed = set(fused.values())
    out, index = bytearray(), 0
    for f in fields(graph):
        if f.number == 1 and f.wire == LEN:
            i, index = index, index + 1
            if i in swap:
                out += len_field(1, _swapped_node(f.value, nodes[i], nodes[fused[i]] if i in fused else None))
            elif i not in absorbed:
                out += f.raw
            continue
        out += f.raw
    return bytes(out), len(swap)


def swap_model(model: bytes) -> tuple[bytes, int]:
    """The ModelProto with its swappable MatMulNBits nodes swapped and our domain imported, and how
    many were swapped (the model's own bytes when none)."""
    buf = memoryview(model)
    out, swapped = bytearray(), 0
    for f in fields(buf):
        if f.number == 7 and f.wire == LEN:
            graph, swapped = swap_graph(f.value)
            out += len_field(7, graph)
        else:
            out += f.raw
    if not swapped:
        return model, 0
    out += len_field(8, len_field(1, DOMAIN.encode()) + varint_field(2, 1))  # opset_import {domain, version}
    return bytes(out), swapped
