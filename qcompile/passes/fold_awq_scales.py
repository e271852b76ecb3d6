"""FoldAWQScales: per-input-channel AWQ scales folded into the graph (float-equivalent)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis
from qcompile.algorithms.awq import search_scales
from qcompile.passes._canonical import bits_for
from qcompile.passes._fold import input_scalings, set_weight
from qcompile.passes._result import Result
from qcompile.schemes import WeightScheme



class FoldAWQScales(ir.passes.InPlacePass):
    """x·W = (x/s)·(diag(s)·W) for each group of linears sharing an input x, with s from `search_scales`.

    Groups: `_fold.input_scalings` — each pre-norm with the linears reading it (1/s folded into the norm's
    gain and bias: norm(x)·γ/s), and in a gated MLP down (1/s folded into up's output columns). Linears
    whose input cannot be scaled (a GELU MLP's down, linears reading the residual stream) get no AWQ scale.
    Preserves the logits up to float rounding. Needs float weights and the calibration `stats` of the
    quantized linears' inputs and their `hessians` (linear name → H, see `calibration.linear_request`);
    it rescales `hessians` in place to those of the new inputs, H' = H / (s sᵀ), so a following quantizer
    needs no second calibration run. The result's record holds α per group (its first linear's name).
    """

    def __init__(self, scheme: WeightScheme, stats: dict, hessians: dict[str, np.ndarray], progress=None):
        super().__init__()
        self.scheme = scheme
        self.stats = stats
        self.hessians = hessians
        self.progress = progress

    def call(self, model: ir.Model) -> Result:
        mm = analysis.analyze(model)
        stats, alphas = self.stats, {}
        quantized = {lin.name for lin in mm.linears() if bits_for(self.scheme, lin) is not None}
        groups = input_scalings(mm)
        advance = self.progress.task("Searching AWQ scales", len(groups)) if self.progress else (lambda: None)
        for members, scale_input in groups:
            if all(m.name in quantized for m in members):
                x = stats[members[0].node.inputs[0].name]
                s, alphas[members[0].name] = search_scales(
                    [m.float_weight() for m in members], [self.hessians[m.name] for m in members], x.absmean,
                    self.scheme.bits, self.scheme.group_size, self.scheme.symmetric,
                    positive=self.scheme.positive_scales)
                scale_input(1 / s)
                for m in members:
                    set_weight(m, m.float_weight() * s[:, None])
                    self.hessians[m.name] = self.hessians[m.name] / np.outer(s, s)
            advance()
        return Result(model, modified=bool(alphas), record={"alphas": alphas})

