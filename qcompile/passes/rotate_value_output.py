"""RotateValueOutput: a per-head Hadamard folded into v's output columns and o's input rows."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, errors
from qcompile.algorithms.hadamard import random_orthogonal
from qcompile.passes._fold import bias_array, set_bias, set_weight

R = analysis.Role


def head_dim(model_map: analysis.ModelMap) -> int:
    """The attention head size: that of the values every block's attention puts in its KV cache
    (`Block.attention`); UnsupportedModelError unless it is one static size."""
    sizes = {analysis.Attention.head_size(b.attention.value_cache) if b.attention else None for b in model_map.blocks}
    if len(sizes) != 1 or None in sizes:
        raise errors.UnsupportedModelError(
            "the head size is unknown: not every block's values enter a KV cache as [batch, kv_heads, seq, head_dim] "
            "with one static head_dim (export the model with `qcompile export`)")
    return sizes.pop()


def head_counts(block: analysis.Block, d: int) -> tuple[int, int]:
    """(KV heads, query heads) of the block's attention (`Attention.heads`); UnsupportedModelError unless v's
    columns and o's rows are those heads of size d."""
    v, o = value_projection(block), block.linears[R.O]
    heads, kv_heads = block.attention.heads or (None, None)
    if heads is None or (v.out_features, o.in_features) != (kv_heads * d, heads * d):
        raise errors.UnsupportedModelError(
            f"{v.name}: {v.out_features} value columns / {o.in_features} o rows are not whole heads of {d} "
            f"(the attention's {kv_heads} key-value / {heads} query heads)")
    return kv_heads, heads


def value_projection(block: analysis.Block) -> analysis.Linear:
    """The block's v projection (its own, or its columns of a fused qkv); UnsupportedModelError if unknown."""
    v = block.part(R.V)
    if v is None:
        raise errors.UnsupportedModelError(
            f"block {block.index}: the fused qkv projection interleaves its value columns with the others, so a "
            "per-head rotation of the values cannot be folded into them: use a recipe without value rotations")
    return v


class RotateValueOutput(ir.passes.InPlacePass):
    """Every KV head g's values become v·H_g, H_g = H·diag(s_g): one seeded random Hadamard H (head_dim ×
    head_dim) with its own seeded ±1 column signs s_g per KV head. W_v ← W_v·diag(H_0, …) (bias too),
    W_o ← diag(H_g(0)ᵀ, …)·W_o, query head j reading KV head g(j). Attention mixes values along tokens
    only, so each query head's context is context·H_g and o undoes it: exact, with grouped-query
    attention too. The values (and the V cache) are spread by H, which helps their quantization.

    The signs matter when o_proj's input also gets an online Hadamard (InsertOnlineHadamard): that one is
    A ⊗ B with a Sylvester B, and a shared Sylvester H would cancel against it (H·B ∝ I on the common
    factor), leaving each attention channel spread over 12 of 576 outputs on SmolLM2 (row kurtosis 58.7;
    with the signs 2.87, a Gaussian matrix's is 3.0).
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def requires(self, model: ir.Model) -> None:
        model_map = analysis.analyze(model)
        d = head_dim(model_map)
        for block in model_map.blocks:
            head_counts(block, d)
            for linear in (value_projection(block), block.linears[R.O]):
                linear.float_weight()  # InputError if already quantized

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model_map = analysis.analyze(model)
        d = head_dim(model_map)
        h = random_orthogonal(d, self.seed)
        signs = np.random.default_rng([self.seed, 1])
        blocks = model_map.blocks
        for block in blocks:
            v, o = value_projection(block), block.linears[R.O]
            kv_heads, heads = head_counts(block, d)
            hs = h[None] * signs.choice([-1.0, 1.0], size=(kv_heads, 1, d))  # [kv_heads, d, d]: H_g
            w = v.float_weight().astype(np.float64).reshape(v.in_features, kv_heads, d)
            set_weight(v, np.einsum("kgi,gij->kgj", w, hs).reshape(v.in_features, v.out_features))
            if (b := bias_array(v)) is not None:
                b = b.astype(np.float64).reshape(kv_heads, d)
                set_bias(v, np.einsum("gi,gij->gj", b, hs).reshape(-1))
            per_query = np.repeat(hs, heads // kv_heads, axis=0)  # query head j reads KV head j // group
            w = o.float_weight().astype(np.float64).reshape(heads, d, o.out_features)
            set_weight(o, np.einsum("hji,hjn->hin", per_query, w).reshape(o.in_features, o.out_features))
        return ir.passes.PassResult(model, modified=bool(blocks))
