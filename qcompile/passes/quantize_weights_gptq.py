"""QuantizeWeightsGPTQ: every linear's weight quantized by GPTQ from calibration Hessians (canonical form)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, calibration
from qcompile.algorithms.gptq import quantize_gptq
from qcompile.passes._canonical import bits_for, quantize_linears
from qcompile.schemes import WeightScheme


class QuantizeWeightsGPTQ(ir.passes.InPlacePass):
    """W ≈ Ŵ = (q - z) · s chosen to minimise ||X·W - X·Ŵ||² on calibration inputs X (see `algorithms.gptq`).

    Mode "parallel": every Hessian H = XᵀX is measured on the float model in one calibration run
    (linears sharing an input share one tap; v's is attention-weighted, see `calibration`), unless `hessians` (linear name → H) are given, as
    FoldAWQScales provides. Requires a float model that `analysis.analyze` recognises.
    Bits, groups and skips follow `scheme` as in QuantizeWeightsRTN; `self.layers` records what was done.
    """

    def __init__(self, scheme: WeightScheme, windows: np.ndarray | None, act_order: bool = False, damp: float = 0.01,
                 progress=None, hessians: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.hessians = hessians
        self.scheme = scheme
        self.windows = windows
        self.act_order = act_order
        self.damp = damp
        self.progress = progress
        self.layers: list[dict] = []

    def requires(self, model: ir.Model) -> None:
        analysis.analyze(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        linears = analysis.analyze(model).linears()
        quantized = [lin for lin in linears if bits_for(self.scheme, lin) is not None]
        hessians = self.hessians
        if hessians is None:
            _, hessians = calibration.linear_statistics(model, quantized, self.windows, self.progress,
                                                        "Calibrating (Hessians)")
        s = self.scheme
        self.layers = quantize_linears(
            model, s, lambda linear, bits: quantize_gptq(linear.float_weight(), hessians[linear.name], bits,
                                                         s.group_size, s.symmetric, damp=self.damp,
                                                         act_order=self.act_order, positive=s.positive_scales),
            "gptq", self.progress, "Quantizing weights (GPTQ)")
        return ir.passes.PassResult(model, modified=bool(quantized))
