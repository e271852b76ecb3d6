"""RotateResidualStream: QuaRot's rotation of the residual stream by a seeded random Hadamard Q."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, errors
from qcompile.algorithms.hadamard import random_orthogonal
from qcompile.passes._fold import set_tensor, set_weight
from qcompile.passes.fuse_norm_gains import check_rms_norms

R = analysis.Role
WRITERS = (R.O, R.DOWN)


class RotateResidualStream(ir.passes.InPlacePass):
    """The hidden state h becomes h·Q everywhere: embedding E ← E·Q; readers (q, k, v, gate, up, fused
    projections, lm_head) W ← Qᵀ·W; writers (o, down) W ← W·Q and b ← b·Q. Exact because every norm between is an RMSNorm with
    γ = 1 (run FuseNormGains first): RMSNorm(h·Q) = RMSNorm(h)·Q. Outliers of h are spread over all
    channels, which is what makes 4-bit activations possible.

    Q = diag(±1)·H (`algorithms.hadamard.random_orthogonal`, seeded); float64 math.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def check(self, model: ir.Model) -> None:
        """Raise a clear error (not a wrapped precondition failure) on a graph this pass cannot rewrite."""
        model_map = analysis.analyze(model)
        check_rms_norms(model_map, "RotateResidualStream")
        if model_map.tied_lm_head:
            raise errors.UnsupportedModelError("RotateResidualStream: lm_head is tied to the embedding: run FuseNormGains first")
        for norm, _ in model_map.norm_readers():
            if not np.all(norm.gain.const_value.numpy() == 1):
                raise errors.UnsupportedModelError(
                    f"RotateResidualStream: norm '{norm.node.name}' has a gain ≠ 1: run FuseNormGains first")
        if model_map.embedding.op_type != "Gather" or model_map.embedding.inputs[0].const_value is None:
            raise errors.UnsupportedModelError("RotateResidualStream: the embedding table is already quantized: rotate the float model")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.check(model)
        model_map = analysis.analyze(model)
        q = random_orthogonal(model_map.hidden_size, self.seed)
        table = model_map.embedding.inputs[0]
        set_tensor(table, table.const_value.numpy().astype(np.float64) @ q)
        for block in model_map.blocks:
            for role, linear in block.linears.items():
                if role in WRITERS:
                    set_weight(linear, linear.float_weight().astype(np.float64) @ q)
                    if (bias := linear.bias) is not None:
                        set_tensor(bias, bias.const_value.numpy().astype(np.float64) @ q)
                else:
                    set_weight(linear, q.T @ linear.float_weight().astype(np.float64))
        head = model_map.lm_head
        set_weight(head, q.T @ head.float_weight().astype(np.float64))
        return ir.passes.PassResult(model, modified=True)
