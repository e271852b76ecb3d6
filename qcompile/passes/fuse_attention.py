"""FuseGroupQueryAttention: each block's decomposed attention becomes one com.microsoft.GroupQueryAttention."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, custom_ops, errors
from qcompile.passes._canonical import _initializer
from qcompile.passes._result import Result


class FuseGroupQueryAttention(ir.passes.InPlacePass):
    """softmax(scale·q·kᵀ + causal mask)·v with the cache Concat(past, new) → GroupQueryAttention.

    Where the queries and keys are the projections' outputs with only RoPE (rotate-half form, over whole heads or
    their first r channels where r is a multiple of 16: ORT's cos/sin caches take multiples of 8 columns) applied,
    GQA takes the projections' outputs and applies RoPE itself (do_rotary=1, from cos/sin caches of
    `max_positions` rows computed by the graph's own rotary subgraph), so the per-head reshapes,
    transposes and rotary ops go. Otherwise (QuaRot's query/key Hadamard, or `max_positions` None) it is
    fed exactly the tensors the decomposed graph attends with: the queries as they enter the scores MatMul
    and the new keys and values as they enter the cache Concat (do_rotary=0). A QuantizeKVCache quantizer
    on the new keys and values becomes GQA's own quantized cache (kv_cache_bit_width, PER_CHANNEL scales):
    the past/present tensors turn int8, or uint8 holding two 4-bit values, and GQA quantizes what it
    appends exactly as the quantizer did. Its scale is the product of the constant factors on the query,
    key and score paths. Scores capped as c·tanh(f·q·kᵀ) (Gemma 2) become GQA's softcap=c with scale=f·c (GQA
    computes c·tanh(scale·q·kᵀ / c)); a block the export records with a sliding window w (each query sees its
    last w positions, itself included) gets local_window_size=w, which GQA masks alike.
    The cache keeps qcompile's layout, [batch, kv_heads, total, head_dim], growing by concatenation. The
    mask becomes GQA's `seqlens_k` (attention_mask sum − 1) and `total_sequence_length`, and with
    do_rotary=1 the positions follow from them (position_ids stays an input but is unused): the same as
    the export for unpadded batches, which is what qcompile's evaluation and generation feed; left-padded
    batches would need position_ids and a padding mask that GQA does not take. ORT's GQA also refuses a
    multi-token step after a non-empty cache for batches over 1 (batch 1 chunked prefill works).
    """

    def __init__(self, max_positions: int | None = None, strict: bool = True):
        super().__init__()
        self.max_positions = max_positions
        self.strict = strict  # False: a block whose attention does not match stays unfused (the result says why)

    def call(self, model: ir.Model) -> Result:
        graph = model.graph
        blocks = analysis.analyze(model).blocks
        mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
        if mask is None:
            raise errors.UnsupportedModelError("the model has no attention_mask input to fuse attention with: "
                                               "export it with `qcompile export`")
        seqlens, total = _sequence_lengths(graph, mask)
        caches: dict = {}
        unfused: dict[int, str] = {}  # block → why it was left unfused
        for block in blocks:
            try:
                _fuse_block(model, block, seqlens, total, caches, self.max_positions)
            except errors.UnsupportedModelError as e:  # raised while matching, before the block is changed
                if self.strict:
                    raise
                unfused[block.index] = str(e)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        fused = len(blocks) - len(unfused)
        if fused:
            model.opset_imports.setdefault("com.microsoft", 1)
        return Result(model, modified=bool(fused), record={"fused_attention": _describe(unfused)})


def _describe(unfused: dict[int, str]) -> str:
    """For the manifest: how many blocks were fused, and why any were not."""
    if not unfused:
        return "all blocks"
    block, why = next(iter(unfused.items()))
    return f"{len(unfused)} blocks left unfused (block {block}: {why})"


def _fuse_block(model: ir.Model, block: analysis.Block, seqlens: ir.Value, total: ir.Value, caches: dict,
                max_positions: int | None) -> None:
    graph = model.graph
    fail = lambda what: errors.UnsupportedModelError(f"block {block.index}: cannot fuse attention: {what}")  # noqa: E731
    attention = block.attention
    if attention is None:
        raise fail("no decomposed attention (softmax of q·kᵀ)")
    if attention.context is None:
        raise fail("no probabilities·V MatMul after the softmax")
    if attention.key_cache is None or attention.value_cache is None:
        raise errors.UnsupportedModelError(analysis.NO_KV_CACHE)
    scores, key_concat, value_concat = attention.scores, attention.key_cache, attention.value_cache
    query, key, value = scores.inputs[0], key_concat.inputs[1], value_concat.inputs[1]
    quantizers = [_cache_quantizer(v) for v in (key, value)]
    if quantizers[0] is not None or quantizers[1] is not None:
        if quantizers[0] is None or quantizers[1] is None or _bits(quantizers[0]) != _bits(quantizers[1]):
            raise fail("its keys and values are not quantized alike for the cache")
        key, value = quantizers[0].inputs[0], quantizers[1].inputs[0]
    head_dim = analysis.Attention.head_size(key_concat)
    if attention.heads is None or head_dim is None:
        raise fail("the query/key/value head counts and head size are not static [batch, heads, seq, head_dim]")
    (heads, kv_heads), scale, softcap = attention.heads, attention.scale, attention.softcap
    if scale is None:
        raise fail("the scores are not q·kᵀ times constants (plus a mask, under an optional softcap)")
    attention_out = attention.merged_output(block.linears[analysis.Role.O].node.inputs[0])
    if attention_out is None:
        raise fail("o_proj's input is not the attention context with its heads merged")

    prefix = f"blocks.{block.index}.attention"
    rope = attention.rotary if max_positions else None
    if rope is not None and rope.dims is not None and rope.dims % 16:  # GQA's partial RoPE: cos/sin of 8k columns
        rope = None
    packed = [_merged_heads(v) for v in (rope.query, rope.key, value)] if rope is not None else None
    if packed is not None and None not in packed:  # GQA takes the projections' outputs and applies RoPE itself
        if (rope.cos, rope.sin) not in caches:
            caches[rope.cos, rope.sin] = _rope_caches(model, rope.cos, rope.sin, max_positions, len(caches))
        scale *= rope.query_factor
        extra, do_rotary = caches[rope.cos, rope.sin], 1
    else:
        packed = [_pack_heads(graph, v, scores, f"{prefix}.{name}") for v, name in ((query, "query"), (key, "key"), (value, "value"))]
        extra, do_rotary = (), 0
    inputs = [*packed, key_concat.inputs[0], value_concat.inputs[0], seqlens, total, *extra]
    attributes = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(scale), "do_rotary": do_rotary}
    if block.sliding_window:  # the export masks all but the last `window` positions; so does GQA's local window
        attributes["local_window_size"] = block.sliding_window
    if softcap:  # GQA: c·tanh(q·kᵀ·scale / c), so its scale carries the c the graph divides by
        attributes.update(softcap=float(softcap), scale=float(scale * softcap))
    cache_type, cache_dim = None, head_dim
    if quantizers[0] is not None:  # GQA quantizes what it appends, after its own RoPE: the reference's order
        bits = _bits(quantizers[0])
        inputs += [None] * (12 - len(inputs)) + [quantizers[0].inputs[1], quantizers[1].inputs[1]]
        attributes.update(kv_cache_bit_width=bits, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
        cache_type, cache_dim = (ir.DataType.INT8, head_dim) if bits == 8 else (ir.DataType.UINT8, head_dim // 2)
    gqa = ir.node("GroupQueryAttention", inputs, attributes=attributes, domain="com.microsoft", num_outputs=3,
                  name=f"{prefix}.gqa")
    graph.insert_before(scores, gqa)
    gqa.outputs[0].name = f"{prefix}.output"
    attention_out.replace_all_uses_with(gqa.outputs[0])
    for concat, out in ((key_concat, gqa.outputs[1]), (value_concat, gqa.outputs[2])):
        present = concat.outputs[0]
        name, index = present.name, graph.outputs.index(present)
        present.name = f"{name}.unfused"
        out.name, out.dtype, out.shape = name, present.dtype, present.shape
        graph.outputs[index] = out
        if cache_type is not None:  # the cache is stored quantized (4-bit: two values a byte, low nibble first)
            past = concat.inputs[0]
            for v in (past, out):
                v.dtype, v.shape = cache_type, ir.Shape([*v.shape[:3], cache_dim])
    gqa.outputs[0].dtype = attention_out.dtype
    gqa.outputs[0].shape = ir.Shape([query.shape[0], query.shape[2], heads * head_dim])


def _cache_quantizer(value: ir.Value) -> ir.Node | None:
    """The `qcompile.QuantizeDequantizeStatic` (QuantizeKVCache) producing `value`, if one does."""
    node = value.producer()
    return node if node is not None and (node.domain, node.op_type) == (custom_ops.DOMAIN, custom_ops.STATIC) else None


def _bits(quantizer: ir.Node) -> int:
    """The cache width of a quantizer with qmax = 2^(bits−1) − 1."""
    return int(quantizer.attributes.get_float("qmax", 127.0)).bit_length() + 1


def _sequence_lengths(graph: ir.Graph, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
    """GQA's seqlens_k (int32 [batch], valid tokens − 1) and total_sequence_length (int32 scalar)."""
    one = _constant(graph, "attention.one", np.array(1, np.int64))
    axis = _constant(graph, "attention.axis_1", np.array([1], np.int64))
    nodes = [
        ir.node("ReduceSum", [mask, axis], attributes={"keepdims": 0}, name="attention.valid_tokens"),
    ]
    nodes.append(ir.node("Sub", [nodes[-1].outputs[0], one], name="attention.last_index"))
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": ir.DataType.INT32}, name="attention.seqlens_k"))
    nodes.append(ir.node("Shape", [mask], attributes={"start": 1, "end": 2}, name="attention.mask_length"))
    nodes.append(ir.node("Squeeze", [nodes[-1].outputs[0]], name="attention.total_length"))
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": ir.DataType.INT32},
                         name="attention.total_sequence_length"))
    graph.insert_before(graph[0], nodes)
    return nodes[2].outputs[0], nodes[-1].outputs[0]


