"""Exact rewrites of initializers: folding per-channel scales and rotations into linears and norms."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qcompile import analysis, scratch
from qcompile.passes._canonical import _initializer, _remove_if_unused


def set_tensor(value: ir.Value, array: np.ndarray) -> None:
    """Replace the constant behind `value` (stored as float32)."""
    value.const_value = scratch.tensor(np.asarray(array, dtype=np.float32), value.name)


def set_weight(linear: analysis.Linear, w: np.ndarray) -> None:
    """Replace `linear`'s float [K, N] weight (a view's `columns` of its fused projection's)."""
    if linear.columns:
        full = linear.weight_input.const_value.numpy().copy()
        full[:, slice(*linear.columns)] = w
        w = full
    set_tensor(linear.weight_input, w)


def scale_norm(norm: analysis.Norm, factor: np.ndarray) -> None:
    """norm(x)·γ(+β) → norm(x)·γ·f(+β·f): the norm's output scaled per channel by `factor`.

    The bias of a fused LayerNormalization (input 2) is scaled too; an RMSNorm has none.
    """
    indices = [list(norm.node.inputs).index(norm.gain)]
    if norm.node.op_type == "LayerNormalization" and len(norm.node.inputs) > 2 and norm.node.inputs[2] is not None:
        indices.append(2)
    for index in indices:
        value = norm.node.inputs[index]
        if len(value.uses()) > 1:  # the exporter shares equal constants (a LayerNorm's ones and zeros): own a copy
            value = ir.Value(name=f"{norm.node.name}.input{index}", shape=value.shape, type=value.type,
                             const_value=value.const_value)
            norm.node.graph.register_initializer(value)
            norm.node.replace_input_with(index, value)
            if index == indices[0]:
                norm.gain = value
        set_tensor(value, value.const_value.numpy() * factor)


def scale_columns(linear: analysis.Linear, factor: np.ndarray) -> None:
    """`linear`'s output (its `columns`, if a view of a fused projection) scaled per column by `factor`."""
    set_weight(linear, linear.float_weight() * factor[None, :])


def input_scalings(model_map: analysis.ModelMap) -> list[tuple[list[analysis.Linear], Callable[[np.ndarray], None]]]:
    """Groups of linears sharing one input that the graph can scale per channel exactly, each with the
    function that scales it by f: a block's pre-norm (its gain, and bias) for the linears reading it, and in
    a gated MLP down's input through up's output columns (act(gate)·up is linear in up). A plain MLP's
    down (after a GELU), linears reading the residual stream directly, and lm_head are not scalable."""
    groups = []
    for norm, readers in model_map.norm_readers():
        if norm is model_map.final_norm or norm.gain is None or norm.gain.const_value is None:
            continue
        if {use.node for use in norm.output.uses()} != {lin.node for lin in readers}:
            continue  # the norm's output also goes elsewhere
        groups.append((readers, functools.partial(scale_norm, norm)))
    for block in model_map.blocks:
        up = block.part(analysis.Role.UP)
        if block.gated and up is not None:
            groups.append(([block.linears[analysis.Role.DOWN]], functools.partial(scale_columns, up)))
    return groups


def bias_array(linear: analysis.Linear) -> np.ndarray | None:
    """`linear`'s bias as an array (its columns, for a view of a fused projection), or None."""
    bias = linear.bias
    if bias is None:
        return None
    b = bias.const_value.numpy()
    return b[slice(*linear.columns)] if linear.columns else b


def set_bias(linear: analysis.Linear, b: np.ndarray) -> None:
    """Replace `linear`'s bias (its columns, for a view of a fused projection)."""
    bias = linear.bias
    if linear.columns:
        full = bias.const_value.numpy().copy()
        full[slice(*linear.columns)] = b
        b = full
    set_tensor(bias, b)


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
