"""Find each layer's attention in our exported graph and swap in CachedAttention (attention.cc).

What convert/model.py's `attend` exports, per layer (q, new key/value from the layer's Split; past
key/value and past_length graph inputs; the two masks computed once for all layers):

    Transpose(past_key, perm 0,1,3,2) -> MatMul(q, .) -> Mul(., scale) -> Where(not past_visible, -inf, .)
    Transpose(new_key,  perm 0,1,3,2) -> MatMul(q, .) -> Mul(., scale) -> Where(not new_visible,  -inf, .)
    Concat(both, axis -1) -> Softmax(axis -1) -> Slice [:P] -> MatMul(., past_value) \\
                                               -> Slice [P:] -> MatMul(., new_value)  -> Add -> Transpose(0,2,1,3)

becomes CachedAttention(q, new_key, new_value, past_key, past_value, past_length, scale), whose output
is the last Transpose's, with two more outputs the graph gains: the layer's presents (`present_name`,
typed and shaped as the past), which a runner binds to the past's own buffers so that the op appends
the new keys and values to the cache itself (attention.cc).

Where the positions are found too (Gather(wpe, Add(Unsqueeze(past_length), Range)), as forward_cached
exports them; GatherBlockQuantized in an int4 directory), the graph also takes a flat batch: its
position embedding reads a new input, `position_ids` [batch, sequence], in place of past_length +
0..T-1, and each CachedAttention a new input, `segments` [S, 2] (given empty, [0, 2], every row is
its own segment), so one forward of batch 1 carries the tokens of several rows at their own
positions: the decode tokens of the running rows and a prompt's chunk (the scheduler's mixed step).

Each of the 16 nodes must have its one use in the pattern (else nothing is swapped), the fill must
be -inf, the masks must be those of `attention_masks` (past slots below past_length; new keys by
Trilu(upper=0)), and the cache float32 (the op's type). The mask nodes stay: shared by every layer,
they are no longer used and ONNX Runtime drops them.
"""

from __future__ import annotations

import math

from .onnxproto import (
    FLOAT,
    Graph,
    Node,
    Swap,
    int64_input,
    our_node,
    renamed,
    tensors,
    value_infos,
    value_types,
    with_inputs,
)

PAST_LENGTH = "past_length"  # the graph input of each row's cached positions (config.IOSpec)
POSITION_IDS, SEGMENTS = "position_ids", "segments"  # the inputs of a flat batch (above)


def present_name(past: str) -> str:
    """The graph output CachedAttention writes past input `past` with its new keys into:
    past_key.0 -> present_key.0."""
    return "present" + past[len("past"):]


class _Attention:
    """The matcher: one layer's pattern from its Softmax."""

    def __init__(self, graph: Graph, input_types: dict[str, int], scalars: dict[str, float]):
        self.g, self.input_types, self.scalars = graph, input_types, scalars

    def _one(self, name: str, op: str, by: int | None = None) -> tuple[int, Node] | None:
        """The one user of `name` if it is an `op` (and, with `by`, the node it must be)."""
        i = self.g.only_user(name, op)
        return (i, self.g.nodes[i]) if i is not None and (by is None or i == by) else None

    def _made(self, name: str, op: str, user: int) -> tuple[int, Node] | None:
        """The `op` making `name`, whose one use is node `user`."""
        node = self.g.made_by(name, op)
        if node is None or len(node.outputs) != 1 or self.g.only_user(name, self.g.nodes[user].op_type) != user:
            return None
        return self.g.producer[name], node

    def _scores(self, where: int) -> tuple[list[int], str, str, str] | None:
        """Where(cond, -inf, Mul(MatMul(q, Transpose(key)), scale)): (its nodes, q, key, scale)."""
        w = self.g.nodes[where]
        if len(w.inputs) != 3 or self.scalars.get(w.inputs[1]) != -math.inf:
            return None
        mul = self._made(w.inputs[2], "Mul", where)
        mm = self._made(mul[1].inputs[0], "MatMul", mul[0]) if mul and len(mul[1].inputs) == 2 else None
        scale = mul[1].inputs[1] if mul else None
        if mm is None or scale not in self.scalars or len(mm[1].inputs) != 2:
            return None
        tr = self._made(mm[1].inputs[1], "Transpose", mm[0])
        if tr is None or tr[1].lists.get("perm") != [0, 1, 3, 2]:
            return None
        return [tr[0], mm[0], mul[0]], mm[1].inputs[0], tr[1].inputs[0], scale

    def _mask(self, where: int) -> Node | None:
        """What Where's condition is the negation of, through Not(Unsqueeze(mask))."""
        cond = self.g.made_by(self.g.nodes[where].inputs[0], "Not")
        unsqueezed = self.g.made_by(cond.inputs[0], "Unsqueeze") if cond else None
        i = self.g.producer.get(unsqueezed.inputs[0]) if unsqueezed else None
        return self.g.nodes[i] if i is not None else None

    def _masks_are_ours(self, past_where: int, new_where: int) -> bool:
        past, new = self._mask(past_where), self._mask(new_where)
        lengths = self.g.made_by(past.inputs[1], "Unsqueeze") if past and past.op_type == "Less" else None
        return (lengths is not None and lengths.inputs[0] == PAST_LENGTH
                and new is not None and new.op_type == "Trilu" and new.ints.get("upper") == 0)

    def match(self, s: int) -> tuple[list[str], list[int], list[str]] | None:
        """CachedAttention's inputs, the nodes it replaces (in graph order of the pattern) and its
        output, for the Softmax at `s`."""
        soft = self.g.nodes[s]
        if soft.ints.get("axis", -1) not in (-1, 3) or len(soft.inputs) != 1:
            return None
        cat = self._made(soft.inputs[0], "Concat", s)
        if cat is None or cat[1].ints.get("axis") not in (-1, 3) or len(cat[1].inputs) != 2:
            return None
        wheres = [self._made(name, "Where", cat[0]) for name in cat[1].inputs]
        if None in wheres:
            return None
        (pw, _), (nw, _) = wheres
        past, new = self._scores(pw), self._scores(nw)
        if past is None or new is None or past[1] != new[1] or past[3] != new[3] or not self._masks_are_ours(pw, nw):
            return None
        q, past_key, new_key, scale = past[1], past[2], new[2], past[3]
        if soft.outputs[0] in self.g.outputs:  # probabilities someone reads: they must stay
            return None
        users = self.g.uses.get(soft.outputs[0], [])
        slices = [(i, self.g.nodes[i]) for i in users]
        if len(slices) != 2 or any(n.op_type != "Slice" or len(n.outputs) != 1 for _, n in slices):
            return None
        products = [self._one(n.outputs[0], "MatMul") for _, n in slices]
        if None in products or any(len(n.inputs) != 2 for _, n in products):
            return None
        # the slice [:P] meets the past values (a graph input), the slice [P:] the new ones
        products.sort(key=lambda p: p[1].inputs[1] not in self.input_types)
        (pm, pmn), (nm, nmn) = products
        past_value, new_value = pmn.inputs[1], nmn.inputs[1]
        add = self._one(pmn.outputs[0], "Add")
        out = self._one(add[1].outputs[0], "Transpose") if add and self._one(nmn.outputs[0], "Add", add[0]) else None
        if (out is None or out[1].lists.get("perm") != [0, 2, 1, 3] or past_key not in self.input_types
                or past_value not in self.input_types or new_key in self.input_types
                or self.input_types.get(past_key) != FLOAT or self.input_types.get(PAST_LENGTH) is None):
            return None
        chain = [*past[0], *new[0], pw, nw, cat[0], s, *(i for i, _ in slices), pm, nm, add[0], out[0]]
        return [q, new_key, new_value, past_key, past_value, PAST_LENGTH, scale], chain, out[1].outputs


