"""QuantizeEmbedding: the token-embedding table in the canonical blocked form, read through Gather.

    q [V, H] INT4/INT8 ─┐
    scale [V, ceil(H/B)] ┴─ DequantizeLinear(axis=1, block_size=B) ─ Gather(·, input_ids)

Each row (one token's vector) is quantized in blocks of B along H, by the same RTN as the linears (a
row is a [H] "column" of Eᵀ). ONNX Runtime targets lower it to com.microsoft.GatherBlockQuantized.
A tied lm_head that stays float keeps reading the float table, so only quantize the embedding of a
model whose lm_head is quantized if the goal is size.

`shared=True` (a tied lm_head already quantized to the same width and block): the table takes the
lm_head's integers and scales, transposed, instead of its own RTN, so one table serves both readers
(ONNX Runtime stores it once: `LowerToMatMulNBits` in `targets/ort.py`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, errors
from qcompile.algorithms.rtn import quantize_rtn
from qcompile.passes._canonical import _STORAGE, read_dequantized, read_weight
from qcompile.passes._result import Result


class QuantizeEmbedding(ir.passes.InPlacePass):
    """Replace the embedding Gather's float table by DequantizeLinear of its RTN quantization (in blocks of
    `group_size`, halved until they divide H) or, `shared`, of the tied lm_head's integers.

    Approximates: E[v, h] ≈ q[v, h] · s[v, h // B], so each looked-up row is its blockwise dequantized
    value; shared, q[v, h] = q_lm[h, v] and s[v, g] = s_lm[g, v], so the lookup returns exactly the row of
    lm_head's dequantized weight (Eᵀ ≈ W_lm). Nothing else in the graph changes. The result's `layers` hold
    its manifest entry.
    """

    def __init__(self, bits: int, group_size: int, positive_scales: bool = False, shared: bool = False):
        super().__init__()
        self.bits, self.group_size, self.positive_scales, self.shared = bits, group_size, positive_scales, shared

    def call(self, model: ir.Model) -> Result:
        model_map = analysis.analyze(model)
        gather = model_map.embedding
        table = gather.inputs[0].const_value
        if table is None:
            return Result(model, False)  # already quantized
        shape = list(table.shape)
        group = self.group_size
        if self.shared:
            q, scale, algorithm = self._lm_head_arrays(model_map.lm_head, table.numpy().astype(np.float32))
        else:
            while shape[1] % group and group > 16:  # whole blocks along H (TensorRT has no partial ones)
                group //= 2
            qw = quantize_rtn(table.numpy().astype(np.float32).T, self.bits, group, True,
                              positive=self.positive_scales)  # blocks along H
            q, scale, algorithm = qw.q.T, qw.scale.T, "rtn"
        read_dequantized(model.graph, gather, 0, "embedding.weight", np.ascontiguousarray(q).astype(_STORAGE[(self.bits, True)][0]),
                         np.ascontiguousarray(scale), None, axis=1, block_size=group)
        return Result(model, True, layers=[{"name": "embedding", "shape": shape, "bits": self.bits,
                                            "group_size": group, "symmetric": True, "algorithm": algorithm}])

    def _lm_head_arrays(self, lm_head: analysis.Linear, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """The tied lm_head's integers [V, H] and scales [V, G] (its [H, V] weight transposed)."""
        shape = list(table.shape)
        d = read_weight(lm_head)
        if d is None or d.zero_point is not None or d.bits != self.bits or d.block_size != self.group_size \
                or list(d.q.shape[::-1]) != shape:
            raise errors.InputError(f"a shared embedding table needs lm_head quantized to {self.bits} bits, symmetric, in blocks of "
                                    f"{self.group_size} along H: use the same --lm-head width and --lm-head-group-size")
        if shape[1] % self.group_size:
            raise errors.InputError(f"a shared embedding table is read in whole blocks along H ({shape[1]}), not {self.group_size}: "
                                    f"use an --lm-head-group-size that divides {shape[1]}")
        q, scale = d.q.T, d.scale.T
        approx = (q.reshape(shape[0], -1, self.group_size) * scale[..., None]).reshape(shape)
        error = float(np.linalg.norm(approx - table) / np.linalg.norm(table))
        if error > 0.5:  # far beyond rounding: lm_head no longer computes with the table (a pass scaled or rotated it)
            raise errors.QcompileError(f"lm_head's quantized weight is not the embedding table (relative error {error:.2f}): "
                                       "it cannot be shared; pass --embeddings int8 or float")
        return q, scale, "shared with lm_head"
