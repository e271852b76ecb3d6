"""InsertOnlineHadamard: x ← x·H at run time before down_proj, W_down ← Hᵀ·W_down offline."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, custom_ops, errors
from qcompile.algorithms.hadamard import kronecker_hadamard
from qcompile.passes._canonical import _initializer
from qcompile.passes._fold import set_weight

R = analysis.Role


class InsertOnlineHadamard(ir.passes.InPlacePass):
    """down(x) = (x·H)·(Hᵀ·W_down): the gated MLP product is rotated by a Hadamard H of the intermediate
    size, computed at run time by `qcompile.Hadamard` (factored H = A ⊗ B, two small MatMuls; the
    matrices are shared initializers `hadamard.<n>.left/right`), and the offline fold uses the same H.
    The input of down_proj, the hardest activation to quantize in a Llama MLP, loses its outliers.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        factors: dict[int, tuple[ir.Value, ir.Value, np.ndarray]] = {}
        for block in analysis.analyze(model).blocks:
            down = block.linears[R.DOWN]
            n = down.in_features
            if n not in factors:
                h = kronecker_hadamard(n)
                if h is None:
                    raise errors.UnsupportedModelError(
                        f"no Hadamard matrix of order {n} (the MLP size) is known: use a target without rotations")
                factors[n] = (_initializer(graph, f"hadamard.{n}.left", h.a.T.astype(np.float32)),
                              _initializer(graph, f"hadamard.{n}.right", h.b.astype(np.float32)), h.dense())
            left, right, dense = factors[n]
            node = custom_ops.hadamard_node(down.node.inputs[0], left, right, f"{down.name}.hadamard")
            graph.insert_before(down.node, node)
            down.node.replace_input_with(0, node.outputs[0])
            set_weight(down, dense.T @ down.float_weight().astype(np.float64))
        if factors:
            custom_ops.register(model, custom_ops.HADAMARD)
        return ir.passes.PassResult(model, modified=bool(factors))
