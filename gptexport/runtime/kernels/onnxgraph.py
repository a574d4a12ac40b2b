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
    ints: dict[str, int] = field(default_factory=dict)  # its integer attributes


def read_node(buf: memoryview) -> Node:
    node = Node()
    for f in fields(buf):
        if f.number == 1 and f.wire == LEN:
            node.inputs.append(bytes(f.value).decode())
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


def float_initializers(graph: memoryview) -> set[str]:
    """Names of the graph's initializers, with FLOAT data type marked by a trailing '/f'."""
    names = set()
    for f in fields(graph):
        if f.number == 5 and f.wire == LEN:  # GraphProto.initializer: TensorProto
            name, dtype = "", 0
            for t in fields(f.value):
                if t.number == 8 and t.wire == LEN:
                    name = bytes(t.value).decode()
                elif t.number == 2 and t.wire == VARINT:
                    dtype = t.value
            names.add(name)
            if dtype == FLOAT:
                names.add(name + "/f")
    return names


def swappable(node: Node, initializers: set[str]) -> bool:
    """A MatMulNBits our Int4MatMul computes: 4 bits, blocks of 32, symmetric (no zero points, no
    g_idx), fp32 (its scales are), weights and scales constant."""
    if (node.op_type, node.domain) != ("MatMulNBits", "com.microsoft"):
        return False
    ins = node.inputs + [""] * (6 - len(node.inputs))
    return (node.ints.get("bits") == 4 and node.ints.get("block_size") == 32 and not ins[3] and not ins[4]
            and ins[1] in initializers and ins[2] + "/f" in initializers)


def _swapped_node(buf: memoryview, node: Node) -> bytes:
    ins = node.inputs + [""] * (6 - len(node.inputs))
    inputs = ins[:3] + ([ins[5]] if ins[5] else [])  # A, B, scales[, bias]
    out = bytearray()
    for name in inputs:
        out += len_field(1, name.encode())
    for f in fields(buf):
        if f.number not in (1, 4, 7):
            out += f.raw
    return bytes(out + len_field(4, OP_NAME.encode()) + len_field(7, DOMAIN.encode()))


def swap_graph(graph: memoryview) -> tuple[bytes, int]:
    """The GraphProto with every swappable MatMulNBits node made an Int4MatMul, and how many."""
    initializers = float_initializers(graph)
    out, swapped = bytearray(), 0
    for f in fields(graph):
        if f.number == 1 and f.wire == LEN:
            node = read_node(f.value)
            if swappable(node, initializers):
                out += len_field(1, _swapped_node(f.value, node))
                swapped += 1
                continue
        out += f.raw
    return bytes(out), swapped


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
