"""InsertQueryKeyHadamard: queries and keys rotated by one Hadamard per head after RoPE, so the KV cache
stores rotated keys (QuaRot's rotation for a low-bit KV cache)."""

from __future__ import annotations

import onnx_ir as ir

from qcompile import analysis, custom_ops, errors
from qcompile.passes.insert_online_hadamard import hadamard_factors, known_hadamard

# ops between the attention scores MatMul and the softmax (mask, scale, a softcap c·tanh(s / c)), and between
# a cache Concat and the scores MatMul's key input (GQA's repeat, transposes, the scale)
SCORE_PATH_OPS = {"Add", "Where", "Mul", "Div", "Cast", "Tanh"}
KEY_PATH_OPS = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Mul", "Div", "Cast", "Identity"}


class InsertQueryKeyHadamard(ir.passes.InPlacePass):
    """softmax((q·H)(k·H)ᵀ) = softmax(q·kᵀ) for an orthogonal H of the head size: `qcompile.Hadamard`
    runs on every block's post-RoPE queries (the scores MatMul's first input) and on the new keys before
    they join the cache (`present.*.key = Concat(past, k·H)`), so the cache holds rotated keys and 4-bit
    keys lose their outlier channels. Float-equivalent, prompt and cached decode alike. Needs the
    decomposed attention of `qcompile export` (softmax of a MatMul; its key input from a cache Concat).
    """

    def requires(self, model: ir.Model) -> None:
        for block in analysis.analyze(model).blocks:
            _, _, head_dim = rotation_sites(block, model.graph)
            known_hadamard(head_dim)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        factors: dict = {}
        blocks = analysis.analyze(model).blocks
        for block in blocks:
            scores, concat, head_dim = rotation_sites(block, graph)
            left, right, _ = hadamard_factors(graph, factors, head_dim)
            for node, index, name in ((scores, 0, "query"), (concat, 1, "key")):
                rotate = custom_ops.hadamard_node(node.inputs[index], left, right, f"blocks.{block.index}.{name}.hadamard")
                graph.insert_before(node, rotate)
                node.replace_input_with(index, rotate.outputs[0])
        if blocks:
            custom_ops.register(model, custom_ops.HADAMARD)
        return ir.passes.PassResult(model, modified=bool(blocks))


def rotation_sites(block: analysis.Block, graph: ir.Graph) -> tuple[ir.Node, ir.Node, int]:
    """The block's q·kᵀ MatMul, the `present.*.key` Concat(past, new) its keys come from, and the static
    key head size; UnsupportedModelError naming what is missing."""
    scores = scores_matmul(block)
    concat = cache_concat(scores.inputs[1], graph)
    head_dim = concat.inputs[1].shape[-1] if concat.inputs[1].shape is not None else None
    if not isinstance(head_dim, int):
        raise errors.UnsupportedModelError(f"block {block.index}: the key head size is not static")
    return scores, concat, head_dim


def scores_matmul(block: analysis.Block) -> ir.Node:
    """The q·kᵀ MatMul behind the block's attention softmax (through the mask Add and the scale)."""
    if block.attention_probs is None:
        raise errors.UnsupportedModelError(
            f"block {block.index} has no decomposed attention (softmax of q·kᵀ) to rotate: export with `qcompile export`")
    frontier = [block.attention_probs.producer().inputs[0]]
    for _ in range(8):
        found = []
        for value in frontier:
            node = value.producer()
            if node is None:
                continue
            if node.op_type == "MatMul" and all(i.const_value is None for i in node.inputs):
                return node
            if node.op_type in SCORE_PATH_OPS:
                found += [i for i in node.inputs if i is not None and i.const_value is None]
        frontier = found
    raise errors.UnsupportedModelError(f"block {block.index}: no q·kᵀ MatMul found before the attention softmax")


def cache_concat(value: ir.Value, graph: ir.Graph) -> ir.Node:
    """The Concat(past, new) producing a `present.*.key` output that `value` (kᵀ) is computed from."""
    outputs = set(graph.outputs)
    for _ in range(16):
        node = value.producer()
        if node is None:
            break
        if node.op_type == "Concat" and node.outputs[0] in outputs and len(node.inputs) == 2:
            return node
        if node.op_type not in KEY_PATH_OPS:
            break
        value = node.inputs[0]
    raise errors.UnsupportedModelError("the attention keys/values do not come from a KV-cache Concat(past, new): "
                                       "export the model with `qcompile export`")

