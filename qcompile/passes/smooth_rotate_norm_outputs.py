"""SmoothRotateNormOutputs: each block norm's output, scaled per channel, rotated online before its readers.

For 4-bit activations. A block's norm feeds q/k/v (or gate/up) with y = x̂·γ, x̂ = x/rms(x). This pass
makes the readers' input (x̂·s)·H instead: the norm's gain becomes s (random signs included), a
`qcompile.Hadamard` of the hidden size runs after it, and the readers get W ← Hᵀ·diag(γ/s)·W offline.
Float-equivalent.

Why s: per-token quantization of a rotated vector adds noise e of about equal power in every direction,
proportional to ‖x̂·s‖²; the readers' output error is e·Hᵀ·diag(γ/s)·W, of power ∝ ‖x̂·s‖²·‖diag(γ/s)·W‖².
Over s this is smallest (Cauchy–Schwarz) at s_j = (‖γ_j·W_j‖ / rms(x̂_j))^½, W_j the readers' row j
concatenated, rms over calibration tokens: `alpha` = ½. With `alpha` = 0 (s = ±1) this is QuaRot's
rotation of the norm outputs, online instead of folded into the residual stream: a residual rotation
cannot carry s, which must act before the rotation, in the channels' own basis. On SmolLM2 the readers'
relative output error drops 1.3–2.0× at ½ (per-token int4, clip 0.75; 5 blocks measured,
benchmarks/bench_norm_rotation_error.py).

With `down_inputs`, a gated MLP's down_proj input x (the gated product, whose online Hadamard
InsertOnlineHadamard adds later) gets the same choice of scale from the same calibration run: down(x) = (x·diag(t))·(diag(1/t)·W_down)
with t_j = (‖W_down,j‖ / rms(x_j))^½, and x·diag(t) = act(gate)·(y·W_up·diag(t)), so t goes into up_proj's
columns offline (a plain MLP's act(up) cannot carry t: its down is left as it is). Float-equivalent.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, calibration, custom_ops
from qcompile.passes._canonical import _initializer, _remove_if_unused
from qcompile.passes._fold import input_scalings, set_weight
from qcompile.passes._result import Result
from qcompile.passes.calibrate import Calibrate
from qcompile.passes.fuse_norm_gains import check_rms_norms
from qcompile.passes.insert_online_hadamard import hadamard_factors


class SmoothRotateNormOutputs(ir.passes.InPlacePass):
    """`windows`: calibration token windows (the per-channel rms of each norm's output; or hand the pass to
    `Calibrate`, which measures them); `seed`: the signs."""

    def __init__(self, windows: np.ndarray | None = None, alpha: float = 0.5, seed: int = 0, progress=None,
                 down_inputs: bool = False):
        super().__init__()
        self.windows, self.alpha, self.seed, self.progress = windows, alpha, seed, progress
        self.down_inputs = down_inputs
        self.stats: dict | None = None

    def requires(self, model: ir.Model) -> None:
        check_rms_norms(analysis.analyze(model), "SmoothRotateNormOutputs")

    def calibration_request(self, model: ir.Model) -> calibration.Request:
        model_map = analysis.analyze(model)
        taps = [norm.output for norm, _ in model_map.norm_readers() if norm is not model_map.final_norm]
        return calibration.Request(taps + [down.node.inputs[0] for down, _ in self._downs(model_map)])

    def calibrated(self, stats: dict, request: calibration.Request) -> None:
        self.stats = stats

    def call(self, model: ir.Model) -> Result:
        model_map = analysis.analyze(model)
        groups = [(norm, readers) for norm, readers in model_map.norm_readers() if norm is not model_map.final_norm]
        if self.stats is None:
            Calibrate(self.windows, [self], self.progress, "Calibrating (norm outputs)")(model)
        stats = self.stats
        for down, scale_input in self._downs(model_map):
            w = down.float_weight().astype(np.float64)
            t = self._scales(np.linalg.norm(w, axis=1), stats[down.node.inputs[0].name].rms)
            scale_input(t)
            set_weight(down, w / t[:, None])
        graph, factors = model.graph, {}
        rng = np.random.default_rng([self.seed, 2])
        for norm, readers in groups:
            gain = norm.gain.const_value.numpy().astype(np.float64)
            weights = [lin.float_weight().astype(np.float64) for lin in readers]
            row_norms = np.linalg.norm(gain[:, None] * np.concatenate(weights, axis=1), axis=1)
            rms_x = stats[norm.output.name].rms / np.maximum(np.abs(gain), 1e-12)  # the output is x̂·γ
            s = self._scales(row_norms, rms_x) * rng.choice([-1.0, 1.0], size=len(row_norms))
            left, right, h = hadamard_factors(graph, factors, len(s))
            new_gain = _initializer(graph, f"{norm.output.name}.smoothed_gain", s.astype(np.float32))
            norm.node.replace_input_with(list(norm.node.inputs).index(norm.gain), new_gain)
            _remove_if_unused(graph, norm.gain)
            node = custom_ops.hadamard_node(norm.output, left, right, f"{norm.output.name}.hadamard")
            graph.insert_after(norm.node, node)
            for linear, w in zip(readers, weights):
                linear.node.replace_input_with(0, node.outputs[0])
                set_weight(linear, h.T @ ((gain / s)[:, None] * w))
        custom_ops.register(model, custom_ops.HADAMARD)
        return Result(model, modified=bool(groups))

    def _downs(self, model_map: analysis.ModelMap) -> list:
        """(down, how to scale its input) for each down whose input the graph can scale: a gated MLP's."""
        if not self.down_inputs:
            return []
        return [(members[0], scale) for members, scale in input_scalings(model_map) if members[0].role == analysis.Role.DOWN]

    def _scales(self, row_norms: np.ndarray, rms_x: np.ndarray) -> np.ndarray:
        """(‖W_j‖ / rms(x_j))^α per input channel j, normalised to a geometric mean of 1."""
        s = (np.maximum(row_norms, 1e-12) / np.maximum(rms_x, 1e-12)) ** self.alpha
        return s / np.exp(np.log(s).mean())
