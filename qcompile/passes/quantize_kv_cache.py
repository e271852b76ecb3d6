"""QuantizeKVCache: the keys and values a step appends to the KV cache, fake-quantized per token and head."""

from __future__ import annotations

import onnx_ir as ir

from qcompile import custom_ops, errors


class QuantizeKVCache(ir.passes.InPlacePass):
    """Every cache output `present.*` = Concat(past, new) gets `new` through
    `qcompile.QuantizeDequantizeAsymmetric` (`bits`, asymmetric, one scale and zero point per token and
    head: group = head_dim), so the cache holds — and attention reads — only quantized keys and values,
    as a runtime with a quantized KV cache would. The numerical reference of a 4- or 8-bit cache.
    """

    def __init__(self, bits: int):
        super().__init__()
        if bits not in (4, 8):
            raise errors.InputError(f"KV-cache bits={bits} is not supported: use 4 or 8")
        self.bits = bits

    def requires(self, model: ir.Model) -> None:
        cache_concats(model.graph)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        caches = cache_concats(graph)
        for present, concat in caches:
            node = custom_ops.asymmetric_node(concat.inputs[1], self.bits, f"{present.name}.kv{self.bits}")
            graph.insert_before(concat, node)
            concat.replace_input_with(1, node.outputs[0])
        custom_ops.register(model, custom_ops.ASYMMETRIC)
        return ir.passes.PassResult(model, modified=bool(caches))


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
                f"cache output '{present.name}' is not Concat(past, new): export the model with `qcompile export`")
    return [(present, present.producer()) for present in caches]
