"""InsertOnlineHadamard: x ← x·H at run time before down_proj (and optionally o_proj), W ← Hᵀ·W offline."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, custom_ops, errors
from qcompile.algorithms.hadamard import KroneckerHadamard, kronecker_hadamard
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
    A block whose MLP is experts alone has no down linear: its experts keep their input as it is.
    """

    def __init__(self, roles: tuple[R, ...] = (R.DOWN,)):
        super().__init__()
        self.roles = roles

    def requires(self, model: ir.Model) -> None:
        linears = [lin for block in analysis.analyze(model).blocks for role in self.roles if (lin := block.linears.get(role))]
        for n in dict.fromkeys(linear.in_features for linear in linears):
            known_hadamard(n)
        for linear in linears:
            linear.float_weight()  # InputError if already quantized

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        factors: dict[int, tuple[ir.Value, ir.Value, np.ndarray]] = {}
        for block in analysis.analyze(model).blocks:
            for linear in filter(None, map(block.linears.get, self.roles)):
                left, right, dense = hadamard_factors(graph, factors, linear.in_features)
                node = custom_ops.hadamard_node(linear.node.inputs[0], left, right, f"{linear.name}.hadamard")
                graph.insert_before(linear.node, node)
                linear.node.replace_input_with(0, node.outputs[0])
                set_weight(linear, dense.T @ linear.float_weight().astype(np.float64))
        if factors:
            custom_ops.register(model, custom_ops.HADAMARD)
        return ir.passes.PassResult(model, modified=bool(factors))


def hadamard_factors(graph: ir.Graph, cache: dict, n: int) -> tuple[ir.Value, ir.Value, np.ndarray]:
    """The shared initializers (left = Aᵀ, right = B) of the order-n Kronecker Hadamard, and H itself;
    `graph`'s existing `hadamard.<n>.*` initializers are reused (one copy per order, whichever pass made it)."""
    if n not in cache:
        h = known_hadamard(n)
        left, right = (graph.initializers.get(f"hadamard.{n}.{side}") for side in ("left", "right"))
        if left is None:
            left = _initializer(graph, f"hadamard.{n}.left", h.a.T.astype(np.float32))
            right = _initializer(graph, f"hadamard.{n}.right", h.b.astype(np.float32))
        cache[n] = (left, right, h.dense())
    return cache[n]


def known_hadamard(n: int) -> KroneckerHadamard:
    """The order-n Kronecker Hadamard; UnsupportedModelError if none is known (a pass's requires() checks this)."""
    h = kronecker_hadamard(n)
    if h is None:
        raise errors.UnsupportedModelError(
            f"no Hadamard matrix of order {n} is known for an online rotation: use a target without rotations")
    return h
