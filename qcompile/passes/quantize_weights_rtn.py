"""QuantizeWeightsRTN: every linear's float weight becomes the canonical blocked DequantizeLinear form."""

from __future__ import annotations

import onnx_ir as ir

from qcompile import analysis
from qcompile.algorithms.rtn import quantize_fp8, quantize_rtn
from qcompile.passes._canonical import group_for, quantize_linears
from qcompile.passes._result import Result
from qcompile.schemes import WeightScheme


class QuantizeWeightsRTN(ir.passes.InPlacePass):
    """W ≈ (q - z) · s blockwise along K, by round-to-nearest (see `algorithms.rtn`).

    Approximates, it does not preserve: y = x·W becomes y = x·DequantizeLinear(q, s, z). Block linears use
    `scheme.bits` (FP8 E4M3 per channel when `scheme.fp8`); lm_head uses `scheme.lm_head_bits` (None keeps it float); `scheme.skip` stays float.
    Requires a float model whose structure `analysis.analyze` recognises (checked in `requires`).
    The result's `layers` record what was done to each linear, for the manifest.
    """

    def __init__(self, scheme: WeightScheme, progress=None):
        super().__init__()
        self.scheme = scheme
        self.progress = progress

    def requires(self, model: ir.Model) -> None:
        analysis.analyze(model)  # raises UnsupportedModelError naming what is missing

    def call(self, model: ir.Model) -> Result:
        s = self.scheme

        def quantize_one(linear, bits):
            if s.fp8 and bits == 8:
                return quantize_fp8(linear.float_weight())
            return quantize_rtn(linear.float_weight(), bits, group_for(s, linear), s.symmetric, positive=s.positive_scales)

        layers = quantize_linears(model, s, quantize_one, "rtn", self.progress, "Quantizing weights (RTN)")
        return Result(model, modified=any("bits" in e for e in layers), layers=layers)
