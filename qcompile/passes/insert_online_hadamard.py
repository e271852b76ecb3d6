"""InsertOnlineHadamard: x ← x·H at run time before down_proj (and optionally o_proj), W ← Hᵀ·W offline."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, calibration, custom_ops, errors
from qcompile.algorithms.hadamard import kronecker_hadamard
from qcompile.passes._canonical import _initializer
from qcompile.passes._fold import set_weight

R = analysis.Role


class InsertOnlineHadamard(ir.passes.InPlacePass):
    """down(x) = (x·H)·(Hᵀ·W_down): the gated MLP product is rotated by a Hadamard H of the intermediate
    size, computed at run time by `qcompile.Hadamard` (factored H = A ⊗ B, two small MatMuls; the
    matrices are shared initializers `hadamard.<n>.left/right`), and the offline fold uses the same H.
    The input of down_proj, the hardest activation to quantize in a Llama MLP, loses its outliers.
    With `roles` including o, the same is done on o_proj's input (all heads' attention outputs together:
    QuaRot's across-head Hadamard; RotateValueOutput only mixes within a head), for 4-bit activations.
    With `smooth_windows`, down_proj's input is first scaled per channel as SmoothRotateNormOutputs scales a
    norm's output, by t_j = (‖W_down,j‖ / rms(x_j))^½ (x: down's input over those calibration windows): up_proj's
    output columns are multiplied by t (the gated product is linear in them) and down's rows divided by t.
    """

    def __init__(self, roles: tuple[R, ...] = (R.DOWN,), smooth_windows: np.ndarray | None = None, progress=None):
        super().__init__()
        self.roles = roles
        self.smooth_windows, self.progress = smooth_windows, progress

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        factors: dict[int, tuple[ir.Value, ir.Value, np.ndarray]] = {}
        blocks = analysis.analyze(model).blocks
        if self.smooth_windows is not None and R.DOWN in self.roles:
            self._smooth_down_inputs(model, blocks)
        for block in blocks:
            for role in self.roles:
                linear = block.linears[role]
                left, right, dense = hadamard_factors(graph, factors, linear.in_features)
                node = custom_ops.hadamard_node(linear.node.inputs[0], left, right, f"{linear.name}.hadamard")
                graph.insert_before(linear.node, node)
                linear.node.replace_input_with(0, node.outputs[0])
                set_weight(linear, dense.T @ linear.float_weight().astype(np.float64))
        if factors:
            custom_ops.register(model, custom_ops.HADAMARD)
        return ir.passes.PassResult(model, modified=bool(factors))

    def _smooth_down_inputs(self, model: ir.Model, blocks: list[analysis.Block]) -> None:
        downs = [block.linears[R.DOWN] for block in blocks]
        stats = calibration.collect(model, [down.node.inputs[0] for down in downs], self.smooth_windows, hessian=False,
                                    progress=self.progress, label="Calibrating (down inputs)")
        for block, down in zip(blocks, downs):
            w = down.float_weight().astype(np.float64)
            rms_x = stats[down.node.inputs[0].name].rms
            t = (np.maximum(np.linalg.norm(w, axis=1), 1e-12) / np.maximum(rms_x, 1e-12)) ** 0.5
            t = t / np.exp(np.log(t).mean())
            up = block.linears[R.UP]
            set_weight(up, up.float_weight().astype(np.float64) * t[None, :])
            set_weight(down, w / t[:, None])


def hadamard_factors(graph: ir.Graph, cache: dict, n: int) -> tuple[ir.Value, ir.Value, np.ndarray]:
    """The shared initializers (left = Aᵀ, right = B) of the order-n Kronecker Hadamard, and H itself;
    `graph`'s existing `hadamard.<n>.*` initializers are reused (one copy per order, whichever pass made it)."""
    if n not in cache:
        h = kronecker_hadamard(n)
        if h is None:
            raise errors.UnsupportedModelError(
                f"no Hadamard matrix of order {n} is known for an online rotation: use a target without rotations")
        left, right = (graph.initializers.get(f"hadamard.{n}.{side}") for side in ("left", "right"))
        if left is None:
            left = _initializer(graph, f"hadamard.{n}.left", h.a.T.astype(np.float32))
            right = _initializer(graph, f"hadamard.{n}.right", h.b.astype(np.float32))
        cache[n] = (left, right, h.dense())
    return cache[n]
