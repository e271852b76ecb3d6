"""Exact rewrites of initializers for folding a per-channel scale into a linear's input producer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis


def set_weight(linear: analysis.Linear, w: np.ndarray) -> None:
    """Replace `linear`'s float [K, N] weight."""
    value = linear.weight_input
    value.const_value = ir.tensor(w.astype(np.float32), name=value.name)


def scale_norm(norm: analysis.Norm, factor: np.ndarray) -> None:
    """norm(x)·γ(+β) → norm(x)·γ·f(+β·f): the norm's output scaled per channel by `factor`.

    The bias of a fused LayerNormalization (input 2) is scaled too; an RMSNorm has none.
    """
    values = [norm.gain]
    if norm.node.op_type == "LayerNormalization" and len(norm.node.inputs) > 2 and norm.node.inputs[2] is not None:
        values.append(norm.node.inputs[2])
    for value in values:
        value.const_value = ir.tensor((value.const_value.numpy() * factor).astype(np.float32), name=value.name)
