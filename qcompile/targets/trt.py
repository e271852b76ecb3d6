"""TensorRT targets: the canonical form is already TensorRT's weight-only form, with two rules more.

TensorRT (and TensorRT-RTX) parse explicit quantization only when (checked by parsing, see
RUNTIME-FACTS.md): zero points are absent or zero on signed types, scales are constant and strictly
positive, a blocked DequantizeLinear's quantized axis divides into whole blocks, per-channel weight
scales run along the output axis, and no custom op lacks a plugin. ONNX allows a short last block;
TensorRT does not, so `PadPartialBlocks` zero-pads such weights (and the activations they read) to whole
blocks. `check_tensorrt` states all the rules as a checker, run at the end of every trt-* compile.
`read_weight` reads a padded weight back as its canonical arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile import analysis, errors, scratch
from qcompile.analysis import Linear
from qcompile.passes import _canonical
from qcompile.passes._canonical import Decoded

_WEIGHT_TYPES = {ir.DataType.INT4, ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN}
_ONNX_DOMAINS = ("", "ai.onnx")
MIN_OPSET = 21


FORMS = analysis.LoweredForms(between=("Pad",))  # `PadPartialBlocks` pads a linear's input to whole blocks


class PadPartialBlocks(ir.passes.InPlacePass):
    """For every blocked weight DequantizeLinear with K % block != 0: zero-pad q to whole blocks (scales
    unchanged) and feed the MatMul its activation zero-padded to match (one Pad per activation and width).

    Preserves: the padded rows dequantize to 0 and meet zero activations, so x·W is unchanged; the
    integers and scales of the real rows are bit-identical to the canonical ones.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        pads: dict[tuple[ir.Value, int], ir.Value] = {}
        modified = False
        for node in list(graph):
            dq = node.inputs[1].producer() if node.op_type == "MatMul" and len(node.inputs) > 1 else None
            if dq is None or dq.op_type != "DequantizeLinear" or dq.attributes.get_int("axis", 1) != 0:
                continue
            block = dq.attributes.get_int("block_size", 0)
            q = dq.inputs[0]
            if not block or q.const_value is None or q.const_value.shape[0] % block == 0:
                continue
            k, n = q.const_value.shape
            extra = -k % block
            array = q.const_value.numpy()
            q.const_value = scratch.tensor(np.concatenate([array, np.zeros((extra, n), array.dtype)]), q.name)
            q.shape = ir.Shape([k + extra, n])
            dq.outputs[0].shape = ir.Shape([k + extra, n])
            key = (node.inputs[0], extra)
            if key not in pads:
                pads[key] = self._pad(graph, node, extra)
            node.replace_input_with(0, pads[key])
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _pad(graph: ir.Graph, consumer: ir.Node, extra: int) -> ir.Value:
        x = consumer.inputs[0]
        name = f"{x.name}_pad{extra}"
        amounts = ir.Value(name=f"{name}_amounts", const_value=ir.tensor(np.array([0, 0, 0, 0, 0, extra], np.int64),
                                                                          name=f"{name}_amounts"))
        graph.register_initializer(amounts)
        pad = ir.node("Pad", [x, amounts], name=name)  # activations are [batch, seq, K]
        pad.outputs[0].name = name
        pad.outputs[0].dtype = x.dtype
        producer = x.producer()
        if producer is not None:
            graph.insert_after(producer, pad)
        else:
            graph.insert_before(consumer, pad)
        return pad.outputs[0]


def read_weight(linear: Linear) -> Decoded | None:
    """`linear`'s integers and scales in canonical layout: a `PadPartialBlocks` weight without its zero rows
    (which must be zero), or the canonical form; None for a float weight."""
    pad = linear.node.inputs[0].producer()
    dq = linear.weight_input.producer()
    if pad is None or pad.op_type != "Pad" or dq is None or dq.op_type != "DequantizeLinear":
        return _canonical.read_weight(linear)
    stored = _canonical.read_dequantize_linear(dq)
    k = stored.q.shape[0] - int(_const(pad.inputs[1])[-1])
    if np.any(stored.q[k:]):
        raise errors.InputError(f"{linear.name}: padded rows of {stored.tensor} are not zero")
    return dataclasses.replace(stored, q=stored.q[:k]).one_block_if_uniform()