def attention_swaps(graph: memoryview, nodes: list[Node], inits: dict, outputs: set[str],
                    node_bytes: list[memoryview]) -> list[Swap]:
    """Every layer's attention (above) as a CachedAttention, written where its last Transpose stood."""
    scalars = {t.name: t.scalar for t in tensors(graph) if t.scalar is not None}
    matcher = _Attention(Graph(nodes, inits, outputs), value_types(graph, 11), scalars)
    infos = value_infos(graph, 11)
    # a flat batch needs the positions and every read of the batch size found (else: none)
    positions = _positions(matcher.g) if "input_ids" in infos else None
    batch = _batch_shapes(matcher.g, {PAST_LENGTH, *(n for n in infos if n.startswith("past_"))}) if positions else None
    flat = batch is not None
    swaps = []
    for s, node in enumerate(nodes):
        found = matcher.match(s) if (node.op_type, node.domain) == ("Softmax", "") else None
        if found is not None:
            inputs, chain, out = found
            pasts = inputs[3:5]
            node = our_node(memoryview(b""), "CachedAttention", inputs + [SEGMENTS] * flat,
                            out + [present_name(p) for p in pasts])
            swaps.append(Swap(node, chain[-1], set(chain), tuple(renamed(infos[p], present_name(p)) for p in pasts)))
    if swaps and flat:
        at, gather = positions
        # the graph's batch size (its reshapes') from input_ids: a flat batch has rows of past, one of tokens
        swaps += [Swap(with_inputs(node_bytes[i], ["input_ids"]), i, {i}) for i in batch]
        rewired = with_inputs(node_bytes[at], [gather.inputs[0], POSITION_IDS, *gather.inputs[2:]])
        swaps.append(Swap(rewired, at, {at},
                          graph_inputs=(renamed(infos["input_ids"], POSITION_IDS),
                                        int64_input(SEGMENTS, ("segments", 2)))))
    return swaps


def _batch_shapes(g: Graph, rows: set[str]) -> list[int] | None:
    """The Shape nodes reading the batch size (dim 0, alone) off past_length or a past, where
    torch.export took it from; None if one of them reads anything else (its meaning unknown here)."""
    found = []
    for i, node in enumerate(g.nodes):
        if (node.op_type, node.domain) == ("Shape", "") and node.inputs and node.inputs[0] in rows:
            if node.ints.get("start", 0) != 0 or node.ints.get("end") != 1:
                if node.inputs[0] == PAST_LENGTH or node.ints.get("start", 0) < 2 or "end" not in node.ints:
                    return None  # (a past's P, dims 2..3, is read by the attention masks: never the batch)
                continue
            found.append(i)
    return found


# the embedding lookups whose indices are input 1: ONNX's, and the int4 directories' (gptexport
# quantize --int4 quantizes the tables too)
GATHERS = {("Gather", ""), ("GatherBlockQuantized", "com.microsoft")}


def _positions(g: Graph) -> tuple[int, Node] | None:
    """The position embedding's Gather(wpe, Add(Unsqueeze(past_length), Range(0, T, 1))): (its index, it)."""
    for i, node in enumerate(g.nodes):
        if (node.op_type, node.domain) not in GATHERS or len(node.inputs) < 2 or node.inputs[0] not in g.inits:
            continue
        add = g.made_by(node.inputs[1], "Add")
        if add is None or len(add.inputs) != 2:
            continue
        made = [g.made_by(name, op) for name, op in zip(add.inputs, ("Unsqueeze", "Range"))]
        if made[0] is not None and made[1] is not None and made[0].inputs[0] == PAST_LENGTH:
            return i, node
    return None
