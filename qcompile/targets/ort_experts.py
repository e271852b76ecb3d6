"""ONNX Runtime: a mixture-of-experts MLP in the canonical form becomes one com.microsoft.QMoE.

The canonical form routes and computes in the exported graph's own ops: Softmax of the router's logits, TopK,
(renormalised) weights, the chosen experts' blocked DequantizeLinear tables gathered per (token, expert),
SwiGLU, and the weighted sum. ORT's QMoE does all of it in one kernel over the packed integers, dequantizing
only the chosen experts' blocks. What its CPU kernel does (ORT 1.32, checked against numpy):

    fc1 [E, 2I, H/2] uint8   gate and up rows interleaved (swiglu_fusion=1; the CPU refuses 2), u = q + 8 with
                              the first code of a byte in its low bits; scales [E, 2I, H/B] likewise
    fc2 [E, H, I/2] uint8    scales [E, H, I/B]; one block_size B for both
    activation_type=swiglu, activation_alpha=1, activation_beta=0: silu(gate)·up
    router_probs = the router's logits: softmax, top-k and, with normalize_routing_weights=1, renormalised
    weights (Mixtral); without renormalising, the softmax probabilities must come as router_weights too

It fits 4-bit symmetric tables in blocks that divide H and I, and 4- or 8-bit symmetric tables with one scale
per row (no block_size: scales [E, N]; 8 bits: expert_weight_bits=8, u = q + 128, ort-w8a8's experts), SwiGLU
experts from a [gate | up] table, softmax routing. Elsewhere the canonical form stays (it runs in ORT as it is)
and the record says why.
`read_expert_table` reads the packed tables back into the canonical arrays.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qcompile import analysis, errors, scratch
from qcompile.passes import _canonical
from qcompile.passes._canonical import Decoded, _array
from qcompile.passes._result import Result
from qcompile.targets import ort

_RESHAPES = ("Squeeze", "Unsqueeze", "Reshape", "Expand")


class LowerExpertsToQMoE(ir.passes.InPlacePass):
    """y = Σ_{e ∈ topk(softmax(x·R))} w_e · W2_e·(silu(W1g_e·x) ⊙ W1u_e·x), with w the top-k probabilities
    (renormalised where the graph renormalises them) and W the dequantized tables: each MoE block that fits
    (see the module docstring) computes it in one QMoE over the same integers and scales instead of the
    graph's routing, gathers and SwiGLU. Exact in float (2e-7 on the tiny Mixtral at accuracy level 0). The
    record says how many blocks, and why any kept the canonical form. `accuracy_level` as MatMulNBits'."""

    def __init__(self, accuracy_level: int = 4):
        super().__init__()
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> Result:
        lowered, kept = 0, []
        for block in analysis.analyze(model, ort.FORMS).blocks:
            if block.experts is None:
                continue
            try:
                match = _match(block.experts)
            except errors.UnsupportedModelError as e:
                kept.append(f"block {block.index}: {e}")
                continue
            _lower(model, match, self.accuracy_level)
            lowered += 1
        if lowered:
            model.opset_imports.setdefault("com.microsoft", 1)
            RemoveUnusedNodesPass()(model)
        record = {"experts": f"QMoE in {lowered} blocks" + (f"; canonical form kept: {'; '.join(kept)}" if kept else "")}
        return Result(model, modified=bool(lowered), record=record if lowered or kept else {})


def _fail(what: str) -> errors.UnsupportedModelError:
    return errors.UnsupportedModelError(f"{what}, which QMoE cannot express")


def _producer(value: ir.Value) -> ir.Node | None:
    """The producer of `value` past reshapes (their data input)."""
    return analysis.skip_back(value, _RESHAPES).producer()


def _sole_use(value: ir.Value) -> ir.Node | None:
    """The one node reading `value` past reshapes, or None."""
    while len(uses := list(value.uses())) == 1:
        node = uses[0].node
        if node.op_type not in _RESHAPES:
            return node
        value = node.outputs[0]
    return None


