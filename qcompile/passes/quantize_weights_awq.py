"""QuantizeWeightsAWQ: AWQ scales folded into the graph, then clip-searched RTN (or GPTQ) weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.algorithms.awq import search_clip
from qcompile.passes._canonical import group_for, quantize_linears
from qcompile.passes.fold_awq_scales import FoldAWQScales
from qcompile.passes.quantize_weights_gptq import QuantizeWeightsGPTQ
from qcompile.schemes import WeightScheme


class QuantizeWeightsAWQ(ir.passes.InPlacePass):
    """W ≈ diag(1/s)·Q(diag(s)·W): FoldAWQScales (exact: 1/s goes into the producer of x), then each scaled
    weight quantized with the Hessian of its scaled input H' = H / (s sᵀ): per-(group, channel) clip search
    + RTN, or GPTQ when `gptq` ("awq+gptq"). One calibration run; needs a float model."""

    def __init__(self, scheme: WeightScheme, windows: np.ndarray, gptq: bool = False, progress=None):
        super().__init__()
        self.scheme = scheme
        self.windows = windows
        self.gptq = gptq
        self.progress = progress
        self.layers: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fold = FoldAWQScales(self.scheme, self.windows, self.progress)
        fold(model)
        if self.gptq:
            quantize = QuantizeWeightsGPTQ(self.scheme, None, self.scheme.act_order, self.scheme.damp,
                                           self.progress, hessians=fold.hessians)
            quantize(model)
            self.layers = [{**e, "algorithm": "awq+gptq"} if "bits" in e else e for e in quantize.layers]
            return ir.passes.PassResult(model, modified=True)
        s = self.scheme
        self.layers = quantize_linears(
            model, s, lambda linear, bits: search_clip(linear.float_weight(), fold.hessians[linear.name], bits,
                                                       group_for(s, linear), s.symmetric, positive=s.positive_scales),
            "awq", self.progress, "Quantizing weights (AWQ clip)")
        return ir.passes.PassResult(model, modified=True)
