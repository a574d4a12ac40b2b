"""The protobuf wire format of an ONNX model, as much of it as our graph swaps read and write
(onnxgraph.py, attention_pattern.py), without the onnx package: a model is a sequence of tagged
fields, and a swap reads nodes, initializers and graph inputs and writes new nodes; every other
field is copied as it was read.

Field numbers are those of onnx/onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto,
TensorProto, ValueInfoProto); they are part of the format and never change.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator

DOMAIN = "gptexport"  # our ops' domain
FLOAT, INT8, INT64 = 1, 3, 7  # TensorProto.DataType

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
    lists: dict[str, list[int]] = field(default_factory=dict)  # its integer-list attributes (perm)


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
            name, value, values = _int_attribute(f.value)
            if name is not None and value is not None:
                node.ints[name] = value
            elif name is not None and values:
                node.lists[name] = values
    return node


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _int_attribute(buf: memoryview) -> tuple[str | None, int | None, list[int]]:
    """An AttributeProto's name, its integer (i, field 3) and its integers (ints, field 8)."""
    name, value, values = None, None, []
    for f in fields(buf):
        if f.number == 1 and f.wire == LEN:
            name = bytes(f.value).decode()
        elif f.number == 3 and f.wire == VARINT:
            value = _signed(f.value)
        elif f.number == 8:  # packed (LEN) or one varint each
            values += [_signed(v) for v in (packed_varints(f.value) if f.wire == LEN else [f.value])]
    return name, value, values


@dataclass
class Tensor:
    """What the swaps read of a TensorProto: its name, data type and dims, and the value of a float
    tensor of one element (raw_data or float_data; None otherwise)."""

    name: str
    dtype: int
    dims: tuple[int, ...]
    scalar: float | None = None


def read_tensor(buf: memoryview) -> Tensor:
    name, dtype, dims, value = "", 0, [], None
    for t in fields(buf):
        if t.number == 8 and t.wire == LEN:
            name = bytes(t.value).decode()
        elif t.number == 2 and t.wire == VARINT:
            dtype = t.value
        elif t.number == 1:  # dims: packed (LEN) or one varint each
            dims += packed_varints(t.value) if t.wire == LEN else [t.value]
        elif t.number == 9 and t.wire == LEN and len(t.value) == 4:  # raw_data
            value = struct.unpack("<f", t.value)[0]
        elif t.number == 4 and (t.wire == FIXED32 or (t.wire == LEN and len(t.value) == 4)):  # float_data
            value = struct.unpack("<f", t.value)[0]
    scalar = value if dtype == FLOAT and count(tuple(dims)) == 1 else None
    return Tensor(name, dtype, tuple(dims), scalar)


def tensors(graph: memoryview) -> list[Tensor]:
    """The graph's initializers (GraphProto.initializer: TensorProto)."""
    return [read_tensor(f.value) for f in fields(graph) if f.number == 5 and f.wire == LEN]


def initializers(graph: memoryview) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The graph's initializers: name -> (TensorProto data type, dims)."""
    return {t.name: (t.dtype, t.dims) for t in tensors(graph)}


def packed_varints(buf: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        values.append(value)
    return values


def value_types(graph: memoryview, number: int) -> dict[str, int]:
    """The graph's inputs (number 11) or outputs (12): name -> TensorProto data type
    (ValueInfoProto: name 1, type 2; TypeProto.tensor_type 1; its elem_type 1)."""
    types = {}
    for f in fields(graph):
        if f.number == number and f.wire == LEN:
            name, elem = "", 0
            for v in fields(f.value):
                if v.number == 1 and v.wire == LEN:
                    name = bytes(v.value).decode()
                elif v.number == 2 and v.wire == LEN:
                    tensor_type = next((t.value for t in fields(v.value) if t.number == 1 and t.wire == LEN), None)
                    if tensor_type is not None:
                        elem = next((e.value for e in fields(tensor_type) if e.number == 1), 0)
            types[name] = elem
    return types


def value_infos(graph: memoryview, number: int) -> dict[str, memoryview]:
    """The graph's inputs (number 11) or outputs (12) as ValueInfoProto payloads, by name."""
    infos = {}
    for f in fields(graph):
        if f.number == number and f.wire == LEN:
            name = next((bytes(v.value).decode() for v in fields(f.value) if v.number == 1 and v.wire == LEN), "")
            infos[name] = f.value
    return infos


def renamed(value_info: memoryview, name: str) -> bytes:
    """A ValueInfoProto: `value_info`'s type and shape (field 2) under another name."""
    return len_field(1, name.encode()) + b"".join(bytes(f.raw) for f in fields(value_info) if f.number == 2)


def with_inputs(buf: memoryview, inputs: list[str]) -> bytes:
    """The NodeProto `buf` with other inputs (everything else as it was)."""
    return b"".join([*(len_field(1, name.encode()) for name in inputs), *(bytes(f.raw) for f in fields(buf)
                                                                        if f.number != 1)])


def our_node(buf: memoryview, op: str, inputs: list[str], outputs: list[str]) -> bytes:
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


def int64_input(name: str, dims: tuple[int | str, ...]) -> bytes:
    """A ValueInfoProto of an int64 tensor; a dim is a value (int) or a name (str, dim_param)."""
    shape = b"".join(len_field(1, varint_field(1, d) if isinstance(d, int) else len_field(2, d.encode()))
                     for d in dims)
    return len_field(1, name.encode()) + len_field(2, len_field(1, varint_field(1, INT64) + len_field(2, shape)))


@dataclass
class Swap:
    """One of our nodes in place of `removed` graph nodes, written where node `at` stood."""

    node: bytes  # the NodeProto
    at: int
    removed: set[int]
    graph_outputs: tuple[bytes, ...] = ()  # ValueInfoProtos of outputs of `node` the graph gains
    graph_inputs: tuple[bytes, ...] = ()  # ValueInfoProtos of inputs the graph gains


def count(dims: tuple[int, ...]) -> int:
    """Elements of a tensor of these dimensions."""
    n = 1
    for d in dims:
        n *= d
    return n


class Graph:
    """The lookups a pattern needs: who makes and who uses each value."""

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

    def made_by(self, name: str, op: str) -> Node | None:
        """The node making `name`, if it is an `op` of the default domain."""
        i = self.producer.get(name)
        node = self.nodes[i] if i is not None else None
        return node if node is not None and (node.op_type, node.domain) == (op, "") else None

    def constant(self, name: str | None, dtype: int, counts: tuple[int, ...]) -> bool:
        info = self.inits.get(name or "")
        return info is not None and info[0] == dtype and count(info[1]) in counts


def initializer_name(tensor: memoryview) -> str:
    return next((bytes(t.value).decode() for t in fields(tensor) if t.number == 8 and t.wire == LEN), "")
