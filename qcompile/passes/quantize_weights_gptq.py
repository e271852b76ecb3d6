"""QuantizeWeightsGPTQ: every linear's weight quantized by GPTQ from calibration Hessians (canonical form)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, calibration
from qcompile.algorithms.gptq import quantize_gptq
from qcompile.checkpoint import Checkpoint
from qcompile.passes._canonical import bits_for, group_for, layer_record, quantize_linears
from qcompile.passes._result import Result
from qcompile.schemes import WeightScheme

GPTQ_WALK = "GPTQ, "  # how the block walk's progress label starts (the CLI offers --resume when it is stopped)


class QuantizeWeightsGPTQ(ir.passes.InPlacePass):
    """W ≈ Ŵ = (q - z) · s chosen to minimise ||X·W - X·Ŵ||² on calibration inputs X (see `algorithms.gptq`).

    The model is processed block by block, so that only one block's Hessians H = XᵀX are ever held (a 3B
    Llama's would be ~24 GB all at once). The hidden state entering the current block is kept for every
    window ([windows, T, H] float32) and ORT runs that block alone, fed with it. Linears sharing an input
    share one tap; v's Hessian is attention-weighted (see `calibration`).
    Mode "parallel": every Hessian comes from the float model: one run per block measures the Hessians and
    the float hidden state leaving it, so this costs one float pass over the calibration set.
    Mode "sequential" (the reference method): each block's Hessians are measured on its inputs as the
    already-quantized earlier blocks produce them, so GPTQ also corrects the error that reaches it; each
    block runs twice (measure, then propagate through the quantized block): about two float passes.
    With `hessians` (linear name → H, as FoldAWQScales provides) no calibration runs at all; handed to
    `Calibrate` (parallel mode), it takes them from that shared run, all at once (what a 4-bit lm_head
    alone needs; all the Hessians of a big model would not fit, so block GPTQ walks the blocks itself).
    Requires a float model that `analysis.analyze` recognises.
    Bits, groups and skips follow `scheme` as in QuantizeWeightsRTN; `names`, if given, limits the pass to
    those linears (the blocks before them are still walked one at a time, for their output).
    The result's `layers` record what was done.
    With a `checkpoint`, every finished linear and the hidden state entering the next block are saved, and
    a resumed checkpoint's saved linears are loaded instead of computed.
    """

    def __init__(self, scheme: WeightScheme, windows: np.ndarray | None, act_order: bool = False, damp: float = 0.01,
                 progress=None, hessians: dict[str, np.ndarray] | None = None, sequential: bool = False,
                 checkpoint: Checkpoint | None = None, names: set[str] | None = None):
        super().__init__()
        if sequential and hessians is not None:
            raise ValueError("sequential GPTQ measures its own Hessians: pass hessians only in parallel mode")
        self.hessians = hessians
        self.scheme = scheme
        self.windows = windows
        self.act_order = act_order
        self.damp = damp
        self.progress = progress
        self.sequential = sequential
        self.checkpoint = checkpoint
        self.names = names

    def requires(self, model: ir.Model) -> None:
        analysis.analyze(model)

    def _linears(self, model: ir.Model) -> list:
        return [lin for lin in analysis.analyze(model).linears()
                if bits_for(self.scheme, lin) is not None and (self.names is None or lin.name in self.names)]

    def calibration_request(self, model: ir.Model) -> calibration.Request:
        if self.sequential:
            raise ValueError("sequential GPTQ measures its Hessians on the partly quantized model: it runs its own calibration")
        return calibration.linear_request(model, self._linears(model))

    def calibrated(self, stats: dict, request: calibration.Request) -> None:
        self.hessians = calibration.linear_hessians(stats, request)

    def _quantize(self, model: ir.Model, hessians: dict[str, np.ndarray], names: set[str] | None, label: str) -> list[dict]:
        s = self.scheme

        def quantize_one(linear, bits):
            saved = self.checkpoint.load_weight(linear.name) if self.checkpoint else None
            if saved is not None:
                return saved
            qw = quantize_gptq(linear.float_weight(), hessians[linear.name], bits, group_for(s, linear), s.symmetric,
                               damp=self.damp, act_order=self.act_order, positive=s.positive_scales)
            if self.checkpoint:
                self.checkpoint.save_weight(linear.name, qw)
            return qw

        return quantize_linears(model, s, quantize_one, "gptq", self.progress, label, names=names)

    def call(self, model: ir.Model) -> Result:
        names = {lin.name for lin in self._linears(model)}
        if self.hessians is not None:
            layers = self._quantize(model, self.hessians, names, "Quantizing weights (GPTQ)")
        else:
            layers = self._by_block(model, names)
        return Result(model, modified=bool(names), layers=layers)

    def _by_block(self, model: ir.Model, names: set[str]) -> list[dict]:
        model_map = analysis.analyze(model)
        layers: dict[str, dict] = {}
        saved = self.checkpoint.load_hidden() if self.checkpoint else None
        start, hidden = saved or (0, None)
        if start:  # resumed: blocks before `start` are finished and saved
            finished = {lin.name for b in model_map.blocks[:start] for lin in b.linears.values()} & names
            layers.update((r["name"], r) for r in self._quantize(model, {}, finished, "") if r["name"] in finished)
            model_map = analysis.analyze(model)
        entry = model_map.blocks[start - 1].output if start else model_map.blocks[0].input
        if hidden is None:
            hidden = calibration.values(model, entry, self.windows, progress=self.progress,
                                        label="Calibrating (embeddings)")
        mode = "sequential" if self.sequential else "parallel"
        advance = self.progress.task(f"{GPTQ_WALK}{mode} (blocks)", len(model_map.blocks) + 1 - start) if self.progress else (lambda: None)
        for index in range(start, len(model_map.blocks) + 1):
            model_map = analysis.analyze(model)  # the earlier blocks' linears are now DequantizeLinear → MatMul
            last = index == len(model_map.blocks)
            linears = [model_map.lm_head] if last else list(model_map.blocks[index].linears.values())
            linears = [lin for lin in linears if lin.name in names]
            exit_ = None if last else model_map.blocks[index].output
            float_exit = None
            if linears:
                keep = None if self.sequential else exit_  # parallel: the float block's output, from the same run
                _, hessians, float_exit = calibration.linear_statistics(model, linears, self.windows,
                                                                        start=(entry, hidden), keep=keep)
                chosen = {lin.name for lin in linears}
                layers.update((r["name"], r) for r in self._quantize(model, hessians, chosen, "") if r["name"] in chosen)
            if not last:
                hidden = float_exit if float_exit is not None else calibration.values(model, exit_, self.windows,
                                                                                        start=(entry, hidden))
                entry = exit_
                if self.checkpoint:
                    self.checkpoint.save_hidden(index + 1, hidden)
            advance()
        return [layers.get(lin.name) or layer_record(lin, None, "gptq") for lin in analysis.analyze(model).linears()]