def _reaches(value: ir.Value, target: ir.Value) -> bool:
    """Whether `value` is `target` or computed from it by reshapes alone."""
    while value is not target:
        node = value.producer()
        if node is None or node.op_type not in _RESHAPES:
            return False
        value = node.inputs[0]
    return True


def _match(experts: analysis.Experts) -> dict:
    """What QMoE needs from a canonical MoE block, or UnsupportedModelError naming what does not fit."""
    if len(experts.tables) != 2:
        raise _fail(f"{len(experts.tables)} expert tables (expected a fused gate_up table and a down table)")
    up, down = experts.tables
    decoded = [_canonical.read_expert_table(t) for t in (up, down)]
    if any(d is None or d.fp8 or d.bits not in (4, 8) or d.bits != decoded[0].bits or d.zero_point is not None
           for d in decoded):
        raise _fail("expert tables that are not 4- or 8-bit symmetric integers of one width")
    if up.in_axis != 2 or down.in_axis != 2:
        raise _fail("expert tables stored [E, K, N]")
    block = 0 if all(d.scale.shape[-1] == 1 for d in decoded) else decoded[0].block_size  # 0: one scale per row
    if block and (decoded[1].block_size != block or block < 16 or block & (block - 1)):
        raise _fail(f"blocks of {decoded[0].block_size} and {decoded[1].block_size}")
    if block and decoded[0].bits == 8:  # checked on the tiny MoEs: up to 1.2e-3 off the canonical logits; per row 2.4e-7
        raise _fail("8-bit expert tables in blocks (ORT 1.32's CPU kernel does not match them; one scale per row does)")
    # SwiGLU: down's input = Mul(Mul(a, Sigmoid(a)), b) with a, b = Split(up's product) in two halves
    product = _producer(down.input)
    act = next((n for n in (_producer(v) for v in product.inputs) if n is not None and n.op_type == "Mul"), None) \
        if product is not None and product.op_type == "Mul" else None
    split = next((v.producer() for v in act.inputs if v.producer() is not None and v.producer().op_type == "Split"),
                 None) if act is not None else None
    sizes = split.inputs[1].const_value if split is not None and len(split.inputs) > 1 and split.inputs[1] is not None else None
    if (split is None or len(split.outputs) != 2 or _producer(split.inputs[0]) is not up.matmul
            or (sizes is not None and len(set(sizes.numpy().tolist())) != 1)
            or not any(v.producer() is not None and v.producer().op_type == "Sigmoid"
                       and v.producer().inputs[0] is split.outputs[0] for v in act.inputs)
            or split.outputs[0] not in act.inputs or not any(_reaches(v, split.outputs[1]) for v in product.inputs)):
        raise _fail("experts whose activation is not silu(gate)·up of a [gate | up] table")
    # routing: TopK over Softmax(router logits), weights optionally renormalised, then Σ_k weight·expert output
    topk = analysis.backward_first(up.expert_index, lambda n: n.op_type == "TopK")
    softmax = topk.inputs[0].producer() if topk is not None else None
    if softmax is None or softmax.op_type != "Softmax" or softmax.inputs[0] is not experts.router.outputs[0]:
        raise _fail("routing that is not a top-k of the softmax of the router's logits")
    k = topk.inputs[1].const_value
    if k is None or topk.attributes.get_int("largest", 1) != 1:
        raise _fail("a top-k without a constant k")
    weights = topk.outputs[0]
    normalize = any(n.op_type == "Div" and n.inputs[0] is weights and _producer(n.inputs[1]) is not None
                    and _producer(n.inputs[1]).op_type == "ReduceSum" for n in (u.node for u in weights.uses()))
    scaled = _sole_use(down.matmul.outputs[0])
    total = _sole_use(scaled.outputs[0]) if scaled is not None and scaled.op_type == "Mul" else None
    if (total is None or total.op_type != "ReduceSum" or len(total.outputs[0].shape or ()) != 2
            or not any(analysis.backward_first(v, lambda n: n is topk) for v in scaled.inputs)):
        raise _fail("experts' outputs that are not summed with the routing weights into [tokens, hidden]")
    x = experts.router.inputs[0]
    if not _reaches(up.input, x) or len(x.shape or ()) != 2:
        raise _fail("experts that do not read the router's [tokens, hidden] input")
    return dict(experts=experts, decoded=decoded, block=block, k=int(k.numpy().item()), normalize=normalize,
                probs=softmax.outputs[0], output=total.outputs[0], x=x)


