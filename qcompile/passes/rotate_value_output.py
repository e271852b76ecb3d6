"""RotateValueOutput: a per-head Hadamard folded into v's output columns and o's input rows."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, errors
from qcompile.algorithms.hadamard import random_orthogonal
from qcompile.passes._fold import bias_of, set_tensor, set_weight

R = analysis.Role


def head_dim(model: ir.Model) -> int:
    """The attention head size: the last dimension of the KV-cache inputs [batch, kv_heads, seq, head_dim]."""
    for value in model.graph.inputs:
        if value.name.startswith("past_key_values.") and value.shape is not None and len(value.shape) == 4:
            if isinstance(dim := value.shape[3], int):
                return dim
    raise errors.UnsupportedModelError(
        "the head size is unknown: no past_key_values.* input of shape [batch, kv_heads, seq, head_dim] "
        "(export the model with `qcompile export`)"
    )


class RotateValueOutput(ir.passes.InPlacePass):
    """Every head's values become v·H (H orthogonal, head_dim × head_dim, the same for all heads):
    W_v ← W_v·diag(H, …, H) (bias too), W_o ← diag(Hᵀ, …, Hᵀ)·W_o. Attention mixes values along
    tokens only, so each query head's context is context·H and o undoes it: exact, with grouped-query
    attention too. The values (and the V cache) are spread by H, which helps their quantization.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        d = head_dim(model)
        h = random_orthogonal(d, self.seed)
        for block in analysis.analyze(model).blocks:
            v, o = block.linears[R.V], block.linears[R.O]
            if v.out_features % d or o.in_features % d:
                raise errors.UnsupportedModelError(
                    f"{v.name}: {v.out_features} value columns / {o.in_features} o rows are not whole heads of {d}")
            w = v.float_weight().astype(np.float64).reshape(v.in_features, -1, d)
            set_weight(v, (w @ h).reshape(v.in_features, v.out_features))
            if (bias := bias_of(v)) is not None:
                set_tensor(bias, (bias.const_value.numpy().astype(np.float64).reshape(-1, d) @ h).reshape(-1))
            w = o.float_weight().astype(np.float64).reshape(-1, d, o.out_features)
            set_weight(o, np.einsum("ji,hjn->hin", h, w).reshape(o.in_features, o.out_features))
        return ir.passes.PassResult(model, modified=True)
