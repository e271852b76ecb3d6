"""InsertQueryKeyHadamard: queries and keys rotated by one Hadamard per head after RoPE, so the KV cache
stores rotated keys (QuaRot's rotation for a low-bit KV cache)."""

from __future__ import annotations

import onnx_ir as ir

from qcompile import analysis, custom_ops, errors
from qcompile.passes.insert_online_hadamard import hadamard_factors, known_hadamard

class InsertQueryKeyHadamard(ir.passes.InPlacePass):
    """softmax((q·H)(k·H)ᵀ) = softmax(q·kᵀ) for an orthogonal H of the head size: `qcompile.Hadamard`
    runs on every block's post-RoPE queries (the scores MatMul's first input) and on the new keys before
    they join the cache (`present.*.key = Concat(past, k·H)`), so the cache holds rotated keys and 4-bit
    keys lose their outlier channels. Float-equivalent, prompt and cached decode alike. Needs the
    decomposed attention of `qcompile export` (softmax of a MatMul; its key input from a cache Concat).
    """

    def requires(self, model: ir.Model) -> None:
        for block in analysis.analyze(model).blocks:
            _, _, head_dim = rotation_sites(block)
            known_hadamard(head_dim)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        factors: dict = {}
        blocks = analysis.analyze(model).blocks
        for block in blocks:
            scores, concat, head_dim = rotation_sites(block)
            left, right, _ = hadamard_factors(graph, factors, head_dim)
            for node, index, name in ((scores, 0, "query"), (concat, 1, "key")):
                rotate = custom_ops.hadamard_node(node.inputs[index], left, right, f"blocks.{block.index}.{name}.hadamard")
                graph.insert_before(node, rotate)
                node.replace_input_with(index, rotate.outputs[0])
        if blocks:
            custom_ops.register(model, custom_ops.HADAMARD)
        return ir.passes.PassResult(model, modified=bool(blocks))


def rotation_sites(block: analysis.Block) -> tuple[ir.Node, ir.Node, int]:
    """The block's q·kᵀ MatMul, the `present.*.key` Concat(past, new) its keys come from, and the static
    key head size (the ModelMap's `Block.attention`); UnsupportedModelError naming what is missing."""
    attention = block.attention
    if attention is None:
        raise errors.UnsupportedModelError(
            f"block {block.index} has no decomposed attention (softmax of q·kᵀ) to rotate: export with `qcompile export`")
    if attention.key_cache is None:
        raise errors.UnsupportedModelError(analysis.NO_KV_CACHE)
    head_dim = attention.head_size(attention.key_cache)
    if head_dim is None:
        raise errors.UnsupportedModelError(f"block {block.index}: the key head size is not static")
    return attention.scores, attention.key_cache, head_dim
