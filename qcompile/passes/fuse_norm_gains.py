"""FuseNormGains: each RMSNorm gain γ folded into the linears that read the norm (float-equivalent)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, errors
from qcompile.passes._fold import set_tensor, set_weight, untie_lm_head


def check_rms_norms(model_map: analysis.ModelMap, what: str) -> None:
    """Refuse graphs whose norms are not RMSNorms with a constant gain that only the linears read."""
    for block in model_map.blocks:
        if block.experts:
            raise errors.UnsupportedModelError(
                f"{what}: block {block.index} routes each token to experts (a router and expert weight tables read the "
                "residual stream), which a rotation of the residual stream would have to rotate too (not supported "
                "yet): use a target or recipe without rotations")
        if block.branch_norms:
            raise errors.UnsupportedModelError(
                f"{what} needs every norm before the linears it feeds; block {block.index} normalizes an attention "
                f"or MLP output before the residual add (post-norm at '{block.branch_norms[0].node.name}'), which a "
                "rotation of the residual stream cannot pass: use a target or recipe without rotations")
    for norm, readers in model_map.norm_readers():
        if norm.kind != "rms":
            raise errors.UnsupportedModelError(
                f"{what} needs RMSNorm; '{norm.node.name}' is a LayerNorm (folding its mean subtraction is not "
                "supported yet): use a target without rotations"
            )
        if norm.gain is None or norm.gain.const_value is None:
            raise errors.UnsupportedModelError(f"{what}: the norm at '{norm.node.name}' has no constant gain to fold")
        consumers = {use.node for use in norm.output.uses()}
        if consumers != {lin.node for lin in readers}:
            raise errors.UnsupportedModelError(
                f"{what}: the output of norm '{norm.node.name}' feeds more than its linears "
                f"({', '.join(sorted(n.op_type for n in consumers))}): start from a float model from `qcompile export`"
            )


class FuseNormGains(ir.passes.InPlacePass):
    """norm(x)·γ·W = norm(x)·(diag(γ)·W): γ moves into q/k/v, gate/up and lm_head, and becomes 1.

    A tied lm_head is untied first (it gets its own weight; the embedding table is unchanged). With every
    γ = 1, RMSNorm commutes with an orthogonal Q (RMSNorm(x·Q) = RMSNorm(x)·Q), which the residual
    rotation needs. The Mul by γ stays in the graph (as ones), so the model keeps its structure.
    """

    def check(self, model: ir.Model) -> None:
        """Raise a clear error (not a wrapped precondition failure) on a graph this pass cannot rewrite."""
        check_rms_norms(analysis.analyze(model), "FuseNormGains")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.check(model)
        untie_lm_head(model)
        groups = analysis.analyze(model).norm_readers()
        # read every γ before writing any: two norms could share one initializer
        gains = [norm.gain.const_value.numpy().astype(np.float64) for norm, _ in groups]
        for (norm, readers), gain in zip(groups, gains):
            for linear in readers:
                set_weight(linear, gain[:, None] * linear.float_weight().astype(np.float64))
        for norm, _ in groups:
            set_tensor(norm.gain, np.ones(norm.gain.const_value.shape))
        return ir.passes.PassResult(model, modified=True)
