"""QuantizeWeightsAWQ: AWQ scales folded into the graph, then clip-searched RTN (or GPTQ) weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, calibration
from qcompile.algorithms.awq import search_clip
from qcompile.passes._canonical import bits_for, group_for, quantize_linears
from qcompile.passes._result import Result
from qcompile.passes.calibrate import Calibrate
from qcompile.passes.fold_awq_scales import FoldAWQScales
from qcompile.passes.quantize_weights_gptq import QuantizeWeightsGPTQ
from qcompile.schemes import WeightScheme


class QuantizeWeightsAWQ(ir.passes.InPlacePass):
    """W ≈ diag(1/s)·Q(diag(s)·W): FoldAWQScales (exact: 1/s goes into the producer of x), then each scaled
    weight quantized with the Hessian of its scaled input H' = H / (s sᵀ): per-(group, channel) clip search
    + RTN, or GPTQ when `gptq` ("awq+gptq"). Needs a float model and one calibration run of the float
    model: `windows` for its own, or handed to `Calibrate`, which shares its run with other passes."""

    def __init__(self, scheme: WeightScheme, windows: np.ndarray | None = None, gptq: bool = False, progress=None):
        super().__init__()
        self.scheme = scheme
        self.windows = windows
        self.gptq = gptq
        self.progress = progress
        self.stats: dict | None = None
        self.hessians: dict[str, np.ndarray] | None = None

    def calibration_request(self, model: ir.Model) -> calibration.Request:
        quantized = [lin for lin in analysis.analyze(model).linears() if bits_for(self.scheme, lin) is not None]
        return calibration.linear_request(model, quantized)

    def calibrated(self, stats: dict, request: calibration.Request) -> None:
        self.stats, self.hessians = stats, calibration.linear_hessians(stats, request)

    def call(self, model: ir.Model) -> Result:
        if self.stats is None:
            Calibrate(self.windows, [self], self.progress, "Calibrating (AWQ)")(model)
        hessians, s = self.hessians, self.scheme
        fold = FoldAWQScales(s, self.stats, hessians, self.progress)(model)
        if self.gptq:
            quantize = QuantizeWeightsGPTQ(s, None, s.act_order, s.damp, self.progress, hessians=hessians)
            layers = [{**e, "algorithm": "awq+gptq"} if "bits" in e else e for e in quantize(model).layers]
        else:
            layers = quantize_linears(
                model, s, lambda linear, bits: search_clip(linear.float_weight(), hessians[linear.name], bits,
                                                           group_for(s, linear), s.symmetric, positive=s.positive_scales),
                "awq", self.progress, "Quantizing weights (AWQ clip)")
        return Result(model, modified=fold.modified or any("bits" in e for e in layers), layers=layers, record=fold.record)
