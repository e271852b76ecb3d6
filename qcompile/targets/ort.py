"""ONNX Runtime targets: canonical blocked DequantizeLinear → MatMul becomes com.microsoft.MatMulNBits.

MatMulNBits (ORT contrib op) stores the same integers and scales in its own layout:

    B      uint8 [N, ceil(K/bs), bs*bits/8]   W[k, n] in block k//bs at j = k%bs; b-bit: byte j//(8/b),
                                             the first code in the lowest bits; the last block is padded
    scales float [N, ceil(K/bs)]
    zero_points uint8 [N, ceil(ceil(K/bs)*bits/8)] packed the same way (asymmetric); absent for
           symmetric weights, whose unsigned codes are q + 2^(bits-1) (ORT's default zero point)

and dequantizes (u - zp) * scale, which equals the canonical (q - zp) * scale bit for bit. A
per-channel weight (DequantizeLinear axis=1, scale [N]) is stored in blocks of 128 with its scale repeated.

W8A8: with accuracy_level 4, MatMulNBits quantizes its input to int8 itself, per token and block of K
(symmetric, max|x| / 127 per block): at least as fine as the canonical per-token quantizer, which is
therefore dropped in front of the linears it feeds. Measured against DynamicQuantizeMatMul and
MatMulIntegerToFloat in benchmarks/bench_w8a8_spellings.py.

A tied embedding table whose integers and scales are lm_head's (transposed, see QuantizeEmbedding's
`shared`) is stored once: GatherBlockQuantized reads lm_head's B reshaped to [V, H*bits/8] as uint8
codes with ORT's default zero point, which are the same bytes (`_share_embedding_tables`).

`FORMS` tells `analysis` what these ops (and the fused norms, GroupQueryAttention and QMoE that the other ORT
lowering passes write) stand for; `read_weight` and `read_embedding` read the weights back into the canonical
arrays (`Decoded`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewritePass, RewriteRuleClassBase

from qcompile import analysis, custom_ops, scratch
from qcompile.analysis import Linear
from qcompile.passes import _canonical
from qcompile.passes._canonical import _INT_TYPES, Decoded, _array

PER_CHANNEL_BLOCK = 128  # MatMulNBits block for per-channel weights (the scale repeats in every block)


def _lowered_linear(node: ir.Node) -> tuple[int, int, str] | None:
    """A MatMulNBits: K, N and how it stores the weight."""
    if (node.domain, node.op_type) != ("com.microsoft", "MatMulNBits"):
        return None
    a = node.attributes
    return (a["K"].as_int(), a["N"].as_int(),
            f"MatMulNBits {a['bits'].as_int()}-bit block {a['block_size'].as_int()} acc{a.get_int('accuracy_level', 0)}")


def _packed_qkv_heads(node: ir.Node) -> tuple[int, int] | None:
    """A GroupQueryAttention reading q | k | v packed at input 0 (`PackQKV`): its query and key/value heads."""
    if node.op_type != "GroupQueryAttention" or any(v is not None for v in node.inputs[1:3]):
        return None
    return node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")


def _moe_tables(node: ir.Node) -> tuple[ir.Value, tuple[int, ...], int] | None:
    """A QMoE (`ort_experts`): the router's logits, fc1 (gate and up) at input 2 and fc2 (down) at 5, two 4-bit
    codes or one 8-bit code per byte."""
    if (node.domain, node.op_type) != ("com.microsoft", "QMoE"):
        return None
    return node.inputs[1], (2, 5), 8 // node.attributes.get_int("expert_weight_bits", 4)


FORMS = analysis.LoweredForms(
    domain="com.microsoft",
    linear=_lowered_linear,
    norms={"SimplifiedLayerNormalization": "rms", "SkipSimplifiedLayerNormalization": "rms"},  # `FuseNormalizations`
    skip_norms=frozenset({"SkipSimplifiedLayerNormalization"}),
    attention=frozenset({"GroupQueryAttention"}),
    packed_qkv=_packed_qkv_heads,
    experts=_moe_tables,
    embeddings=frozenset({"GatherBlockQuantized"}),
)


def pack_matmul_nbits(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, bits: int, block_size: int):
    """Canonical q [K, N] (signed when zero_point is None), scale/zero_point [G, N] → (B, scales, zero_points)."""
    k, n = q.shape
    groups = scale.shape[0]
    offset = 2 ** (bits - 1) if zero_point is None else 0
    codes = np.full((n, groups * block_size), offset, dtype=np.uint8)  # pad with the zero point's code
    codes[:, :k] = (q.astype(np.int16) + offset).astype(np.uint8).T
    packed = _pack(codes.reshape(n, groups, block_size), bits)
    zp = None
    if zero_point is not None:
        zp = zero_point.astype(np.uint8).T  # [N, G]
        per_byte = 8 // bits
        zp = _pack(np.concatenate([zp, np.zeros((n, -groups % per_byte), np.uint8)], axis=1), bits)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scale.T.astype(np.float32)), zp


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit codes along the last axis, 8/bits per byte, the first in the lowest bits."""
    per_byte = 8 // bits
    packed = np.zeros((*codes.shape[:-1], codes.shape[-1] // per_byte), np.uint8)
    for i in range(per_byte):
        packed |= codes[..., i::per_byte] << (bits * i)
    return packed


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `_pack`: [..., M] bytes → [..., M * 8/bits] codes."""
    mask = (1 << bits) - 1
    return np.stack([(packed >> (bits * i)) & mask for i in range(8 // bits)], axis=-1).reshape(*packed.shape[:-1], -1)


def decode_matmul_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, bits: int,
                        block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The inverse of `pack_matmul_nbits`: MatMulNBits B [N, G, bs*bits/8], scales and zero points (any shape
    holding [N, G]) → canonical q [K, N] int16 (signed when there is no zero point), scale [G, N] float32 and
    zero_point [G, N] int16 or None."""
    n, groups = b.shape[:2]
    codes = _unpack(b, bits).reshape(n, groups * block_size)[:, :k].T.astype(np.int16)  # [K, N]
    scale = scales.reshape(n, groups).T.astype(np.float32)
    if zero_points is None:
        return codes - 2 ** (bits - 1), scale, None
    return codes, scale, _unpack(zero_points, bits).reshape(n, -1)[:, :groups].T.astype(np.int16)


def read_weight(linear: Linear) -> Decoded | None:
    """`linear`'s integers and scales in canonical layout, from MatMulNBits (one packed q/k/v node's columns
    for `linear.columns`) or the canonical form; None for a float weight."""
    node = linear.node
    if node.op_type != "MatMulNBits":
        return _canonical.read_weight(linear)
    a = node.attributes
    k, bits, block = (a[name].as_int() for name in ("K", "bits", "block_size"))
    zp = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] is not None else None
    q, scale, zp = decode_matmul_nbits(*(_array(v) for v in node.inputs[1:3]), None if zp is None else _array(zp),
                                       k, bits, block)
    if linear.columns is not None:  # one of a packed node's linears: its columns
        cols = slice(*linear.columns)
        q, scale, zp = q[:, cols], scale[:, cols], None if zp is None else zp[:, cols]
    return Decoded(q, scale, zp, bits, block, node.inputs[1].name).one_block_if_uniform()


def read_embedding(gather: ir.Node) -> Decoded | None:
    """A quantized embedding table's integers [V, H] and scales [V, G], from GatherBlockQuantized (uint8 codes
    are q + 128) or the canonical form; None for a float table."""
    if gather.op_type != "GatherBlockQuantized":
        return _canonical.read_embedding(gather)
    a = gather.attributes
    bits = a["bits"].as_int()
    data = _array(gather.inputs[0] if gather.inputs[0].const_value is not None else gather.inputs[0].producer().inputs[0])
    if data.dtype == np.uint8 and bits == 4:  # a MatMulNBits B read as the table (shared): two codes per byte
        data = np.stack([data & 0x0F, data >> 4], axis=-1)
    q = data.reshape(data.shape[0], -1).astype(np.int16) - (2 ** (bits - 1) if data.dtype == np.uint8 else 0)
    return Decoded(q, _array(gather.inputs[2]).astype(np.float32), None, bits, a["block_size"].as_int(),
                   gather.inputs[0].name)


class _DequantizeMatMulToNBits(RewriteRuleClassBase):
    """MatMul(x, DequantizeLinear(q, scale[, zp], axis=0, block_size)) → MatMulNBits(x, B, scales[, zp])."""

    def __init__(self, accuracy_level: int):
        super().__init__(name="DequantizeMatMulToNBits")
        self.accuracy_level = accuracy_level

    def pattern(self, op, x, q, scale):
        return op.MatMul(x, op.DequantizeLinear(q, scale, _allow_other_inputs=True, _outputs=["w"]))

    def check(self, context, x, q, scale, w, **_):
        result = MatchResult()
        dq = w.producer()
        if q.const_value is None or scale.const_value is None or len(q.shape or ()) != 2:
            return result.fail("weight or scale is not a constant 2-D tensor", q)
        if q.dtype not in _INT_TYPES:
            return result.fail(f"weight type {q.dtype} has no MatMulNBits form", q)
        block = dq.attributes.get_int("block_size", 0)
        if block == 0:
            if dq.attributes.get_int("axis", 1) != 1 or scale.const_value.numpy().shape != (q.shape[1],):
                return result.fail("per-channel scale is not [N] along the output axis", dq)
        elif dq.attributes.get_int("axis", 1) != 0:
            return result.fail("not blocked along K (axis 0)", dq)
        elif block < 16 or block & (block - 1):
            return result.fail(f"block size {block} is not a power of two >= 16", dq)
        zp = dq.inputs[2] if len(dq.inputs) > 2 else None
        if zp is not None and zp.const_value is None:
            return result.fail("zero point is not constant", zp)
        signed = _INT_TYPES[q.dtype][1]
        if signed and zp is not None and np.any(zp.const_value.numpy()):
            return result.fail("signed weights with a non-zero zero point", zp)
        return result

    def rewrite(self, op, x, q, scale, w, **_):
        dq = w.producer()
        bits, signed = _INT_TYPES[q.dtype]
        block = dq.attributes.get_int("block_size", 0)
        zp = dq.inputs[2] if len(dq.inputs) > 2 and not signed else None
        k, n = q.shape
        scales, zps = scale.const_value.numpy(), zp.const_value.numpy() if zp is not None else None
        if block == 0:  # per channel: the same scale in every block
            block = PER_CHANNEL_BLOCK
            groups = -(-k // block)
            scales = np.repeat(scales[None], groups, axis=0)
            zps = None if zps is None else np.repeat(zps[None], groups, axis=0)
        b, scales, zps = pack_matmul_nbits(q.const_value.numpy(), scales, zps, bits, block)
        base = q.name.removesuffix("_q")
        inputs = [op.initializer(scratch.tensor(b, f"{base}_nbits_B")), op.initializer(scratch.tensor(scales, f"{base}_nbits_scales"))]
        if zps is not None:
            inputs.append(op.initializer(scratch.tensor(zps, f"{base}_nbits_zero_points")))
        return op.MatMulNBits(
            x, *inputs, _domain="com.microsoft",
            K=int(k), N=int(n), bits=bits, block_size=block, accuracy_level=self.accuracy_level,
        )


class _DequantizeGatherToBlockQuantized(RewriteRuleClassBase):
    """Gather(DequantizeLinear(q [V, H], scale [V, G], axis=1, block_size), ids) → GatherBlockQuantized.

    INT4 tables stay INT4 (no zero point); INT8 tables become uint8 codes q + 128, ORT's default zero point.
    """

    def __init__(self):
        super().__init__(name="DequantizeGatherToBlockQuantized")

    def pattern(self, op, q, scale, ids):
        return op.Gather(op.DequantizeLinear(q, scale, _outputs=["table"]), ids, _allow_other_attributes=True)

    def check(self, context, q, scale, ids, table, **_):
        result = MatchResult()
        dq = table.producer()
        if q.const_value is None or scale.const_value is None or not _INT_TYPES.get(q.dtype, (0, False))[1]:
            return result.fail("not a constant signed 4/8-bit table", q)
        if dq.attributes.get_int("axis", 1) != 1 or len(q.shape or ()) != 2:
            return result.fail("not a [V, H] table blocked along H", dq)
        block = dq.attributes.get_int("block_size", 0)
        if block < 16 or block & (block - 1):
            return result.fail(f"block size {block} is not a power of two >= 16", dq)
        return result

    def rewrite(self, op, q, scale, ids, table, **_):
        dq = table.producer()
        bits = _INT_TYPES[q.dtype][0]
        data = q
        if bits == 8:
            codes = (q.const_value.numpy().astype(np.int16) + 128).astype(np.uint8)
            data = op.initializer(scratch.tensor(codes, f"{q.name.removesuffix('_q')}_gbq_data"))
        return op.GatherBlockQuantized(
            data, ids, scale, _domain="com.microsoft",
            gather_axis=0, quantize_axis=1, block_size=dq.attributes.get_int("block_size", 0), bits=bits,
        )


class LowerToMatMulNBits(ir.passes.InPlacePass):
    """Rewrite every canonical quantized linear into com.microsoft.MatMulNBits (and a quantized embedding
    table into com.microsoft.GatherBlockQuantized).

    Preserves every dequantized weight bit for bit (same integers, same float32 scales); the output
    changes only by the kernel's accumulation order, and by int8 activations when accuracy_level=4.
    """

    def __init__(self, accuracy_level: int = 4):
        super().__init__()
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        dropped = self._drop_per_token_quantizers(model) if self.accuracy_level == 4 else False
        result = RewritePass([_DequantizeMatMulToNBits.rule(self.accuracy_level),
                              _DequantizeGatherToBlockQuantized.rule()])(model)
        if result.modified:
            model.opset_imports.setdefault("com.microsoft", 1)
        shared = _share_embedding_tables(model.graph)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, result.modified or dropped or shared)

    @staticmethod
    def _drop_per_token_quantizers(model: ir.Model) -> bool:
        """Remove unclipped int8 per-token quantizers that feed only integer-weight linears (MatMulNBits at
        accuracy_level 4 quantizes those inputs itself)."""
        graph = model.graph
        dropped = False
        for node in list(graph):
            if (node.domain, node.op_type) != (custom_ops.DOMAIN, custom_ops.PER_TOKEN):
                continue
            if (node.attributes.get_float("qmax", 127.0), node.attributes.get_float("clip", 1.0)) != (127.0, 1.0) or not all(
                    _integer_linear(use.node) and use.idx == 0 for use in node.outputs[0].uses()):
                continue
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)
            dropped = True
        if not any(n.domain == custom_ops.DOMAIN for n in graph):
            model.functions.pop((custom_ops.DOMAIN, custom_ops.PER_TOKEN, ""), None)
            model.opset_imports.pop(custom_ops.DOMAIN, None)
        return dropped


