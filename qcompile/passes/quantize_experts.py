"""QuantizeExperts: a mixture-of-experts MLP's expert weight tables become blocked DequantizeLinears of integers."""

from __future__ import annotations

import collections
import math

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompile import analysis, calibration
from qcompile.algorithms.gptq import quantize_gptq
from qcompile.algorithms.rtn import quantize_fp8, quantize_rtn
from qcompile.passes._canonical import _STORAGE, read_dequantized
from qcompile.passes._result import Result
from qcompile.schemes import Algorithm, WeightScheme


class QuantizeExperts(ir.passes.InPlacePass):
    """Each expert's weight W_e ≈ (q_e - z_e)·s_e blockwise along its input features (K), at the scheme's width
    and group size (shrunk to divide the K of every table of the block; FP8 E4M3 per output channel for an
    FP8 scheme); the table's Gather then reads DequantizeLinear(q [E, N, K], s [E, N, ceil(K/B)], axis=K's axis,
    block_size=B), so every token's chosen experts are dequantized from the integers. The router stays float.

    With a GPTQ scheme (gptq, awq+gptq) and calibration `windows`, expert e is GPTQ'd with the Hessian of the
    rows routed to it (one calibration run of the model as the earlier passes left it, its linears already
    quantized); an expert that saw fewer than MIN_TOKENS rows, and every expert under RTN or AWQ, is
    rounded to nearest (AWQ's scales would have to fold into each expert's input, which the graph computes
    once for all of them). The record says which. A no-op on dense models.
    """

    MIN_TOKENS = 16

    def __init__(self, scheme: WeightScheme, windows: np.ndarray | None = None, progress=None):
        super().__init__()
        self.scheme = scheme
        self.windows = windows
        self.progress = progress

    def call(self, model: ir.Model) -> Result:
        blocks = [b.experts.tables for b in analysis.analyze(model).blocks if b.experts]
        tables = [t for block in blocks for t in block if t.name not in self.scheme.skip]
        if not tables:
            return Result(model, modified=False)
        hessians = self.hessians(model, tables)
        advance = self.progress.task("Quantizing expert tables", len(tables)) if self.progress else (lambda: None)
        layers, counts = [], collections.Counter()
        for block in blocks:
            # one block size for the block's tables, dividing each table's K (TensorRT needs whole blocks, ORT's QMoE
            # one block size for both projections); per channel (group 0) stays one block spanning each table's K
            group = math.gcd(self.scheme.group_size, *(t.shape[t.in_axis] for t in block)) if self.scheme.group_size else 0
            for table in (t for t in block if t.name not in self.scheme.skip):
                bits, own_group = self.scheme.layer_formats().get(table.name, (self.scheme.bits, group))
                entry, used = self.quantize(model.graph, table, bits, own_group, hessians)
                layers.append(entry)
                counts.update(used)
                advance()
        experts = layers[0]["shape"][0]
        how = ", ".join(f"{n} by {algo}" for algo, n in sorted(counts.items()))
        return Result(model, modified=True, layers=layers, record={
            "experts": f"{len(tables)} tables of {experts} experts: {how or 'kept float'}"})

    def hessians(self, model: ir.Model, tables: list[analysis.ExpertTable]) -> dict[str, calibration.TapStats]:
        """Per-expert input statistics (with Hessians) of every table, when the scheme is GPTQ's."""
        if self.windows is None or self.scheme.algorithm not in (Algorithm.GPTQ, Algorithm.AWQ_GPTQ):
            return {}
        request = calibration.Request([t.input for t in tables], hessian=True,
                                      experts={t.input.name: t.expert_index for t in tables})
        return calibration.run(model, [request], self.windows, self.progress, "Calibrating experts")[0]

    def quantize(self, graph: ir.Graph, table: analysis.ExpertTable, bits: int | None, group: int,
                 hessians: dict[str, calibration.TapStats]) -> tuple[dict, list[str]]:
        """Quantize `table` in place: its manifest entry, and the algorithm each expert got."""
        s = self.scheme
        w = table.float_table()
        e, *rest = w.shape
        k = rest[table.in_axis - 1]
        entry = {"name": table.name, "role": "experts", "shape": [e, k, w.size // (e * k)]}
        if bits is None:
            return {**entry, "format": "float32"}, []
        group = math.gcd(group, k)  # a recipe's own format for the table: whole blocks too
        per_expert, used = [], []
        for index, expert in enumerate(w):
            kn = expert.T if table.in_axis == 2 else expert  # [K, N], as the linear quantizers take it
            stats = hessians.get(calibration.expert_key(table.input.name, index))
            if s.fp8 and bits == 8:
                per_expert.append(quantize_fp8(kn))
                used.append("fp8")
            elif stats is not None and stats.tokens >= self.MIN_TOKENS:
                per_expert.append(quantize_gptq(kn, stats.hessian, bits, group, s.symmetric, damp=s.damp,
                                                act_order=s.act_order, positive=s.positive_scales))
                used.append("gptq")
            else:
                per_expert.append(quantize_rtn(kn, bits, group, s.symmetric, positive=s.positive_scales))
                used.append("rtn")
        block = per_expert[0].group_size or k

        def stack(arrays):  # [K, N] or [G, N] per expert → the table's layout, [E, N, ·] or [E, ·, N]
            return np.stack([a.T if table.in_axis == 2 else a for a in arrays])

        q = stack([p.q for p in per_expert])
        if q.dtype != ml_dtypes.float8_e4m3fn:
            q = q.astype(_STORAGE[(bits, s.symmetric)][0])
        zero = None if per_expert[0].zero_point is None else stack([p.zero_point for p in per_expert]).astype(q.dtype)
        read_dequantized(graph, table.reader, 0, f"{table.name}.weight", q, stack([p.scale for p in per_expert]), zero,
                         axis=table.in_axis, block_size=block)
        algorithm = "+".join(sorted(set(used)))
        return {**entry, "bits": bits, "group_size": per_expert[0].group_size, "symmetric": s.symmetric,
                "algorithm": algorithm, **({"dtype": "fp8_e4m3"} if q.dtype == ml_dtypes.float8_e4m3fn else {})}, used
