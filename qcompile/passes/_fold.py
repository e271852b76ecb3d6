"""Exact rewrites of initializers: folding per-channel scales and rotations into linears and norms."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis
from qcompile.passes._canonical import _initializer, _remove_if_unused


def set_tensor(value: ir.Value, array: np.ndarray) -> None:
    """Replace the constant behind `value` (stored as float32)."""
    value.const_value = ir.tensor(np.asarray(array, dtype=np.float32), name=value.name)


def set_weight(linear: analysis.Linear, w: np.ndarray) -> None:
    """Replace `linear`'s float [K, N] weight."""
    set_tensor(linear.weight_input, w)


def scale_norm(norm: analysis.Norm, factor: np.ndarray) -> None:
    """norm(x)·γ(+β) → norm(x)·γ·f(+β·f): the norm's output scaled per channel by `factor`.

    The bias of a fused LayerNormalization (input 2) is scaled too; an RMSNorm has none.
    """
    values = [norm.gain]
    if norm.node.op_type == "LayerNormalization" and len(norm.node.inputs) > 2 and norm.node.inputs[2] is not None:
        values.append(norm.node.inputs[2])
    for value in values:
        set_tensor(value, value.const_value.numpy() * factor)


def bias_of(linear: analysis.Linear) -> ir.Value | None:
    """The constant [N] bias added right after `linear` (MatMul → Add(·, b)), or None."""
    uses = list(linear.node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    other = uses[0].node.inputs[1 - uses[0].idx]
    if other is None or other.const_value is None or other.const_value.shape != (linear.out_features,):
        return None
    return other


def untie_lm_head(model: ir.Model) -> bool:
    """Give a tied lm_head (MatMul(x, Transpose(E))) its own [K, N] weight so it can change apart from the
    embedding table; returns whether it was tied."""
    model_map = analysis.analyze(model)
    if not model_map.tied_lm_head:
        return False
    head = model_map.lm_head
    old = head.weight_input
    weight = _initializer(model.graph, "lm_head.weight", np.ascontiguousarray(head.float_weight()))
    head.node.replace_input_with(1, weight)
    _remove_if_unused(model.graph, old)
    return True