def _merged_heads(value: ir.Value) -> ir.Value | None:
    """x when value = Transpose(Reshape(x, [batch, seq, heads, head_dim]), perm 0,2,1,3) and x is rank 3."""
    transpose = value.producer()
    if transpose is None or transpose.op_type != "Transpose" or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = transpose.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    x = reshape.inputs[0]
    return x if x.shape is not None and len(x.shape) == 3 else None


def _rope_caches(model: ir.Model, cos: ir.Value, sin: ir.Value, max_positions: int, index: int) -> tuple[ir.Value, ir.Value]:
    """GQA's cos/sin caches [max_positions, head_dim/2]: the graph's own cos/sin for positions 0..max−1."""
    from qcompile import calibration

    with calibration.tapped_session(model, [cos, sin]) as decoder:
        ids = np.zeros((1, max_positions), np.int64)
        tables = decoder.session.run([cos.name, sin.name], decoder.feeds(ids, decoder.empty_cache(), 0))
    out = []
    for name, table in zip(("cos", "sin"), tables):
        table = table.reshape(max_positions, -1)
        half = table.shape[1] // 2
        if not np.array_equal(table[:, :half], table[:, half:]):
            raise errors.UnsupportedModelError(f"the rotary {name} table is not two equal halves (rotate-half RoPE)")
        out.append(_initializer(model.graph, f"attention.rope.{index}.{name}_cache", np.ascontiguousarray(table[:, :half])))
    return tuple(out)


def _pack_heads(graph: ir.Graph, value: ir.Value, before: ir.Node, name: str) -> ir.Value:
    """[batch, heads, seq, head_dim] → [batch, seq, heads·head_dim] (GQA's packed layout)."""
    shape = _constant(graph, "attention.packed_shape", np.array([0, 0, -1], np.int64))
    transpose = ir.node("Transpose", [value], attributes={"perm": [0, 2, 1, 3]}, name=f"{name}.transpose")
    reshape = ir.node("Reshape", [transpose.outputs[0], shape], name=f"{name}.pack")
    graph.insert_before(before, [transpose, reshape])
    return reshape.outputs[0]


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The shared initializer `name` (made on first use)."""
    return graph.initializers[name] if name in graph.initializers else _initializer(graph, name, array)