def _interleave(a: np.ndarray) -> np.ndarray:
    """[E, 2I, ...] rows [gate | up] → [g0, u0, g1, u1, ...]."""
    e, n = a.shape[:2]
    return np.stack([a[:, : n // 2], a[:, n // 2:]], axis=2).reshape(a.shape)


def _lower(model: ir.Model, m: dict, accuracy_level: int) -> None:
    graph, (up, down) = model.graph, m["decoded"]
    name = m["experts"].tables[0].name.rsplit(".", 1)[0]
    bits, block = up.bits, m["block"]
    offset = 1 << (bits - 1)  # QMoE's default zero point: unsigned codes u = q + 2^(bits-1)

    def scales(scale: np.ndarray) -> np.ndarray:
        return scale if block else scale[..., 0]  # per row: [E, N]

    arrays = {"fc1": ort._pack((_interleave(up.q) + offset).astype(np.uint8), bits), "fc1_scales": scales(_interleave(up.scale)),
              "fc2": ort._pack((down.q + offset).astype(np.uint8), bits), "fc2_scales": scales(down.scale)}
    values = {}
    for key, array in arrays.items():
        value = ir.Value(name=f"{name}.{key}", shape=ir.Shape(array.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=scratch.tensor(array))
        graph.register_initializer(value)
        values[key] = value
    inputs = [m["x"], m["experts"].router.outputs[0], values["fc1"], values["fc1_scales"], None, values["fc2"],
              values["fc2_scales"]]
    if not m["normalize"]:
        inputs += [None] * 7 + [m["probs"]]  # router_weights (input 14): mix with the softmax probabilities
    node = ir.node("QMoE", inputs, domain="com.microsoft", name=f"{name}.qmoe", attributes=dict(
        k=m["k"], normalize_routing_weights=int(m["normalize"]), activation_type="swiglu", swiglu_fusion=1,
        activation_alpha=1.0, activation_beta=0.0, expert_weight_bits=bits, accuracy_level=accuracy_level,
        **({"block_size": block} if block else {})))
    out = node.outputs[0]
    out.name, out.dtype, out.shape = f"{name}.qmoe_output", m["output"].dtype, m["output"].shape
    graph.insert_after(m["output"].producer(), node)
    ir.convenience.replace_all_uses_with(m["output"], out)


def read_expert_table(table: analysis.ExpertTable) -> Decoded | None:
    """An expert table's integers and scales in the canonical layout, from QMoE's packed inputs or the
    canonical form."""
    node = table.reader
    if node.op_type != "QMoE":
        return _canonical.read_expert_table(table)
    bits, block = node.attributes.get_int("expert_weight_bits", 4), node.attributes.get_int("block_size", 0)
    packed, scale = _array(node.inputs[table.index]), _array(node.inputs[table.index + 1]).astype(np.float32)
    q = ort._unpack(packed, bits).astype(np.int16) - (1 << (bits - 1))
    scale = scale.reshape(*scale.shape[:2], -1)  # per row: one block spanning K, as the canonical form stores it
    if table.index == 2:  # fc1: gate and up rows interleaved
        q, scale = (np.concatenate([a[:, 0::2], a[:, 1::2]], axis=1) for a in (q, scale))
    return Decoded(q, scale, None, bits, block or q.shape[2], node.inputs[table.index].name)