def _share_embedding_tables(graph: ir.Graph) -> bool:
    """Make each GatherBlockQuantized whose table a MatMulNBits already stores (same integers, scales and
    blocks, no zero points, whole blocks) read that B through a Reshape to [V, H*bits/8]; its own table goes."""
    linears = [n for n in graph if n.op_type == "MatMulNBits" and len(n.inputs) == 3]
    shared = False
    for gather in [n for n in graph if n.op_type == "GatherBlockQuantized" and n.inputs[0].const_value is not None]:
        table = read_embedding(gather)
        v, h = table.q.shape
        for linear in linears:
            a = linear.attributes
            k, n, bits, block = (a[name].as_int() for name in ("K", "N", "bits", "block_size"))
            if (n, k, bits, block) != (v, h, table.bits, table.block_size) or k % block:
                continue
            b, scales = linear.inputs[1], linear.inputs[2]
            q, scale, _ = decode_matmul_nbits(_array(b), _array(scales), None, k, bits, block)
            if np.array_equal(q.T, table.q) and np.array_equal(scale.T, table.scale):
                shape = _canonical._initializer(graph, f"{b.name}_as_table_shape", np.array([v, h * bits // 8], np.int64))
                reshape = ir.node("Reshape", [b, shape], name=f"{b.name}_as_table")
                graph.insert_before(gather, reshape)
                gather.replace_input_with(0, reshape.outputs[0])
                gather.replace_input_with(2, scales)
                shared = True
                break
    return shared


class FuseNormalizations(ir.passes.InPlacePass):
    """x/√(mean(x²)+ε)·γ → com.microsoft.SimplifiedLayerNormalization, and s = x + r followed by that norm
    of s → SkipSimplifiedLayerNormalization (normed s, and s itself for the residual stream): the same
    float computation in one kernel instead of six (onnxscript's ORT fusion rules). The fused nodes' mean
    and inverse-std outputs, which nothing reads, are dropped: the kernel then does not write them."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.rewriter.ort_fusions import rms_normalization, skip_normalization

        count = rms_normalization.fuse_rms_normalization(model)
        count += skip_normalization.fuse_skip_rms_normalization(model)
        if count:
            model.opset_imports.setdefault("com.microsoft", 1)
        for node in model.graph:
            if node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
                for value in node.outputs[1:3]:
                    if not value.uses() and not value.is_graph_output():
                        value.name = ""  # an omitted optional output
        return ir.passes.PassResult(model, modified=bool(count))


class PackQKV(ir.passes.InPlacePass):
    """The q, k and v MatMulNBits of one input that feed a GroupQueryAttention become one MatMulNBits over
    the three weights stacked along N, feeding the attention's packed-QKV input: one pass over the block's
    input and one kernel launch instead of three (onnxruntime-genai's builder does the same). Exact: every
    output column is computed from the same integers, scales and input as before. `analysis` reads the
    packed node back as three linears (`Linear.columns`, through `FORMS`)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        packed = [_pack_qkv(model.graph, node) for node in list(model.graph) if node.op_type == "GroupQueryAttention"]
        return ir.passes.PassResult(model, modified=any(packed))


def _pack_qkv(graph: ir.Graph, attention: ir.Node) -> bool:
    """Pack `attention`'s q, k, v projections when all three are MatMulNBits of one input (`_stack`)."""
    projections = [value.producer() if value is not None else None for value in attention.inputs[:3]]
    if not all(p is not None and p.op_type == "MatMulNBits" and len(p.outputs[0].uses()) == 1 for p in projections):
        return False
    node = _stack(graph, projections, "qkv")
    if node is None:
        return False
    for index, value in enumerate((node.outputs[0], None, None)):
        attention.replace_input_with(index, value)
    _remove(graph, projections)
    return True


class PackGateUp(ir.passes.InPlacePass):
    """x·[W_gate | W_up], split after N_gate columns, = (x·W_gate, x·W_up): a gated MLP's gate and up
    MatMulNBits (one input, one format) become one MatMulNBits over the two weights stacked along N, cut back
    by a Split; one pass over the input and one kernel launch instead of two. Exact, as PackQKV. On SmolLM2's
    default ort-int4, decode 4.82 → 4.39 ms/token after a 128-token prompt, 7.45 → 7.15 after 1024 (one run,
    best of 3; logits identical). `analysis` reads it back (through `FORMS`) as a fused gate_up projection
    with the two column ranges, as an exported fused gate_up_proj."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for block in analysis.analyze(model, FORMS).blocks:
            pair = [block.linears.get(role) for role in (analysis.Role.GATE, analysis.Role.UP)]
            if not all(lin is not None and lin.node.op_type == "MatMulNBits" and lin.columns is None for lin in pair):
                continue
            nodes = [lin.node for lin in pair]
            node = _stack(model.graph, nodes, "gate_up")
            if node is None:
                continue
            sizes = [n.attributes.get_int("N") for n in nodes]
            split_sizes = ir.Value(name=f"{node.name}_sizes", const_value=ir.tensor(np.array(sizes, np.int64)))
            split_sizes.shape, split_sizes.dtype = ir.Shape([2]), ir.DataType.INT64
            model.graph.register_initializer(split_sizes)
            split = ir.node("Split", [node.outputs[0], split_sizes], attributes={"axis": -1}, num_outputs=2,
                            name=f"{node.name}_split")
            model.graph.insert_after(node, split)
            for old, new in zip(nodes, split.outputs):
                new.name, new.dtype = f"{old.outputs[0].name}_part", old.outputs[0].dtype
                ir.convenience.replace_all_uses_with(old.outputs[0], new)
            _remove(model.graph, nodes)
            count += 1
        return ir.passes.PassResult(model, modified=bool(count))


def _stack(graph: ir.Graph, nodes: list[ir.Node], suffix: str) -> ir.Node | None:
    """One MatMulNBits over `nodes`' weights stacked along N (B, scales and zero points, if any, concatenate;
    no g_idx or bias), inserted before the first; None unless all read one input in the same format."""
    first = nodes[0]
    attrs = lambda n: {a: n.attributes.get_int(a) for a in ("K", "bits", "block_size", "accuracy_level")}  # noqa: E731
    if not (all(n.inputs[0] is first.inputs[0] and attrs(n) == attrs(first) and len(n.inputs) == len(first.inputs)
                for n in nodes) and len(first.inputs) in (3, 4)
            and all(x is not None and x.const_value is not None for n in nodes for x in n.inputs[1:])):
        return None
    stacked = []
    for index, name in zip(range(1, len(first.inputs)), ("B", "scales", "zero_points")):
        array = np.concatenate([n.inputs[index].const_value.numpy() for n in nodes])
        value = ir.Value(name=f"{first.name}_{suffix}_{name}", shape=ir.Shape(array.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=scratch.tensor(array))
        graph.register_initializer(value)
        stacked.append(value)
    node = ir.node("MatMulNBits", [first.inputs[0], *stacked], domain="com.microsoft", name=f"{first.name}_{suffix}",
                   attributes={**attrs(first), "N": sum(n.attributes.get_int("N") for n in nodes)})
    out, shape = node.outputs[0], first.outputs[0].shape
    out.name, out.dtype = f"{first.name}_{suffix}_output", first.outputs[0].dtype
    if shape is not None:
        out.shape = ir.Shape([*shape[:-1], node.attributes.get_int("N")])
    graph.insert_before(first, [node])
    return node


def _remove(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Remove `nodes` (no longer read) and the initializers only they read."""
    for n in nodes:
        stale = n.inputs[1:]
        graph.remove(n, safe=True)
        for value in stale:
            if value is not None and not value.uses() and value.name in graph.initializers:
                del graph.initializers[value.name]


def _integer_linear(node: ir.Node) -> bool:
    dq = node.inputs[1].producer() if node.op_type == "MatMul" and len(node.inputs) > 1 else None
    return dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs[0].dtype in _INT_TYPES
