"""FoldAWQScales: per-input-channel AWQ scales folded into the graph (float-equivalent)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, errors
from qcompile.algorithms.awq import search_scales
from qcompile.passes._canonical import bits_for
from qcompile.passes._fold import scale_norm, set_weight
from qcompile.passes._result import Result
from qcompile.schemes import WeightScheme

R = analysis.Role


class FoldAWQScales(ir.passes.InPlacePass):
    """x·W = (x/s)·(diag(s)·W) for each group of linears sharing an input x, with s from `search_scales`.

    Groups per block: input norm → q, k, v; post-attention norm → gate, up (1/s folded into the norm gain:
    norm(x)·γ/s); up → down (1/s folded into up's output columns: the gated product is linear in up).
    Preserves the logits up to float rounding. Needs float weights and the calibration `stats` of the
    quantized linears' inputs and their `hessians` (linear name → H, see `calibration.linear_request`);
    it rescales `hessians` in place to those of the new inputs, H' = H / (s sᵀ), so a following quantizer
    needs no second calibration run. The result's record holds α per group (its first linear's name).
    """

    def __init__(self, scheme: WeightScheme, stats: dict, hessians: dict[str, np.ndarray], progress=None):
        super().__init__()
        self.scheme = scheme
        self.stats = stats
        self.hessians = hessians
        self.progress = progress

    def requires(self, model: ir.Model) -> None:
        for norm in [n for b in analysis.analyze(model).blocks for n in (b.input_norm, b.post_attention_norm)]:
            if norm.kind != "rms" or norm.gain is None or norm.gain.const_value is None:
                raise errors.UnsupportedModelError(
                    f"AWQ folds scales into RMSNorm gains; norm at '{norm.node.name}' has none: use --algo gptq or rtn"
                )

    def call(self, model: ir.Model) -> Result:
        mm = analysis.analyze(model)
        stats, alphas = self.stats, {}
        quantized = {lin.name for lin in mm.linears() if bits_for(self.scheme, lin) is not None}
        advance = self.progress.task("Searching AWQ scales", len(mm.blocks)) if self.progress else (lambda: None)
        for block in mm.blocks:
            lin = block.linears
            for members, fold_inverse in (
                ([lin[R.Q], lin[R.K], lin[R.V]], lambda s, norm=block.input_norm: scale_norm(norm, 1 / s)),
                ([lin[R.GATE], lin[R.UP]], lambda s, norm=block.post_attention_norm: scale_norm(norm, 1 / s)),
                ([lin[R.DOWN]], lambda s, up=lin[R.UP]: set_weight(up, up.float_weight() / s[None, :])),
            ):
                if not all(m.name in quantized for m in members):
                    continue
                x = stats[members[0].node.inputs[0].name]
                s, alphas[members[0].name] = search_scales(
                    [m.float_weight() for m in members], [self.hessians[m.name] for m in members], x.absmean,
                    self.scheme.bits, self.scheme.group_size, self.scheme.symmetric,
                    positive=self.scheme.positive_scales)
                fold_inverse(s)
                for m in members:
                    set_weight(m, m.float_weight() * s[:, None])
                    self.hessians[m.name] = self.hessians[m.name] / np.outer(s, s)
            advance()
        return Result(model, modified=bool(alphas), record={"alphas": alphas})

