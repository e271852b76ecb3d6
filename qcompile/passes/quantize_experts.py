"""QuantizeExperts: a mixture-of-experts MLP's expert weight tables become blocked DequantizeLinears of integers."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompile import analysis
from qcompile.algorithms.rtn import quantize_fp8, quantize_rtn
from qcompile.passes._canonical import _STORAGE, read_dequantized
from qcompile.passes._result import Result
from qcompile.schemes import Algorithm, WeightScheme


class QuantizeExperts(ir.passes.InPlacePass):
    """Each expert's weight W_e ≈ (q_e - z_e)·s_e blockwise along its input features (K), by round-to-nearest at
    the scheme's width and group size (shrunk to a divisor of K where it is not one; FP8 E4M3 per output
    channel for an FP8 scheme); the table's Gather then
    reads DequantizeLinear(q [E, N, K], s [E, N, ceil(K/B)], axis=K's axis, block_size=B), so every token's
    chosen experts are dequantized from the integers. The router stays float.

    Round-to-nearest whatever the scheme's algorithm: GPTQ and AWQ need each expert's Hessian over the tokens
    routed to it, which the calibration run does not collect; the manifest says so. A no-op on dense models.
    """

    def __init__(self, scheme: WeightScheme, progress=None):
        super().__init__()
        self.scheme = scheme
        self.progress = progress

    def call(self, model: ir.Model) -> Result:
        tables = [t for t in analysis.analyze(model).expert_tables() if t.name not in self.scheme.skip]
        advance = self.progress.task("Quantizing expert tables (RTN)", len(tables)) if self.progress and tables else (lambda: None)
        layers = []
        for table in tables:
            bits, group = self.scheme.layer_formats().get(table.name, (self.scheme.bits, self.scheme.group_size))
            layers.append(self.quantize(model.graph, table, bits, group))
            advance()
        record = {}
        if layers:
            experts = layers[0]["shape"][0]
            record["experts"] = (f"{len(layers)} tables of {experts} experts by RTN" + (
                "" if self.scheme.algorithm == Algorithm.RTN else
                f" ({self.scheme.algorithm.value} needs each expert's calibration, not collected yet)"))
        return Result(model, modified=bool(layers), layers=layers, record=record)

    def quantize(self, graph: ir.Graph, table: analysis.ExpertTable, bits: int | None, group: int) -> dict:
        s = self.scheme
        w = table.float_table()
        e, *rest = w.shape
        k = rest[table.in_axis - 1]
        entry = {"name": table.name, "role": "experts", "shape": [e, k, w.size // (e * k)]}
        if bits is None:
            return {**entry, "format": "float32"}
        group = math.gcd(group, k)  # whole blocks (TensorRT needs them): a group that does not divide K shrinks
        per_expert = []
        for expert in w:
            kn = expert.T if table.in_axis == 2 else expert  # [K, N], as the linear quantizers take it
            fp8 = s.fp8 and bits == 8
            per_expert.append(quantize_fp8(kn) if fp8 else quantize_rtn(kn, bits, group, s.symmetric, positive=s.positive_scales))
        block = per_expert[0].group_size or k

        def stack(arrays):  # [K, N] or [G, N] per expert → the table's layout, [E, N, ·] or [E, ·, N]
            return np.stack([a.T if table.in_axis == 2 else a for a in arrays])

        q = stack([p.q for p in per_expert])
        if q.dtype != ml_dtypes.float8_e4m3fn:
            q = q.astype(_STORAGE[(bits, s.symmetric)][0])
        zero = None if per_expert[0].zero_point is None else stack([p.zero_point for p in per_expert]).astype(q.dtype)
        read_dequantized(graph, table.reader, 0, f"{table.name}.weight", q, stack([p.scale for p in per_expert]), zero,
                         axis=table.in_axis, block_size=block)
        return {**entry, "bits": bits, "group_size": per_expert[0].group_size, "symmetric": s.symmetric,
                "algorithm": "rtn", **({"dtype": "fp8_e4m3"} if q.dtype == ml_dtypes.float8_e4m3fn else {})}
