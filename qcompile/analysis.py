"""Find the transformer structure of an exported causal LM: the one place that knows the graph's shape.

`analyze(model)` returns a `ModelMap`: the embedding, each block's norms and linears with their roles
(q, k, v, o, gate, up, down), the residual adds, the final norm and lm_head. Roles come from structure,
never from tensor names (the exporter names weights `val_76`):

    norm ──┬─ MatMul(q) ─ ... ─┐                 norm ──┬─ MatMul(gate) ─ act ─┐
           ├─ MatMul(k) ─ ... ─┴─ MatMul(scores)        └─ MatMul(up) ─────────┴─ Mul ─ MatMul(down)
           └─ MatMul(v) ─ ... ─── MatMul(context, input 1) ─ ... ─ MatMul(o) ─ Add(residual)

A linear is a MatMul whose second input is a constant [K, N] weight, a DequantizeLinear of one (the
canonical quantized form), a Transpose of one (a tied lm_head), or a com.microsoft.MatMulNBits. An ORT
target's packed QKV (one MatMulNBits whose output is a GroupQueryAttention's packed query-key-value input)
gives three linears on one node, each with its `columns`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

import numpy as np
import onnx_ir as ir

from qcompile import errors


class Role(str, enum.Enum):
    Q = "q"
    K = "k"
    V = "v"
    O = "o"
    GATE = "gate"
    UP = "up"
    DOWN = "down"
    LM_HEAD = "lm_head"


@dataclasses.dataclass
class Norm:
    """A normalization: output = norm(input) * gain (+ bias)."""

    kind: str  # "rms" or "layer"
    node: ir.Node  # the node producing `output` (the gain Mul, or the fused op)
    input: ir.Value
    output: ir.Value
    gain: ir.Value | None


@dataclasses.dataclass
class Linear:
    """y = x @ W with W of shape [in_features, out_features]."""

    name: str  # "blocks.3.q", "lm_head"
    role: Role
    block: int | None
    node: ir.Node
    in_features: int
    out_features: int
    norm: Norm | None = None
    columns: tuple[int, int] | None = None  # [start, stop) of `node`'s output columns, when it packs several linears

    @property
    def weight_input(self) -> ir.Value:
        return self.node.inputs[1]

    def format(self) -> str:
        """How the weight is stored: 'float32', 'INT4 block 128 (DequantizeLinear)', 'MatMulNBits ...'."""
        if self.node.op_type == "MatMulNBits":
            a = self.node.attributes
            return (f"MatMulNBits {a['bits'].as_int()}-bit block {a['block_size'].as_int()} "
                    f"acc{a.get_int('accuracy_level', 0)}{' (packed qkv)' if self.columns else ''}")
        dq = self.weight_input.producer()
        if dq is not None and dq.op_type == "DequantizeLinear":
            block = dq.attributes.get_int("block_size", 0)
            layout = f"block {block}" if block else "per-channel"
            return f"{dq.inputs[0].dtype.name} {layout} (DequantizeLinear)"
        weight = _weight_initializer(self.node)
        return weight.dtype.name if weight is not None else "?"

    def float_weight(self) -> np.ndarray:
        """The float weight as a [K, N] array (a tied lm_head's embedding is transposed)."""
        producer = self.weight_input.producer()
        if self.node.op_type == "MatMulNBits":
            raise errors.InputError(f"linear {self.name} is already quantized ({self.format()}): start from a float model")
        if producer is None:
            return self.weight_input.const_value.numpy()
        if producer.op_type == "Transpose":
            return producer.inputs[0].const_value.numpy().T
        raise errors.InputError(f"linear {self.name} is already quantized ({self.format()}): start from a float model")


@dataclasses.dataclass
class Block:
    index: int
    input_norm: Norm
    post_attention_norm: Norm
    linears: dict[Role, Linear]
    attention_residual: ir.Node
    mlp_residual: ir.Node
    attention_probs: ir.Value | None = None  # softmax(q·kᵀ) [b, heads, q, k] of a decomposed attention


@dataclasses.dataclass
class ModelMap:
    embedding: ir.Node  # the Gather reading the token embedding table
    blocks: list[Block]
    final_norm: Norm
    lm_head: Linear
    tied_lm_head: bool

    @property
    def hidden_size(self) -> int:
        return self.lm_head.in_features

    def linears(self) -> list[Linear]:
        return [lin for b in self.blocks for lin in b.linears.values()] + [self.lm_head]


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def _skip_back(value: ir.Value, ops=("Cast", "Identity")) -> ir.Value:
    """Walk back through no-op-like producers (a bf16 model's upcasts, identities)."""
    while (p := value.producer()) is not None and p.op_type in ops:
        value = p.inputs[0]
    return value


def _weight_initializer(node: ir.Node) -> ir.Value | None:
    """The constant 2-D tensor behind a MatMul's weight input, if it is a linear."""
    w = node.inputs[1]
    if w is None:
        return None
    producer = w.producer()
    if producer is not None and producer.op_type in ("DequantizeLinear", "Transpose"):
        w = producer.inputs[0]
    if _is_const(w) and len(w.const_value.shape) == 2:
        return w
    return None


def _linear_dims(node: ir.Node) -> tuple[int, int] | None:
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        return node.attributes["K"].as_int(), node.attributes["N"].as_int()
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    w = _weight_initializer(node)
    if w is None:
        return None
    k, n = w.const_value.shape
    if (producer := node.inputs[1].producer()) is not None and producer.op_type == "Transpose":
        k, n = n, k  # a tied lm_head reads the [vocab, hidden] embedding transposed
    return int(k), int(n)


_FUSED_NORMS = {
    "SimplifiedLayerNormalization": "rms",
    "SkipSimplifiedLayerNormalization": "rms",
    "RMSNormalization": "rms",
    "LayerNormalization": "layer",
    "SkipLayerNormalization": "layer",
}


def _sqrt_mean_square_of(value: ir.Value) -> ir.Value | None:
    """x if `value` = sqrt(mean(x²) + eps), else None."""
    for op in ("Sqrt", "Add", "ReduceMean"):
        producer = _skip_back(value).producer()
        if producer is None or producer.op_type != op:
            return None
        value = producer.inputs[0]
    square = _skip_back(value).producer()
    if square is None:
        return None
    x = _skip_back(square.inputs[0])
    if square.op_type == "Pow" and _is_const(square.inputs[1]) and float(square.inputs[1].const_value.numpy()) == 2:
        return x
    if square.op_type == "Mul" and _skip_back(square.inputs[1]) is x:
        return x
    return None


def _rms_input(normed: ir.Value) -> ir.Value | None:
    """x if `normed` = x · 1/sqrt(mean(x²) + eps) in any exported spelling (Reciprocal, Div), else None."""
    node = normed.producer()
    if node is None:
        return None
    if node.op_type == "Div":
        x = _skip_back(node.inputs[0])
        return x if _sqrt_mean_square_of(node.inputs[1]) is x else None
    if node.op_type != "Mul":
        return None
    for a, b in (node.inputs, node.inputs[::-1]):
        x, r = _skip_back(a), _skip_back(b).producer()
        if r is not None and r.op_type == "Reciprocal":
            inner = r.inputs[0]
        elif r is not None and r.op_type == "Div" and _is_const(r.inputs[0]):
            inner = r.inputs[1]
        else:
            continue
        if _sqrt_mean_square_of(inner) is x:
            return x
    return None


_BETWEEN_NORM_AND_LINEAR = ("Pad", "QuantizeLinear", "DequantizeLinear", "QuantizeDequantizePerToken", "Hadamard")


def match_norm(value: ir.Value) -> Norm | None:
    """The norm producing `value` (through a TensorRT whole-block Pad, activation quantizers and an online
    Hadamard), or None."""
    value = _skip_back(value, ops=_BETWEEN_NORM_AND_LINEAR)
    out = value
    node = _skip_back(value).producer()
    if node is None:
        return None
    if node.op_type in _FUSED_NORMS:
        gain = node.inputs[1] if len(node.inputs) > 1 else None
        return Norm(_FUSED_NORMS[node.op_type], node, node.inputs[0], out, gain)
    if node.op_type != "Mul":
        return None
    for gi in (0, 1):
        gain, other = node.inputs[gi], node.inputs[1 - gi]
        if _is_const(gain) and len(gain.const_value.shape) == 1:
            x = _rms_input(_skip_back(other))
            if x is not None:
                return Norm("rms", node, x, out, gain)
    return None


_SKIP_NORMS = {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization"}
_ATTENTION_OPS = {"GroupQueryAttention", "MultiHeadAttention", "Attention"}


def _forward_first(value: ir.Value, stop, limit: int = 400) -> tuple[ir.Node, int] | None:
    """Breadth-first over consumers of `value`; the first (node, input index) where stop(node) holds."""
    queue = collections.deque([value])
    seen = set()
    while queue and len(seen) < limit:
        v = queue.popleft()
        for use in v.uses():
            node, idx = use.node, use.idx
            if stop(node):
                return node, idx
            if node not in seen:
                seen.add(node)
                queue.extend(node.outputs)
    return None


def _softmax_before(context: ir.Node, limit: int = 8) -> ir.Value | None:
    """The Softmax output feeding an attention context MatMul's probabilities (through Where/IsNaN/Cast)."""
    if context.op_type != "MatMul":
        return None
    value = context.inputs[0]
    for _ in range(limit):
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type == "Softmax":
            return value
        data = [v for v in producer.inputs if v is not None and not _is_const(v) and v.dtype != ir.DataType.BOOL]
        if not data:
            return None
        value = data[-1]  # Where(cond, fill, x) carries the probabilities last; Cast/Dropout first and only
    return None


def _packed_qkv(node: ir.Node) -> ir.Node | None:
    """The GroupQueryAttention reading `node`'s output as its packed query-key-value input, or None."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].idx != 0:
        return None
    attention = uses[0].node
    if attention.op_type != "GroupQueryAttention" or any(v is not None for v in attention.inputs[1:3]):
        return None
    return attention


class _Analyzer:
    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self.order = {node: i for i, node in enumerate(self.graph)}
        self.linear_nodes = {n: d for n in self.graph if (d := _linear_dims(n)) is not None}

    def fail(self, what: str) -> errors.UnsupportedModelError:
        return errors.UnsupportedModelError(
            f"not a supported decoder-only LLM graph: {what}. qcompile handles Llama-style models "
            "(RMSNorm/LayerNorm, q/k/v/o attention, gated MLP) exported by `qcompile export`"
        )

    def is_dynamic_matmul(self, node: ir.Node) -> bool:
        return (node.op_type == "MatMul" and node not in self.linear_nodes) or node.op_type in _ATTENTION_OPS

    def embedding(self) -> ir.Node:
        graph_inputs = set(self.graph.inputs)
        for node in self.graph:
            if node.op_type not in ("Gather", "GatherBlockQuantized") or node.inputs[1] not in graph_inputs:
                continue
            table = node.inputs[0]
            if (p := table.producer()) is not None and p.op_type in ("DequantizeLinear", "Reshape"):
                table = p.inputs[0]  # a quantized table, or a MatMulNBits B read as one (ORT, shared with lm_head)
            if _is_const(table):
                return node
        raise self.fail("no token-embedding Gather reading a graph input was found")

    def lm_head(self) -> ir.Node:
        if not self.graph.outputs:
            raise self.fail("the graph has no outputs")
        value = _skip_back(self.graph.outputs[0], ops=("Cast", "Identity", "Reshape"))
        node = value.producer()
        if node is None or node not in self.linear_nodes:
            raise self.fail(f"the first output '{self.graph.outputs[0].name}' is not produced by a linear (lm_head)")
        return node

    def run(self) -> ModelMap:
        embedding = self.embedding()
        head_node = self.lm_head()
        final_norm = match_norm(head_node.inputs[0])
        if final_norm is None:
            raise self.fail("no norm (RMSNorm/LayerNorm) feeds lm_head")
        groups: dict[ir.Node, list[ir.Node]] = collections.defaultdict(list)
        norms: dict[ir.Node, Norm] = {}
        for node in self.linear_nodes:
            if node is head_node:
                continue
            norm = match_norm(node.inputs[0])
            if norm is not None:
                groups[norm.node].append(node)
                norms[norm.node] = norm
        attention = sorted((n for n, ls in groups.items() if len(ls) == 3 or (len(ls) == 1 and _packed_qkv(ls[0]))),
                           key=self.order.get)
        mlp = sorted((n for n, ls in groups.items() if len(ls) == 2), key=self.order.get)
        if not attention:
            raise self.fail("no norm feeding three linears (q, k, v) was found")
        if len(attention) != len(mlp):
            raise self.fail(f"found {len(attention)} attention norms but {len(mlp)} MLP norms (gate/up)")
        blocks = []
        for i, (an, mn) in enumerate(zip(attention, mlp)):
            attention, probs = self.attention_roles(i, groups[an], norms[an])
            linears = {**attention, **self.mlp_roles(i, groups[mn], norms[mn])}
            blocks.append(Block(
                i, norms[an], norms[mn], linears,
                self.residual_add(linears[Role.O]), self.residual_add(linears[Role.DOWN]), probs,
            ))
        k, n = self.linear_nodes[head_node]
        tied = head_node.op_type == "MatMul" and _weight_initializer(head_node) is embedding.inputs[0]
        lm_head = Linear("lm_head", Role.LM_HEAD, None, head_node, k, n, final_norm)
        return ModelMap(embedding, blocks, final_norm, lm_head, tied)

    def linear(self, block: int, role: Role, node: ir.Node, norm: Norm | None) -> Linear:
        k, n = self.linear_nodes[node]
        return Linear(f"blocks.{block}.{role.value}", role, block, node, k, n, norm)

    def attention_roles(self, i: int, nodes: list[ir.Node], norm: Norm) -> tuple[dict[Role, Linear], ir.Value | None]:
        if len(nodes) == 1:
            return self.packed_attention_roles(i, nodes[0], norm), None
        reached = {}
        for node in nodes:
            hit = _forward_first(node.outputs[0], self.is_dynamic_matmul)
            if hit is None:
                raise self.fail(f"block {i}: linear '{node.name}' reaches no attention MatMul")
            reached[node] = hit
        roles = {}
        for node, (target, idx) in reached.items():
            if target.op_type in _ATTENTION_OPS:
                roles[(Role.Q, Role.K, Role.V)[idx]] = node
            else:
                shared = sum(1 for t, _ in reached.values() if t is target)
                roles[Role.V if shared == 1 else (Role.Q, Role.K)[idx]] = node
        if set(roles) != {Role.Q, Role.K, Role.V}:
            raise self.fail(f"block {i}: could not tell q, k and v apart")
        context = _forward_first(roles[Role.V].outputs[0], self.is_dynamic_matmul)[0]
        o_hit = _forward_first(context.outputs[0], lambda n: n in self.linear_nodes)
        if o_hit is None:
            raise self.fail(f"block {i}: no output projection after attention")
        out = {role: self.linear(i, role, node, norm) for role, node in roles.items()}
        out[Role.O] = self.linear(i, Role.O, o_hit[0], None)
        return out, _softmax_before(context)

    def packed_attention_roles(self, i: int, node: ir.Node, norm: Norm) -> dict[Role, Linear]:
        """q, k and v as column ranges of one packed-QKV MatMulNBits: [q heads | kv heads | kv heads] × head size."""
        attention = _packed_qkv(node)
        heads, kv_heads = (attention.attributes.get_int(a) for a in ("num_heads", "kv_num_heads"))
        k, n = self.linear_nodes[node]
        head = n // (heads + 2 * kv_heads)
        bounds = {Role.Q: (0, heads * head), Role.K: (heads * head, (heads + kv_heads) * head),
                  Role.V: ((heads + kv_heads) * head, n)}
        out = {role: Linear(f"blocks.{i}.{role.value}", role, i, node, k, stop - start, norm, (start, stop))
               for role, (start, stop) in bounds.items()}
        o_hit = _forward_first(attention.outputs[0], lambda n: n in self.linear_nodes)
        if o_hit is None:
            raise self.fail(f"block {i}: no output projection after attention")
        out[Role.O] = self.linear(i, Role.O, o_hit[0], None)
        return out

    def mlp_roles(self, i: int, nodes: list[ir.Node], norm: Norm) -> dict[Role, Linear]:
        def only_mul(node):
            uses = list(node.outputs[0].uses())
            return len(uses) == 1 and uses[0].node.op_type == "Mul"

        ups = [n for n in nodes if only_mul(n)]
        if len(ups) != 1:
            raise self.fail(f"block {i}: could not tell the MLP gate and up projections apart")
        up = ups[0]
        gate = nodes[0] if nodes[1] is up else nodes[1]
        combine = next(iter(up.outputs[0].uses())).node
        down = _forward_first(combine.outputs[0], lambda n: n in self.linear_nodes)
        if down is None:
            raise self.fail(f"block {i}: no down projection after the gated MLP")
        return {
            Role.GATE: self.linear(i, Role.GATE, gate, norm),
            Role.UP: self.linear(i, Role.UP, up, norm),
            Role.DOWN: self.linear(i, Role.DOWN, down[0], None),
        }

    def residual_add(self, linear: Linear) -> ir.Node:
        """The Add of `linear`'s output to the residual stream (or the fused Add + norm of an ORT graph)."""
        hit = _forward_first(linear.node.outputs[0], lambda n: n.op_type in _SKIP_NORMS or (
            n.op_type == "Add" and not any(map(_is_const, n.inputs))))
        if hit is None:
            raise self.fail(f"{linear.name}: no residual Add after it")
        return hit[0]


def analyze(model: ir.Model) -> ModelMap:
    """Return the ModelMap of `model`, or raise UnsupportedModelError naming what was not found."""
    return _Analyzer(model).run()
