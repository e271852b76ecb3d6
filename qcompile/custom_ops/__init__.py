"""qcompile's own ops: each is a model-local ONNX function whose body, in standard ops, is its exact
reference semantics, so any ONNX runtime runs the canonical model without a kernel library.

`QuantizeDequantizePerToken(x; qmax)`: symmetric dynamic per-token fake quantization of activations,
    scale = max(max|x| over the last axis / qmax, 1e-12);  y = clip(round(x / scale), -qmax, qmax) · scale
(numpy reference: `algorithms.smoothquant.quantize_per_token`). int8: qmax = 127.

`Hadamard(x, left, right)`: x·(leftᵀ ⊗ right) over the last axis, computed in factored form: the last axis
    (size K·M) viewed as X [K, M], y = left·X·right (left [K, K], right [M, M]), reshaped back. With
    left = Aᵀ and right = B of a `algorithms.hadamard.KroneckerHadamard`, y = x·H: the online rotation
    QuaRot puts before down_proj (numpy reference: `KroneckerHadamard.apply`).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import helper

DOMAIN = "qcompile"
PER_TOKEN = "QuantizeDequantizePerToken"
HADAMARD = "Hadamard"
_OPSET = 21


def _per_token_function() -> onnx.FunctionProto:
    qmax = onnx.AttributeProto(name="value_float", ref_attr_name="qmax", type=onnx.AttributeProto.FLOAT)
    const = helper.make_node("Constant", [], ["qmax_f"])
    const.attribute.append(qmax)
    nodes = [
        const,
        helper.make_node("CastLike", ["qmax_f", "x"], ["qmax"]),
        helper.make_node("Neg", ["qmax"], ["qmin"]),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [-1])),
        helper.make_node("Constant", [], ["tiny_f"], value_float=1e-12),
        helper.make_node("CastLike", ["tiny_f", "x"], ["tiny"]),
        helper.make_node("Abs", ["x"], ["magnitude"]),
        helper.make_node("ReduceMax", ["magnitude", "axes"], ["amax"], keepdims=1),
        helper.make_node("Div", ["amax", "qmax"], ["raw_scale"]),
        helper.make_node("Max", ["raw_scale", "tiny"], ["scale"]),
        helper.make_node("Div", ["x", "scale"], ["scaled"]),
        helper.make_node("Round", ["scaled"], ["rounded"]),
        helper.make_node("Clip", ["rounded", "qmin", "qmax"], ["q"]),
        helper.make_node("Mul", ["q", "scale"], ["y"]),
    ]
    default = helper.make_attribute("qmax", 127.0)
    return helper.make_function(DOMAIN, PER_TOKEN, ["x"], ["y"], nodes, [helper.make_opsetid("", _OPSET)],
                                attributes=[], attribute_protos=[default])


def _hadamard_function() -> onnx.FunctionProto:
    nodes = [
        helper.make_node("Shape", ["left"], ["k"], end=1),
        helper.make_node("Shape", ["right"], ["m"], end=1),
        helper.make_node("Constant", [], ["rest"], value=helper.make_tensor("rest", onnx.TensorProto.INT64, [1], [-1])),
        helper.make_node("Concat", ["rest", "k", "m"], ["blocks"], axis=0),
        helper.make_node("Reshape", ["x", "blocks"], ["x3"]),
        helper.make_node("MatMul", ["x3", "right"], ["xr"]),
        helper.make_node("MatMul", ["left", "xr"], ["y3"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Reshape", ["y3", "shape"], ["y"]),
    ]
    return helper.make_function(DOMAIN, HADAMARD, ["x", "left", "right"], ["y"], nodes,
                                [helper.make_opsetid("", _OPSET)])


_FUNCTIONS = {PER_TOKEN: _per_token_function, HADAMARD: _hadamard_function}


def register(model: ir.Model, op_type: str) -> None:
    """Add `op_type`'s function (and the qcompile domain) to `model` if it is not there yet."""
    if op_type not in _FUNCTIONS:
        raise ValueError(f"unknown qcompile op {op_type}")
    model.opset_imports.setdefault(DOMAIN, 1)
    if (DOMAIN, op_type, "") not in model.functions:
        function = ir.serde.deserialize_function(_FUNCTIONS[op_type]())
        model.functions[function.identifier()] = function


def per_token_node(x: ir.Value, qmax: float, name: str) -> ir.Node:
    node = ir.node(PER_TOKEN, [x], attributes={"qmax": float(qmax)}, domain=DOMAIN, name=name)
    node.outputs[0].name = name
    node.outputs[0].dtype = x.dtype
    node.outputs[0].shape = x.shape
    return node


def hadamard_node(x: ir.Value, left: ir.Value, right: ir.Value, name: str) -> ir.Node:
    node = ir.node(HADAMARD, [x, left, right], domain=DOMAIN, name=name)
    node.outputs[0].name = name
    node.outputs[0].dtype = x.dtype
    node.outputs[0].shape = x.shape
    return node