@dataclasses.dataclass(frozen=True)
class Violation:
    node: str
    rule: str

    def __str__(self) -> str:
        return f"{self.node}: {self.rule}"


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def check_tensorrt(model: ir.Model) -> list[Violation]:
    """Every way `model`'s nodes break TensorRT's explicit-quantization rules (empty when they conform).

    A weight DequantizeLinear folded back to float breaks no node rule; `fidelity.compare_digests`
    against the compile's recorded digests finds it (the `check` command runs both).
    """
    found: list[Violation] = []
    graph = model.graph
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        found.append(Violation("model", f"default opset {opset} < {MIN_OPSET}: blocked INT4 DequantizeLinear needs opset 21"))
    functions = {(f.domain, f.name) for f in model.functions.values()}
    for node in graph:
        where = node.name or node.op_type
        if node.domain not in _ONNX_DOMAINS and (node.domain, node.op_type) not in functions:
            found.append(Violation(where, f"custom op {node.domain}.{node.op_type} has no TensorRT plugin: "
                                          "use a trt-* target's standard-op form"))
        if node.op_type not in ("DequantizeLinear", "QuantizeLinear") or node.domain not in _ONNX_DOMAINS:
            continue
        table = bool(node.outputs[0].uses()) and all(c.op_type in ("Gather", "GatherND") and i == 0 for c, i in node.outputs[0].uses())
        found += [Violation(where, rule) for rule in _qdq_rules(node, table)]
    return found


def _qdq_rules(node: ir.Node, table: bool = False) -> list[str]:
    """`table`: the DequantizeLinear feeds only Gathers (an embedding table [V, H], blocked along H; or a
    mixture of experts' table [E, N, K] or [E, K, N], blocked along K, which TensorRT-RTX 1.7 builds)."""
    rules = []
    data, scale = node.inputs[0], node.inputs[1]
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    axis = node.attributes.get_int("axis", 1)
    block = node.attributes.get_int("block_size", 0)
    s = _const(scale)
    if s is None:
        return ["scale is not a constant initializer"]
    if scale.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        rules.append(f"scale type {scale.dtype.name} is not FLOAT or FLOAT16")
    if not np.all(s > 0):
        rules.append(f"{int((s <= 0).sum())} scale(s) are not strictly positive")
    z = _const(zp)
    if zp is not None and (z is None or np.any(z != 0)):
        rules.append("non-zero zero point: TensorRT quantization is symmetric (use --symmetric)")
    qtype = (data if node.op_type == "DequantizeLinear" else node.outputs[0]).dtype
    if zp is not None:
        qtype = zp.dtype
    if qtype is not None and qtype not in _WEIGHT_TYPES:
        rules.append(f"quantized type {qtype.name} is not INT4, INT8 or FLOAT8E4M3FN (unsigned types are rejected)")
    q = _const(data) if node.op_type == "DequantizeLinear" else None
    if q is None:  # an activation: per-tensor only
        if s.size != 1:
            rules.append(f"activation scale has {s.size} values: activations are quantized per tensor")
        return rules
    if q.ndim == 3 and table:
        if axis not in (1, 2) or not block or q.shape[axis] % block:
            rules.append(f"expert table {list(q.shape)} is not in whole blocks along its axis 1 or 2 (axis {axis}, block {block})")
        elif s.shape != tuple(d // block if i == axis else d for i, d in enumerate(q.shape)):
            rules.append(f"blocked scale shape {list(s.shape)} does not match expert table {list(q.shape)} / block {block}")
        return rules
    if q.ndim != 2:
        return rules + [f"weight has rank {q.ndim}, expected a 2-D [K, N] weight"]
    k, n = q.shape
    if block:
        blocked = 1 if table else 0  # a weight [K, N] is blocked along K, an embedding table [V, H] along H
        if axis != blocked:
            rules.append(f"blocked along axis {axis}: " + ("an embedding table [V, H] is blocked along H (axis 1)" if table
                                                            else "weights [K, N] are blocked along K (axis 0)"))
        elif q.shape[axis] % block:
            rules.append(f"{'H' if table else 'K'}={q.shape[axis]} is not a whole number of blocks of {block}"
                         + ("" if table else " (run PadPartialBlocks)"))
        if s.shape != ((-(-k // block), n) if axis == 0 else (k, -(-n // block))):
            rules.append(f"blocked scale shape {list(s.shape)} does not match weight {[k, n]} / block {block}")
        if qtype == ir.DataType.INT4 and n % 2:
            rules.append(f"INT4 weight's last dimension {n} is odd")
    elif s.size != 1:
        if s.ndim != 1 or axis != 1 or s.shape[0] != n:
            rules.append(f"per-channel scale must be 1-D along the output axis (axis=1, {n} values)")
    return rules
