"""The canonical quantized weight form, shared by every weight-quantization pass.

A quantized linear is stored once, in standard ONNX (opset 21):

    q [K, N] INT4/UINT4/INT8/UINT8 ─┐
    scale [ceil(K/B), N] float32 ───┼─ DequantizeLinear(axis=0, block_size=B) ─ MatMul(x, ·)
    zero_point (asymmetric only) ───┘

Per-channel weights (one block spanning K; W8A8 and FP8) are DequantizeLinear(axis=1) with scale [N].
Standard ops rather than a custom op because this form already says everything a weight-only scheme
needs: ONNX Runtime fuses it into MatMulNBits, TensorRT reads it as is, and any ONNX runtime (or
onnx.reference) executes it, so the canonical model is the numerical reference for every target.

This module both writes the form (`attach_quantized_weight`) and reads it back (`read_weight`,
`read_embedding`) as `Decoded` arrays, the layout every target's reader returns for its own lowered form.
"""

from __future__ import annotations

import dataclasses
import hashlib

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompile.algorithms.rtn import QuantizedWeight
from qcompile import analysis, scratch
from qcompile.analysis import Linear, Role
from qcompile.schemes import WeightScheme

forms = analysis.NO_FORMS  # the canonical form is ONNX's own ops (a `fidelity.Reader`, as targets are)

# The integer weight types, the one table: (bits, signed) → (numpy storage type, ONNX type).
_STORAGE = {
    (2, True): (ml_dtypes.int2, ir.DataType.INT2),  # opset 25's type: only ONNX Runtime's MatMulNBits runs it (bits=2)
    (2, False): (ml_dtypes.uint2, ir.DataType.UINT2),
    (4, True): (ml_dtypes.int4, ir.DataType.INT4),
    (4, False): (ml_dtypes.uint4, ir.DataType.UINT4),
    (8, True): (np.int8, ir.DataType.INT8),
    (8, False): (np.uint8, ir.DataType.UINT8),
}
# The same table read backwards: ONNX type → (bits, signed).
_INT_TYPES = {onnx_type: key for key, (_, onnx_type) in _STORAGE.items()}


@dataclasses.dataclass
class Decoded:
    """A quantized weight in canonical layout, whatever form stored it: signed q [K, N] (or unsigned q with a
    zero point; FP8 E4M3 bit patterns), float32 scales [G, N]. An embedding table is q [V, H], scales [V, G]."""

    q: np.ndarray  # [K, N] int16: signed values, or unsigned codes when zero_point is set
    scale: np.ndarray  # [G, N] float32
    zero_point: np.ndarray | None  # [G, N] int16
    bits: int
    block_size: int
    tensor: str  # the initializer that holds the integers (named in error messages)
    fp8: bool = False  # q holds FLOAT8E4M3FN bit patterns

    def one_block_if_uniform(self) -> "Decoded":
        """A linear's weight whose every block of a column has the same scale (and zero point), or that has
        no block size (per-channel), as one block spanning K: same numbers, one form (MatMulNBits must spell a
        per-channel weight in blocks)."""
        k = self.q.shape[0]
        same = np.all(self.scale == self.scale[:1]) and (
            self.zero_point is None or np.all(self.zero_point == self.zero_point[:1]))
        if same or self.block_size == 0:
            zp = None if self.zero_point is None else self.zero_point[:1]
            return dataclasses.replace(self, scale=self.scale[:1], zero_point=zp, block_size=k)
        return self

    def digest(self) -> str:
        kind = "fp8/" if self.fp8 else ""
        h = hashlib.sha256(f"{kind}{self.bits}/{self.block_size}/{list(self.q.shape)}".encode())
        for a in (self.q, self.scale, self.zero_point):
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def read_weight(linear: Linear) -> Decoded | None:
    """The integers and scales of `linear` (its `columns`, for a view of a fused projection) when its weight
    is DequantizeLinear(q, scale[, zp]) → MatMul; None otherwise (a float weight, or a form only a target can read)."""
    dq = linear.weight_input.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    decoded = read_dequantize_linear(dq)
    if linear.columns is not None:  # a view of a fused projection: its columns
        cols = slice(*linear.columns)
        zp = None if decoded.zero_point is None else decoded.zero_point[:, cols]
        decoded = dataclasses.replace(decoded, q=decoded.q[:, cols], scale=decoded.scale[:, cols], zero_point=zp)
    return decoded.one_block_if_uniform()


def read_dequantize_linear(dq: ir.Node) -> Decoded:
    """A weight DequantizeLinear's arrays as stored (not yet `one_block_if_uniform`; a target that pads q
    trims it first): a linear's [K, N] with scales [G, N], or an expert table's [E, ·, ·] with its scales."""
    fp8 = dq.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN
    q = (_array(dq.inputs[0]).view(np.uint8) if fp8 else _array(dq.inputs[0])).astype(np.int16)
    zp = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    bits = 8 if fp8 else _INT_TYPES[dq.inputs[0].dtype][0]
    scale = _array(dq.inputs[1]).astype(np.float32)
    zp = None if zp is None else _array(zp).astype(np.int16)
    if q.ndim == 2:  # a linear's: per-channel [N] → [1, N]; an expert table keeps its [E, ·, ·] layout
        scale, zp = scale.reshape(-1, q.shape[1]), None if zp is None else zp.reshape(-1, q.shape[1])
    return Decoded(q, scale, zp, bits, dq.attributes.get_int("block_size", 0), dq.inputs[0].name, fp8)


def read_expert_table(table: analysis.ExpertTable) -> Decoded | None:
    """A quantized expert table's integers and scales as stored ([E, N, K] or [E, K, N]); None for a float table."""
    dq = table.table.producer()
    return read_dequantize_linear(dq) if dq is not None and dq.op_type == "DequantizeLinear" else None


def read_embedding(gather: ir.Node) -> Decoded | None:
    """A quantized embedding table's integers [V, H] and scales [V, G] when `gather` reads
    DequantizeLinear(q, scale); None for a float table."""
    dq = gather.inputs[0].producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    return Decoded(_array(dq.inputs[0]).astype(np.int16), _array(dq.inputs[1]).astype(np.float32), None,
                   _INT_TYPES[dq.inputs[0].dtype][0], dq.attributes.get_int("block_size", 0), dq.inputs[0].name)


def _array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


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
    value = ir.Value(name=name, const_value=scratch.tensor(array, name))
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


def bits_for(scheme: WeightScheme, linear: Linear) -> int | None:
    """The width `scheme` gives `linear`: its own format in `scheme.layers`, else lm_head's own or the
    block linears' width; skipped layers None (kept float)."""
    if linear.name in scheme.skip:
        return None
    own = scheme.layer_formats().get(linear.name)
    if own is not None:
        return own[0]
    return scheme.lm_head_bits if linear.role == Role.LM_HEAD else scheme.bits


def group_for(scheme: WeightScheme, linear: Linear) -> int:
    """The group size `scheme` gives `linear`: its own format's, a 4-bit lm_head's own, else scheme.group_size."""
    own = scheme.layer_formats().get(linear.name)
    if own is not None:
        return own[1]
    if linear.role == Role.LM_HEAD and scheme.lm_head_bits == 4:
        return scheme.lm_head_group_size
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
