"""qcompile's own ops: each is a model-local ONNX function whose body, in standard ops, is its exact
reference semantics, so any ONNX runtime runs the canonical model without a kernel library.

`QuantizeDequantizePerToken(x; qmax, clip)`: symmetric dynamic per-token fake quantization of activations,
    scale = max(clip · max|x| over the last axis / qmax, 1e-12);  y = clip(round(x / scale), -qmax, qmax) · scale
(numpy reference: `algorithms.smoothquant.quantize_per_token`). int8: qmax = 127; int4: qmax = 7. A clip
ratio < 1 saturates the largest values to resolve the rest more finely (QuaRot's W4A4 uses 0.9).

`QuantizeDequantizeStatic(x, scale; qmax)`: symmetric fake quantization with a given (calibrated) scale that
    broadcasts against x,  y = clip(round(x / scale), −qmax − 1, qmax) · scale.  int8: qmax = 127; int4: 7.
    The KV cache's reference: with scale [1, kv_heads, 1, head_dim] it is exactly what ONNX Runtime's
    GroupQueryAttention stores in an int8 or packed-int4 cache (k_quant_type PER_CHANNEL).

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
STATIC = "QuantizeDequantizeStatic"
_OPSET = 21


def _per_token_function() -> onnx.FunctionProto:
    qmax = onnx.AttributeProto(name="value_float", ref_attr_name="qmax", type=onnx.AttributeProto.FLOAT)
    const = helper.make_node("Constant", [], ["qmax_f"])
    const.attribute.append(qmax)
    clip = helper.make_node("Constant", [], ["clip_f"])
    clip.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name="clip", type=onnx.AttributeProto.FLOAT))
    nodes = [
        const,
        clip,
        helper.make_node("CastLike", ["qmax_f", "x"], ["qmax"]),
        helper.make_node("CastLike", ["clip_f", "x"], ["ratio"]),
        helper.make_node("Neg", ["qmax"], ["qmin"]),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [-1])),
        helper.make_node("Constant", [], ["tiny_f"], value_float=1e-12),
        helper.make_node("CastLike", ["tiny_f", "x"], ["tiny"]),
        helper.make_node("Abs", ["x"], ["magnitude"]),
        helper.make_node("ReduceMax", ["magnitude", "axes"], ["amax"], keepdims=1),
        helper.make_node("Mul", ["amax", "ratio"], ["clipped"]),
        helper.make_node("Div", ["clipped", "qmax"], ["raw_scale"]),
        helper.make_node("Max", ["raw_scale", "tiny"], ["scale"]),
        helper.make_node("Div", ["x", "scale"], ["scaled"]),
        helper.make_node("Round", ["scaled"], ["rounded"]),
        helper.make_node("Clip", ["rounded", "qmin", "qmax"], ["q"]),
        helper.make_node("Mul", ["q", "scale"], ["y"]),
    ]
    defaults = [helper.make_attribute("qmax", 127.0), helper.make_attribute("clip", 1.0)]
    return helper.make_function(DOMAIN, PER_TOKEN, ["x"], ["y"], nodes, [helper.make_opsetid("", _OPSET)],
                                attributes=[], attribute_protos=defaults)


def _static_function() -> onnx.FunctionProto:
    qmax = helper.make_node("Constant", [], ["qmax_f"])
    qmax.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name="qmax", type=onnx.AttributeProto.FLOAT))
    nodes = [
        qmax,
        helper.make_node("CastLike", ["qmax_f", "x"], ["qmax"]),
        helper.make_node("Constant", [], ["one_f"], value_float=1.0),
        helper.make_node("CastLike", ["one_f", "x"], ["one"]),
        helper.make_node("Neg", ["qmax"], ["neg_qmax"]),
        helper.make_node("Sub", ["neg_qmax", "one"], ["qmin"]),
        helper.make_node("Div", ["x", "scale"], ["scaled"]),
        helper.make_node("Round", ["scaled"], ["rounded"]),
        helper.make_node("Clip", ["rounded", "qmin", "qmax"], ["q"]),
        helper.make_node("Mul", ["q", "scale"], ["y"]),
    ]
    return helper.make_function(DOMAIN, STATIC, ["x", "scale"], ["y"], nodes, [helper.make_opsetid("", _OPSET)],
                                attributes=[], attribute_protos=[helper.make_attribute("qmax", 127.0)])


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


_FUNCTIONS = {PER_TOKEN: _per_token_function, HADAMARD: _hadamard_function, STATIC: _static_function}


def register(model: ir.Model, op_type: str) -> None:
    """Add `op_type`'s function (and the qcompile domain) to `model` if it is not there yet."""
    if op_type not in _FUNCTIONS:
        raise ValueError(f"unknown qcompile op {op_type}")
    model.opset_imports.setdefault(DOMAIN, 1)
    if (DOMAIN, op_type, "") not in model.functions:
        function = ir.serde.deserialize_function(_FUNCTIONS[op_type]())
        model.functions[function.identifier()] = function


def _node(op_type: str, inputs: list[ir.Value], attributes: dict, name: str) -> ir.Node:
    """A qcompile op whose output has the first input's type and shape."""
    node = ir.node(op_type, inputs, attributes=attributes, domain=DOMAIN, name=name)
    node.outputs[0].name = name
    node.outputs[0].dtype = inputs[0].dtype
    node.outputs[0].shape = inputs[0].shape
    return node


def per_token_node(x: ir.Value, qmax: float, name: str, clip: float = 1.0) -> ir.Node:
    return _node(PER_TOKEN, [x], {"qmax": float(qmax), "clip": float(clip)}, name)


def static_node(x: ir.Value, scale: ir.Value, bits: int, name: str) -> ir.Node:
    return _node(STATIC, [x, scale], {"qmax": float(2 ** (bits - 1) - 1)}, name)


def hadamard_node(x: ir.Value, left: ir.Value, right: ir.Value, name: str) -> ir.Node:
    return _node(HADAMARD, [x, left, right], {}, name)
