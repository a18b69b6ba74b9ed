"""Fewer, larger ops: the exported graph's attentions fused into ONNX Runtime's contrib kernel.

The TorchScript export writes each attention as ~40 small ops (the shape arithmetic of four
reshapes, four transposes, two scalings, two MatMuls, the mask's addition and a Softmax); at a
tweet's size their dispatch costs about as much as their arithmetic. ``fuse_graph`` rewrites each
self-attention of the ISA and IA blocks (``F.scaled_dot_product_attention`` with the text mask, or
with no mask) into one ``com.microsoft.MultiHeadAttention`` on the projected query, key and value,
the text mask passed as its key-padding mask; a pattern that is not exactly the export's is left
alone. The kernel computes each example and head from its own rows: an example's answer stays
the same alone and beside any batch-mates, at any padded length (``tests/test_export.py``). It
scales the scores once instead of Q and K by two square roots: about 1e-6 on fp32 outputs. The
initializers keep their names, so the manifest's ``weights`` table is unchanged.

Measured and not applied (docs/export.md, one thread, AMD EPYC with AVX2): ``SkipLayerNormalization``
for the residual additions and their LayerNorm (8 % slower calls at batch 1 and 16), one integer
GEMM for the query, key and value (no faster), OpenVINO's CPU plugin (slower than ONNX Runtime).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

__all__ = ["OPTIMIZATION", "fuse_graph", "fuse_model"]

# What the manifest records (``optimization``) about a fused graph.
OPTIMIZATION = {
    "fusions": "each self-attention -> com.microsoft.MultiHeadAttention (text mask as key-padding mask)",
    "module": "export.optimize",
}
_MASK_INPUT = "attention_mask"
_KEY_PADDING_MASK = "optimize_key_padding_mask"


def fuse_graph(source: Path, target: Path, num_heads: int) -> dict[str, int]:
    """``fuse_model`` on the graph at ``source``, written to ``target``; returns how many of each
    fusion it made."""
    model = onnx.load(str(source))
    counts = fuse_model(model, num_heads)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return counts


def fuse_model(model: onnx.ModelProto, num_heads: int) -> dict[str, int]:
    """The fusions of the module's docstring, in place; dead nodes are dropped afterwards."""
    counts = {"MultiHeadAttention": _fuse_attention(model.graph, num_heads)}
    _drop_dead_nodes(model.graph)
    if any(counts.values()) and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts


class _Graph:
    """Producers and consumers of a graph's tensors, for pattern matching."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {output: node for node in graph.node for output in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants = {tensor.name for tensor in graph.initializer} | {
            node.output[0] for node in graph.node if node.op_type == "Constant"
        }

    def parent(
        self, node: onnx.NodeProto, index: int, op_type: str | tuple[str, ...]
    ) -> onnx.NodeProto | None:
        if index >= len(node.input):
            return None
        found = self.producer.get(node.input[index])
        kinds = (op_type,) if isinstance(op_type, str) else op_type
        return found if found is not None and found.op_type in kinds else None

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _heads_input(g: _Graph, transpose: onnx.NodeProto | None, perm: list[int]) -> str | None:
    """The (B, L, D) tensor that ``Transpose(Reshape(x, (B, L, heads, size)), perm)`` splits into heads."""
    if transpose is None or list(_attribute(transpose, "perm", [])) != perm:
        return None
    reshape = g.parent(transpose, 0, "Reshape")
    return None if reshape is None else reshape.input[0]


def _scaled(g: _Graph, node: onnx.NodeProto, index: int) -> onnx.NodeProto | None:
    """``Mul(x, Sqrt(scale))``, the exporter's split of SDPA's default 1/sqrt(head size) between Q and K."""
    mul = g.parent(node, index, "Mul")
    if mul is None or g.parent(mul, 1, "Sqrt") is None:
        return None
    return g.parent(mul, 0, "Transpose")


def _from_attention_mask(g: _Graph, name: str) -> bool:
    """Whether ``name`` is computed from the graph input ``attention_mask`` alone (through
    Unsqueeze, Cast, Sub, Mul with constants): the additive mask SDPA's ``attn_mask`` was given."""
    pending, seen, reached = [name], set(), False
    while pending:
        current = pending.pop()
        if current == _MASK_INPUT:
            reached = True
            continue
        if current in seen:
            continue
        seen.add(current)
        node = g.producer.get(current)
        if node is None:
            if current not in g.constants:
                return False
            continue
        if node.op_type == "Constant":
            continue
        if node.op_type not in ("Unsqueeze", "Cast", "Sub", "Mul"):
            return False
        pending.extend(node.input)
    return reached


def _fuse_attention(graph: onnx.GraphProto, num_heads: int) -> int:
    g = _Graph(graph)
    replacements: dict[str, onnx.NodeProto] = {}  # the name of the node each MHA replaces -> the MHA
    needs_mask = False
    for softmax in [node for node in graph.node if node.op_type == "Softmax"]:
        if _attribute(softmax, "axis", -1) != -1:
            continue
        masked = g.parent(softmax, 0, "Add")
        scores = g.parent(masked, 0, "MatMul") if masked is not None else g.parent(softmax, 0, "MatMul")
        if scores is None:
            continue
        if masked is not None and not _from_attention_mask(g, masked.input[1]):
            continue
        query = _heads_input(g, _scaled(g, scores, 0), [0, 2, 1, 3])
        key = _heads_input(g, _scaled(g, scores, 1), [0, 2, 3, 1])
        weighted = g.only_consumer(softmax.output[0], "MatMul")
        if query is None or key is None or weighted is None or weighted.input[0] != softmax.output[0]:
            continue
        value = _heads_input(g, g.parent(weighted, 1, "Transpose"), [0, 2, 1, 3])
        merge = g.only_consumer(weighted.output[0], "Transpose")
        if value is None or merge is None or list(_attribute(merge, "perm", [])) != [0, 2, 1, 3]:
            continue
        output = g.only_consumer(merge.output[0], "Reshape")
        if output is None:
            continue
        inputs = [query, key, value, "", _KEY_PADDING_MASK] if masked is not None else [query, key, value]
        needs_mask |= masked is not None
        replacements[output.name] = helper.make_node(
            "MultiHeadAttention",
            inputs,
            [output.output[0]],
            name=f"{output.name}_fused_attention",
            domain="com.microsoft",
            num_heads=num_heads,
        )
    if not replacements:
        return 0
    nodes = [replacements.get(node.name, node) for node in graph.node]
    if needs_mask:  # 1 where a key is kept, as MultiHeadAttention's 2-D key_padding_mask wants
        nodes.insert(
            0,
            helper.make_node(
                "Cast", [_MASK_INPUT], [_KEY_PADDING_MASK], name=_KEY_PADDING_MASK, to=onnx.TensorProto.INT32
            ),
        )
    del graph.node[:]
    graph.node.extend(nodes)
    return len(replacements)


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Removes nodes none of whose outputs is used (repeatedly: chains of them)."""
    outputs = {value.name for value in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        kept = [node for node in graph.node if any(name in used for name in node.output)]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)
