"""QuantizeKVCache: the keys and values a step appends to the KV cache, quantized with calibrated scales."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import custom_ops, errors
from qcompile.calibration import Request, TapStats
from qcompile.passes._canonical import _initializer
from qcompile.passes._result import Result


class QuantizeKVCache(ir.passes.InPlacePass):
    """Every cache output `present.*` = Concat(past, new) gets `new` through `qcompile.QuantizeDequantizeStatic`
    (`bits`, symmetric, one static scale per KV head and channel: [1, kv_heads, 1, head_dim]), so the cache
    holds — and attention reads — only quantized keys and values. This is the canonical reference of a 4- or
    8-bit cache, and exactly what ONNX Runtime's GroupQueryAttention stores in its int8 / packed-int4 cache
    (k/v_quant_type PER_CHANNEL), which the ORT targets lower it to.

    The scales come from calibration (hand the pass to `Calibrate`) of the new keys and values as they enter
    the cache (after RoPE, and after QuaRot's rotations where there are some): per (head, channel),
    max |x| / 127 for 8 bits; for 4 bits c · max |x| / 7, with the clip ratio c in 1, 0.95, … 0.5 that
    minimises the squared quantization error of 64 token rows sampled from each calibration window.
    (benchmarks/bench_kv_cache.py, SmolLM2: the clip search took the 4-bit cache from +15.4 % to +13.8 %
    perplexity over the float cache, and the 8-bit one from +0.00 % to +0.17 %.)
    """

    def __init__(self, bits: int, stats: dict[str, TapStats] | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise errors.InputError(f"KV-cache bits={bits} is not supported: use 4 or 8")
        self.bits, self.stats = bits, stats

    def requires(self, model: ir.Model) -> None:
        cache_concats(model.graph)

    def calibration_request(self, model: ir.Model) -> Request:
        return Request([concat.inputs[1] for _, concat in cache_concats(model.graph)], rows=_ROWS if self.bits == 4 else 0,
                       per_head=True)

    def calibrated(self, stats: dict[str, TapStats], request: Request) -> None:
        self.stats = stats

    def call(self, model: ir.Model) -> Result:
        graph = model.graph
        caches = cache_concats(graph)
        if self.stats is None:
            raise errors.InputError("QuantizeKVCache needs calibration: run it after Calibrate(windows, [this pass])")
        qmax = 2 ** (self.bits - 1) - 1
        amax = []
        for present, concat in caches:
            new = concat.inputs[1]
            shape = new.shape
            if new.name not in self.stats or shape is None or not all(isinstance(shape[i], int) for i in (1, 3)):
                raise errors.UnsupportedModelError(f"no calibration statistics for the [batch, heads, seq, head_dim] "
                                                   f"keys or values '{new.name}' entering '{present.name}'")
            amax.append(float(self.stats[new.name].absmax.max()))
            scale = _scales(self.stats[new.name], qmax).reshape(1, shape[1], 1, shape[3])
            node = custom_ops.static_node(new, _initializer(graph, f"{present.name}.kv_scale", scale), self.bits,
                                          f"{present.name}.kv{self.bits}")
            graph.insert_before(concat, node)
            concat.replace_input_with(1, node.outputs[0])
        custom_ops.register(model, custom_ops.STATIC)
        record = {"bits": self.bits, "scales": "static, per KV head and channel",
                  "max_abs": [round(min(amax), 4), round(max(amax), 4)]}
        return Result(model, modified=bool(caches), record={"kv_cache": record})


_ROWS = 64  # token rows sampled per calibration window for the 4-bit clip search
_RATIOS = np.linspace(1.0, 0.5, 11)


def _scales(stats: TapStats, qmax: int) -> np.ndarray:
    """Per channel, c · max|x| / qmax with the clip ratio c of `_RATIOS` that minimises the squared error of
    the sampled rows (c = 1 without rows: 8 bits)."""
    top = np.maximum(stats.absmax, np.float32(1e-8)) / qmax
    rows = stats.samples
    if not len(rows):
        return top.astype(np.float32)
    losses = [np.square(np.clip(np.rint(rows / (c * top)), -qmax - 1, qmax) * (c * top) - rows).sum(axis=0) for c in _RATIOS]
    return (top * _RATIOS[np.argmin(losses, axis=0)]).astype(np.float32)


def cache_concats(graph: ir.Graph) -> list[tuple[ir.Value, ir.Node]]:
    """Every cache output `present.*` with the Concat(past, new) producing it; UnsupportedModelError if
    there is none or one is not such a Concat."""
    caches = [v for v in graph.outputs if v.name.startswith("present.")]
    if not caches:
        raise errors.UnsupportedModelError("the model has no KV-cache outputs (present.*) to quantize")
    for present in caches:
        concat = present.producer()
        if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
            raise errors.UnsupportedModelError(
                f"cache output '{present.name}' is not Concat(past, new): export it with `qcompile export`")
    return [(present, present.producer()) for present in caches]
