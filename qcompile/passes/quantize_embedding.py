"""QuantizeEmbedding: the token-embedding table in the canonical blocked form, read through Gather.

    q [V, H] INT4/INT8 ─┐
    scale [V, ceil(H/B)] ┴─ DequantizeLinear(axis=1, block_size=B) ─ Gather(·, input_ids)

Each row (one token's vector) is quantized in blocks of B along H, by the same RTN as the linears (a
row is a [H] "column" of Eᵀ). ONNX Runtime targets lower it to com.microsoft.GatherBlockQuantized.
A tied lm_head that stays float keeps reading the float table, so only quantize the embedding of a
model whose lm_head is quantized if the goal is size.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis
from qcompile.algorithms.rtn import quantize_rtn
from qcompile.passes._canonical import _STORAGE, read_dequantized
from qcompile.passes._result import Result


class QuantizeEmbedding(ir.passes.InPlacePass):
    """Replace the embedding Gather's float table by DequantizeLinear of its RTN quantization.

    Approximates: E[v, h] ≈ q[v, h] · s[v, h // B], so each looked-up row is its blockwise dequantized
    value; nothing else in the graph changes. The result's `layers` hold its manifest entry.
    """

    def __init__(self, bits: int, group_size: int, positive_scales: bool = False):
        super().__init__()
        self.bits, self.group_size, self.positive_scales = bits, group_size, positive_scales

    def call(self, model: ir.Model) -> Result:
        gather = analysis.analyze(model).embedding
        table = gather.inputs[0].const_value
        if table is None:
            return Result(model, False)  # already quantized
        e = table.numpy().astype(np.float32)
        qw = quantize_rtn(e.T, self.bits, self.group_size, True, positive=self.positive_scales)  # blocks along H
        np_type, _ = _STORAGE[(self.bits, True)]
        read_dequantized(model.graph, gather, 0, "embedding.weight", np.ascontiguousarray(qw.q.T).astype(np_type),
                         np.ascontiguousarray(qw.scale.T), None, axis=1, block_size=self.group_size)
        return Result(model, True, layers=[{"name": "embedding", "shape": list(e.shape), "bits": self.bits,
                                            "group_size": self.group_size, "symmetric": True, "algorithm": "rtn"}])
