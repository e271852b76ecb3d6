"""The canonical quantized weight form, shared by every weight-quantization pass.

A quantized linear is stored once, in standard ONNX (opset 21):

    q [K, N] INT4/UINT4/INT8/UINT8 ─┐
    scale [ceil(K/B), N] float32 ───┼─ DequantizeLinear(axis=0, block_size=B) ─ MatMul(x, ·)
    zero_point (asymmetric only) ───┘

Per-channel weights (one block spanning K; W8A8 and FP8) are DequantizeLinear(axis=1) with scale [N].
Standard ops rather than a custom op because this form already says everything a weight-only scheme
needs: ONNX Runtime fuses it into MatMulNBits, TensorRT reads it as is, and any ONNX runtime (or
onnx.reference) executes it, so the canonical model is the numerical reference for every target.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompile.algorithms.rtn import QuantizedWeight
from qcompile import analysis
from qcompile.analysis import Linear, Role
from qcompile.schemes import WeightScheme

_STORAGE = {
    (4, True): (ml_dtypes.int4, ir.DataType.INT4),
    (4, False): (ml_dtypes.uint4, ir.DataType.UINT4),
    (8, True): (np.int8, ir.DataType.INT8),
    (8, False): (np.uint8, ir.DataType.UINT8),
}


def attach_quantized_weight(graph: ir.Graph, linear: Linear, qw: QuantizedWeight) -> None:
    """Make `linear` read its weight through DequantizeLinear of `qw`; drop the float weight if unused.

    Group size 0 (one block spanning K) is stored per channel (scale [N], axis=1, no block_size), as TensorRT's W8A8
    form needs; FP8 codes are stored as FLOAT8E4M3FN.
    """
    name = f"{linear.name}.weight"
    q = qw.q if qw.q.dtype == ml_dtypes.float8_e4m3fn else qw.q.astype(_STORAGE[(qw.bits, qw.symmetric)][0])
    zp = None if qw.zero_point is None else qw.zero_point.astype(q.dtype)
    if qw.group_size == 0:
        read_dequantized(graph, linear.node, 1, name, q, qw.scale[0], None if zp is None else zp[0], axis=1, block_size=0)
    else:
        read_dequantized(graph, linear.node, 1, name, q, qw.scale, zp, axis=0, block_size=qw.group_size)


def read_dequantized(graph: ir.Graph, consumer: ir.Node, index: int, name: str, q: np.ndarray, scale: np.ndarray,
                     zero_point: np.ndarray | None, axis: int, block_size: int) -> None:
    """Feed `consumer`'s input `index` from DequantizeLinear(q, scale[, zero_point]) (initializers `name`_q,
    _scale, _zero_point; output `name`), and drop the tensor it read before if nothing else does."""
    old = consumer.inputs[index]
    inputs = [_initializer(graph, f"{name}_q", q), _initializer(graph, f"{name}_scale", scale)]
    if zero_point is not None:
        inputs.append(_initializer(graph, f"{name}_zero_point", zero_point))
    attributes = {"axis": axis, **({"block_size": block_size} if block_size else {})}
    dq = ir.node("DequantizeLinear", inputs, attributes=attributes, name=f"{name}_dq")
    dq.outputs[0].name = name
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = ir.Shape(q.shape)
    graph.insert_before(consumer, dq)
    consumer.replace_input_with(index, dq.outputs[0])
    _remove_if_unused(graph, old)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def _remove_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove a dead weight: an unused initializer, or an unused Transpose of one (tied lm_head)."""
    if value.uses() or value in graph.outputs:
        return
    producer = value.producer()
    if producer is not None:
        source = producer.inputs[0]
        graph.remove(producer, safe=True)
        _remove_if_unused(graph, source)
    elif value.name in graph.initializers:
        graph.initializers.pop(value.name)


# A 4-bit lm_head is quantized in groups of 32 (by GPTQ in `pipeline.compile`): on SmolLM2's ort-int4 it then costs
# +1.4 % perplexity over an 8-bit one (33.72 against 33.27, 32 windows), against +24 % by RTN at group 128 (41.31).
LM_HEAD_INT4_GROUP = 32


def bits_for(scheme: WeightScheme, linear: Linear) -> int | None:
    """The width `scheme` gives `linear`: lm_head has its own, skipped layers None (kept float)."""
    if linear.name in scheme.skip:
        return None
    return scheme.lm_head_bits if linear.role == Role.LM_HEAD else scheme.bits


def group_for(scheme: WeightScheme, linear: Linear) -> int:
    """The group size `scheme` gives `linear`: a 4-bit lm_head's is LM_HEAD_INT4_GROUP, the rest scheme.group_size."""
    if linear.role == Role.LM_HEAD and scheme.lm_head_bits == 4:
        return LM_HEAD_INT4_GROUP
    return scheme.group_size


def layer_record(linear: Linear, qw: QuantizedWeight | None, algorithm: str) -> dict:
    """One manifest entry: what was done to `linear`."""
    entry = {"name": linear.name, "role": linear.role.value, "shape": [linear.in_features, linear.out_features]}
    if qw is None:
        return {**entry, "format": linear.format()}
    fp8 = qw.q.dtype == ml_dtypes.float8_e4m3fn
    return {**entry, "bits": qw.bits, "group_size": qw.group_size,
            "symmetric": qw.symmetric, "algorithm": algorithm, **({"dtype": "fp8_e4m3"} if fp8 else {})}


def quantize_linears(model, scheme: WeightScheme, quantize_one, algorithm: str, progress=None,
                     label: str = "Quantizing weights", names: set[str] | None = None) -> list[dict]:
    """Quantize every linear `scheme` covers (and `names` lists, if given) with `quantize_one(linear, bits)
    -> QuantizedWeight`, put it in the canonical form, and return the per-layer manifest records (float
    layers included). An empty `label` shows no progress."""
    linears = analysis.analyze(model).linears()
    advance = progress.task(label, len(linears)) if progress and label else (lambda: None)
    layers = []
    for linear in linears:
        bits = bits_for(scheme, linear) if names is None or linear.name in names else None
        qw = None
        if bits is not None:
            qw = quantize_one(linear, bits)
            attach_quantized_weight(model.graph, linear, qw)
        layers.append(layer_record(linear, qw, algorithm))
        advance()
    return layers
