"""FoldSmoothQuantScales: SmoothQuant's per-input-channel scales folded into the graph (float-equivalent)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from qcompile import analysis
from qcompile.algorithms.smoothquant import search_alpha, smoothing_scales
from qcompile.calibration import Request, TapStats
from qcompile.passes._canonical import bits_for
from qcompile.passes._fold import input_scalings, set_weight
from qcompile.passes._result import Result
from qcompile.schemes import ActivationScheme, WeightScheme

R = analysis.Role


class FoldSmoothQuantScales(ir.passes.InPlacePass):
    """x·W = (x/s)·(diag(s)·W) per group of linears sharing an input x (see `algorithms.smoothquant`).

    Groups: `_fold.input_scalings` — each pre-norm with the linears reading it (1/s folded into the norm's
    gain, and bias for LayerNorm); with `scheme.smooth_up_down`, a gated MLP's down (1/s folded into up's
    output columns). Linears whose input cannot be scaled keep their activations as they are, and so does a
    group with a member in `skip` (weights left float); a group whose every member keeps float inputs
    (`scheme.float_inputs`) is not smoothed: with no activation quantizer to relieve, it would only widen the weights'
    ranges. s comes from the calibration `stats` of the float model
    (keyed by tap name); α is `scheme.alpha`, or searched per group when it is None (`quantize_weight`
    then gives the weights' fake quantization, and the stats must hold sampled rows).

    Preserves the logits up to float rounding. Afterwards `stats` describe the smoothed activations
    (exactly: x/s per channel), so static activation scales need no second calibration run; the result's
    record maps each group's first linear to its α. Handed to `Calibrate`, it asks for the inputs of the
    linears `weights` quantizes (8 sampled rows per window when α is searched).
    """

    def __init__(self, scheme: ActivationScheme, stats: dict[str, TapStats] | None = None,
                 quantize_weight: Callable[[np.ndarray], np.ndarray] | None = None, skip: tuple[str, ...] = (),
                 weights: WeightScheme | None = None):
        super().__init__()
        self.scheme = scheme
        self.stats = stats
        self.quantize_weight = quantize_weight
        self.skip = skip
        self.weights = weights

    def calibration_request(self, model: ir.Model) -> Request:
        return activation_request(model, self.weights, rows=8 if self.scheme.alpha is None else 0)

    def calibrated(self, stats: dict[str, TapStats], request: Request) -> None:
        self.stats = stats

    def call(self, model: ir.Model) -> Result:
        alphas: dict[str, float] = {}
        for members, scale_input in input_scalings(analysis.analyze(model)):
            if members[0].role == R.DOWN and not self.scheme.smooth_up_down:
                continue
            if any(m.name in self.skip for m in members) or all(self.scheme.keeps_float_input(m.name) for m in members):
                continue
            s, alphas[members[0].name] = self._scales(members)
            scale_input(1 / s)
            for m in members:
                set_weight(m, m.float_weight() * s[:, None])
            self.stats[members[0].node.inputs[0].name].scale_channels(s)
        return Result(model, modified=bool(alphas), record={"alphas": alphas})

    def _scales(self, members: list[analysis.Linear]) -> tuple[np.ndarray, float]:
        stats = self.stats[members[0].node.inputs[0].name]
        weights = [m.float_weight() for m in members]
        if self.scheme.alpha is None:
            if not stats.rows or self.quantize_weight is None:
                raise ValueError("searching alpha needs calibration rows and a weight quantizer")
            alpha, s = search_alpha(stats.samples, stats.absmax, weights, self.scheme.kind, self.quantize_weight)
        else:
            alpha = self.scheme.alpha
            s = smoothing_scales(stats.absmax, np.max([np.abs(w).max(axis=1) for w in weights], axis=0), alpha)
        return s, alpha


def activation_request(model: ir.Model, weights: WeightScheme | None, rows: int) -> Request:
    """The inputs of the linears `weights` quantizes (every linear when None), one tap per shared input."""
    linears = [lin for lin in analysis.analyze(model).linears() if weights is None or bits_for(weights, lin) is not None]
    return Request(list(dict.fromkeys(lin.node.inputs[0] for lin in linears)), rows=rows)
