"""QuantizeActivations: the activation quantizer on the input of every quantized linear.

Static kinds (the TensorRT form), one per-tensor scale from calibration, zero point 0:

    x ─ QuantizeLinear(scale, zp INT8|FLOAT8E4M3FN 0) ─ DequantizeLinear(scale, zp) ─ MatMul(·, DQ(W))

Dynamic per-token int8 / int4: x ─ qcompile.QuantizeDequantizePerToken(qmax=127 / 7, clip) ─ MatMul(·, DQ(W)).

Linears that read the same tensor (q/k/v, gate/up) share one quantizer.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompile import analysis, custom_ops
from qcompile.algorithms.smoothquant import search_static_scale, static_scale
from qcompile.calibration import Request, TapStats
from qcompile.passes._canonical import _initializer
from qcompile.passes._result import Result
from qcompile.passes.fold_smoothquant_scales import activation_request
from qcompile.schemes import ActivationKind, WeightScheme, matches

_QMAX = {ActivationKind.INT8_DYNAMIC: 127.0, ActivationKind.INT4_DYNAMIC: 7.0}
_ZERO_POINTS = {ActivationKind.INT8_STATIC: np.int8, ActivationKind.FP8_STATIC: ml_dtypes.float8_e4m3fn}


class QuantizeActivations(ir.passes.InPlacePass):
    """Insert `kind`'s quantizer before every linear whose weight is quantized (a DequantizeLinear; lm_head
    only if `lm_head`; none of `float_inputs`, names or patterns ("blocks.*.down") whose inputs stay float).

    Approximates x by its quantized value. Static kinds need `stats` (calibration of the same tensors,
    keyed by name, after any smoothing): the scale is max|x| / top, or, when the stats hold sampled rows,
    the clipped scale minimising the rows' squared quantization error. The result's record summarises the
    static scales. Handed to `Calibrate` (static kinds), it asks for the inputs of the linears `weights`
    quantizes, with 8 sampled rows per window; a SmoothQuant fold between the two keeps them exact.
    """

    def __init__(self, kind: ActivationKind, stats: dict[str, TapStats] | None = None, lm_head: bool = True,
                 clip: float = 1.0, weights: WeightScheme | None = None, float_inputs: tuple[str, ...] = ()):
        super().__init__()
        self.float_inputs = float_inputs
        self.kind = kind
        self.clip = clip
        self.stats = stats
        self.lm_head = lm_head
        self.weights = weights

    def calibration_request(self, model: ir.Model) -> Request:
        return activation_request(model, self.weights, rows=8)

    def calibrated(self, stats: dict[str, TapStats], request: Request) -> None:
        self.stats = stats

    def call(self, model: ir.Model) -> Result:
        graph = model.graph
        made: dict[ir.Value, ir.Value] = {}
        scales: dict[str, float] = {}
        for linear in analysis.analyze(model).linears():
            dq = linear.weight_input.producer()
            if dq is None or dq.op_type != "DequantizeLinear" or (linear.role == analysis.Role.LM_HEAD and not self.lm_head) \
                    or matches(linear.name, self.float_inputs):
                continue
            x = linear.node.inputs[0]
            if x not in made:
                made[x] = self._insert(model, graph, x, linear.node, scales)
            linear.node.replace_input_with(0, made[x])
        if self.kind in _QMAX and made:
            custom_ops.register(model, custom_ops.PER_TOKEN)
        record = {"static_scales": {"count": len(scales), "min": min(scales.values()), "max": max(scales.values())}} if scales else {}
        return Result(model, modified=bool(made), record=record)

    def _insert(self, model: ir.Model, graph: ir.Graph, x: ir.Value, consumer: ir.Node, scales: dict) -> ir.Value:
        name = f"{x.name}_act"
        if self.kind in _QMAX:
            nodes = [custom_ops.per_token_node(x, _QMAX[self.kind], name, self.clip)]
        else:
            stats = self.stats[x.name]
            absmax = float(stats.absmax.max())
            scale = search_static_scale(stats.samples, absmax, self.kind)[0] if stats.rows else static_scale(absmax, self.kind)
            scales[x.name] = scale
            s = _initializer(graph, f"{name}_scale", np.array(scale, np.float32))
            zp = _initializer(graph, f"{name}_zero_point", np.zeros((), _ZERO_POINTS[self.kind]))
            q = ir.node("QuantizeLinear", [x, s, zp], name=f"{name}_q")
            q.outputs[0].name, q.outputs[0].dtype, q.outputs[0].shape = f"{name}_q", zp.dtype, x.shape
            dq = ir.node("DequantizeLinear", [q.outputs[0], s, zp], name=name)
            dq.outputs[0].name, dq.outputs[0].dtype, dq.outputs[0].shape = name, x.dtype, x.shape
            nodes = [q, dq]
        producer = x.producer()
        if producer is not None:
            graph.insert_after(producer, nodes)
        else:
            graph.insert_before(consumer, nodes)
        return nodes[-1].outputs[0]
