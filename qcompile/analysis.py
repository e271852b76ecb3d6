"""Find the transformer structure of an exported causal LM: the one place that knows the graph's shape.

`analyze(model)` returns a `ModelMap`: the embedding, each block's norms and linears with their roles,
the residual stream entering and leaving each block, the final norm and lm_head. Roles come from
structure, never from tensor names (the exporter names weights `val_76`) nor from the model family:

    norm ──┬─ MatMul(q) ─ ... ─┐                 norm ──┬─ MatMul(gate) ─ act ─┐
           ├─ MatMul(k) ─ ... ─┴─ MatMul(scores)        └─ MatMul(up) ─────────┴─ Mul ─ MatMul(down)
           └─ MatMul(v) ─ ... ─── MatMul(context, input 1) ─ ... ─ MatMul(o) ─ Add(residual)

The linears that reach an attention MatMul first are the block's attention inputs: three (q, k, v), or
one fused projection (qkv) whose output is sliced, with each role's output columns where the slices are
contiguous. o is the first linear after the attention. The other linears are the MLP: the one reached
from the others is down; before it one plain up (GELU MLP), a fused gate_up, or gate and up. A block's
linears read a pre-norm, or the residual stream itself (post-norm blocks); a parallel block's MLP reads
the same stream as its attention. Norms on the attention or MLP output before the residual add
(post/sandwich norms) are the block's `branch_norms`.

A mixture-of-experts MLP is a router linear whose scores pick each token's experts (a TopK), and expert
weight tables: constant [E, N, K] (or [E, K, N]) tensors a Gather reads per token at the TopK's indices,
multiplied by the token's input. The router is not one of the block's linears (it stays float); the tables
are the block's `experts`. A shared expert beside them (Qwen2-MoE) is an ordinary MLP of linears.

A linear is a MatMul whose second input is a constant [K, N] weight, a DequantizeLinear of one (the
canonical quantized form), or a Transpose of one (a tied lm_head).

`analyze` knows ONNX's own ops. A model a target lowered into ops of its own (fused norms, fused attention with
packed q/k/v, quantized linears, a whole MoE block in one node) reads the same way with that target's
`LoweredForms` (`Target.forms`): the target that writes an op says what it stands for.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
from typing import Callable, Mapping

import numpy as np
import onnx_ir as ir

from qcompile import custom_ops, errors


SLIDING_WINDOWS_KEY = "qcompile.sliding_windows"  # the export's metadata: JSON list of each layer's window (0: none)


def _nothing(node: ir.Node) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class LoweredForms:
    """What a target's own ops stand for in the canonical structure, so that `analyze` reads a model the target
    lowered as it read the canonical one. Each field is empty by default: `NO_FORMS` (ONNX's own ops only)."""

    domain: str | None = None  # the opset domain of the target's own ops
    linear: Callable[[ir.Node], tuple[int, int, str] | None] = _nothing  # a lowered linear: K, N, its storage
    norms: Mapping[str, str] = dataclasses.field(default_factory=dict)  # a fused norm op → "rms" or "layer"
    skip_norms: frozenset[str] = frozenset()  # those of `norms` that also add the residual stream
    attention: frozenset[str] = frozenset()  # fused attention ops reading q, k, v at inputs 0, 1, 2
    packed_qkv: Callable[[ir.Node], tuple[int, int] | None] = _nothing  # a fused attention reading
    # q | k | v packed at input 0, with inputs 1 and 2 empty: (query heads, key/value heads)
    experts: Callable[[ir.Node], tuple[ir.Value, tuple[int, ...], int] | None] = _nothing  # a whole MoE block
    # in one node: (the router's scores, the inputs holding its [E, N, K] tables, codes per stored element)
    embeddings: frozenset[str] = frozenset()  # gathers reading a lowered embedding table at input 0
    between: tuple[str, ...] = ()  # ops the target puts between a norm and the linears it feeds (on their inputs)


NO_FORMS = LoweredForms()


class Role(str, enum.Enum):
    Q = "q"
    K = "k"
    V = "v"
    O = "o"
    GATE = "gate"
    UP = "up"
    DOWN = "down"
    LM_HEAD = "lm_head"
    QKV = "qkv"  # one fused projection: q, k and v column ranges (`Linear.parts`)
    GATE_UP = "gate_up"  # one fused projection: gate and up column ranges


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
    parts: dict[Role, tuple[int, int]] | None = None  # a fused projection's roles → [start, stop) output columns
    bias: ir.Value | None = None  # the constant [N] added right after (a view of a fused projection: the whole one's)
    lowered: str | None = None  # how a target's own op stores the weight (`LoweredForms.linear`); None: canonical

    @property
    def weight_input(self) -> ir.Value:
        return self.node.inputs[1]

    def format(self) -> str:
        """How the weight is stored: 'float32', 'INT4 block 128 (DequantizeLinear)', or a target's form."""
        if self.lowered is not None:
            return self.lowered + (" (packed qkv)" if self.columns and self.role in (Role.Q, Role.K, Role.V) else "")
        dq = self.weight_input.producer()
        if dq is not None and dq.op_type == "DequantizeLinear":
            block = dq.attributes.get_int("block_size", 0)
            layout = f"block {block}" if block else "per-channel"
            return f"{dq.inputs[0].dtype.name} {layout} (DequantizeLinear)"
        weight = _weight_initializer(self.node)
        return weight.dtype.name if weight is not None else "?"

    def views(self) -> list["Linear"]:
        """A fused projection with known column ranges as one view per part, named as the separate linears
        would be ('blocks.3.gate', 'blocks.3.up'); any other linear as itself."""
        if not self.parts:
            return [self]
        prefix = self.name.rsplit(".", 1)[0]
        return [dataclasses.replace(self, name=f"{prefix}.{role.value}", role=role, out_features=stop - start,
                                    columns=(start, stop), parts=None) for role, (start, stop) in self.parts.items()]

    def float_weight(self) -> np.ndarray:
        """The float weight as a [K, N] array (a tied lm_head's embedding is transposed; a view of a fused
        projection gets its `columns`)."""
        producer = self.weight_input.producer()
        if self.lowered is not None:
            raise errors.InputError(f"linear {self.name} is already quantized ({self.format()}): start from a float model")
        if producer is None:
            w = self.weight_input.const_value.numpy()
            return w[:, slice(*self.columns)] if self.columns else w
        if producer.op_type == "Transpose":
            return producer.inputs[0].const_value.numpy().T
        raise errors.InputError(f"linear {self.name} is already quantized ({self.format()}): start from a float model")


@dataclasses.dataclass
class ExpertTable:
    """One weight of every expert, a constant [E, N, K] or [E, K, N] table that `reader` (a Gather or GatherND)
    picks each token's experts from, for a MatMul computing W·x ([E, N, K]: `in_axis` 2) or x·W (`in_axis` 1)."""

    name: str  # "blocks.0.experts.0", "blocks.0.experts.1", ... in graph order ("" until the block is known)
    reader: ir.Node  # a Gather/GatherND, or the one node a target lowered the block to (`LoweredForms.experts`)
    in_axis: int
    matmul: ir.Node | None  # multiplies the gathered weights by the rows' inputs (None in a lowered block)
    index: int = 0  # the reader's input holding the table
    packed: int = 1  # codes per stored element along the last axis (a lowered block's packed integers)

    @property
    def table(self) -> ir.Value:
        return self.reader.inputs[self.index]

    @property
    def input(self) -> ir.Value:
        """The MatMul's other input: one row of K features per (token, chosen expert)."""
        return self.matmul.inputs[1 if self.in_axis == 2 else 0]

    @property
    def expert_index(self) -> ir.Value:
        """Each row's expert: the Gather's indices."""
        return self.reader.inputs[1]

    @property
    def shape(self) -> tuple[int, ...]:
        """[E, N, K] or [E, K, N] (a lowered block's tables may pack several codes per element)."""
        e, n, k = self.table.shape
        return e, n, k * self.packed

    def float_table(self) -> np.ndarray:
        if self.table.producer() is not None or self.table.const_value is None or self.matmul is None:
            raise errors.InputError(f"expert table {self.name} is already quantized: start from a float model")
        return self.table.const_value.numpy()


@dataclasses.dataclass
class Experts:
    """A mixture-of-experts MLP: `router` (a float linear; a TopK of its scores picks each token's experts) and
    the experts' weight tables."""

    router: ir.Node
    tables: list[ExpertTable]


# ops between the attention scores MatMul and the softmax (mask, scale, a softcap c·tanh(s / c)), and between
# a cache Concat and the scores MatMul's key input (GQA's repeat, transposes, the scale)
SCORE_PATH_OPS = {"Add", "Where", "Mul", "Div", "Cast", "Tanh"}
KEY_PATH_OPS = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Mul", "Div", "Cast", "Identity"}


NO_KV_CACHE = ("the attention keys/values do not come from a KV-cache Concat(past, new): export the model with "
               "`qcompile export`")


@dataclasses.dataclass
class Rotary:
    """RoPE in rotate-half form: q = query_factor · (x·cos + rotate_half(x)·sin) for x = `query`, and k the same
    of `key` with the same cos and sin; rotate_half(x) = Concat(−x₂, x₁) of x's two halves. Partial RoPE rotates
    the first `dims` channels of each head this way and passes the rest."""

    query: ir.Value  # before the rotation, [batch, heads, seq, head_dim]
    key: ir.Value
    cos: ir.Value  # the graph's own cos/sin tables for the positions
    sin: ir.Value
    query_factor: float = 1.0  # a constant the rotated queries are multiplied by (a scale folded onto q)
    dims: int | None = None  # the rotated channels of a head (None: all of them)


@dataclasses.dataclass
class Attention:
    """A decomposed attention, softmax(q·kᵀ)·v as `qcompile export` writes it: the q·kᵀ MatMul behind the
    softmax, the probabilities·v MatMul, and the KV-cache Concat(past, new) nodes whose outputs are the
    `present.*` key and value its keys and values come from (None where they do not come from a cache).
    The scores reach the softmax as scale·q·kᵀ (+ mask), or softcap·tanh(scale·q·kᵀ) (+ mask)."""

    scores: ir.Node
    context: ir.Node | None
    key_cache: ir.Node | None
    value_cache: ir.Node | None
    softcapped: bool = False  # a tanh between the scores and the softmax (scores capped as c·tanh(s / c))
    scale: float | None = None  # the constant factors on the key and score paths (None: not constants)
    softcap: float | None = None  # c, where the path is constants
    rotary: Rotary | None = None  # RoPE on the queries and keys as they reach the scores and the cache
    query_norm: Norm | None = None  # a norm on the queries / keys before RoPE (Qwen3, OLMo2, Gemma 3)
    key_norm: Norm | None = None

    @staticmethod
    def head_size(cache: ir.Node | None) -> int | None:
        """The static head size of a cache Concat's new [batch, heads, seq, head_dim] entries, or None."""
        shape = cache.inputs[1].shape if cache is not None else None
        return shape[-1] if shape is not None and len(shape) == 4 and isinstance(shape[-1], int) else None

    def merged_output(self, o_input: ir.Value) -> ir.Value | None:
        """The context with its heads merged back, [batch, seq, heads·head_dim], where o_proj's input `o_input` is it
        (Transpose/Reshape after the probabilities·v MatMul), or is it through a `qcompile.Hadamard`, activation
        quantizers and the Add of a constant (QuantizeKVCache's values' center, added back); None elsewhere."""
        for _ in range(4):
            node = o_input.producer()
            if node is None or not ((node.domain, node.op_type) in _ON_O_INPUT
                                    or node.op_type == "Add" and _is_const(node.inputs[1])):
                break
            o_input = node.inputs[0]
        walk = o_input
        for _ in range(4):
            if self.context is not None and walk is self.context.outputs[0]:
                return o_input
            node = walk.producer()
            if node is None or node.op_type not in ("Transpose", "Reshape"):
                break
            walk = node.inputs[0]
        return None

    @property
    def heads(self) -> tuple[int, int] | None:
        """(query heads, key/value heads), where the query and the new keys are static [batch, heads, seq, head_dim]."""
        shapes = [v.shape if v is not None else None for v in (self.scores.inputs[0], self.key_cache and self.key_cache.inputs[1])]
        if any(s is None or len(s) != 4 or not isinstance(s[1], int) for s in shapes):
            return None
        return shapes[0][1], shapes[1][1]


_ON_O_INPUT = {(custom_ops.DOMAIN, custom_ops.HADAMARD), (custom_ops.DOMAIN, custom_ops.PER_TOKEN),
               ("", "QuantizeLinear"), ("", "DequantizeLinear")}  # between the merged context and o_proj


@dataclasses.dataclass
class Block:
    index: int
    input: ir.Value  # the residual stream entering the block
    output: ir.Value  # the residual stream leaving it (the next block's input, or the final norm's)
    linears: dict[Role, Linear]  # q, k, v (or qkv), o, gate and up (or gate_up, or up alone), down
    attention_probs: ir.Value | None = None  # softmax(q·kᵀ) [b, heads, q, k] of a decomposed attention
    branch_norms: list[Norm] = dataclasses.field(default_factory=list)  # on o's / down's output (post-norms)
    parallel: bool = False  # the MLP reads the block's input stream, as the attention does
    sliding_window: int | None = None  # the attention sees only the last this-many positions (the export's record)
    experts: Experts | None = None  # a mixture-of-experts MLP (a shared expert's linears, if any, are in `linears`)
    attention: Attention | None = None  # the decomposed attention's MatMuls and cache Concats (None once fused)

    def norms(self) -> list[Norm]:
        """The block's pre-norms (each once), in the order their linears appear."""
        return list({id(lin.norm): lin.norm for lin in self.linears.values() if lin.norm is not None}.values())

    @property
    def input_norm(self) -> Norm | None:
        return self.attention_input().norm

    @property
    def post_attention_norm(self) -> Norm | None:
        return self.mlp_input().norm

    def attention_input(self) -> Linear:
        return self.linears.get(Role.QKV) or self.linears[Role.Q]

    def mlp_input(self) -> Linear:
        return self.linears.get(Role.GATE_UP) or self.linears.get(Role.GATE) or self.linears[Role.UP]

    @property
    def gated(self) -> bool:
        """down reads act(gate)·up (the up part can take a per-column scale), not act(up)."""
        return Role.GATE in self.linears or Role.GATE_UP in self.linears

    def part(self, role: Role) -> Linear | None:
        """The linear holding `role` (Q, K, V, GATE, UP): its own, or a view of the fused projection's
        columns; None where a fused projection does not say which columns are the role's."""
        if role in self.linears:
            return self.linears[role]
        fused = self.linears.get(Role.QKV if role in (Role.Q, Role.K, Role.V) else Role.GATE_UP)
        return next((view for view in fused.views() if view.role == role), None) if fused is not None else None


@dataclasses.dataclass
class ModelMap:
    embedding: ir.Node  # the Gather reading the token embedding table
    blocks: list[Block]
    final_norm: Norm
    lm_head: Linear
    tied_lm_head: bool
    logit_softcap: float | None = None  # logits = c·tanh(lm_head / c)
    embedding_scale: float | None = None  # the embedded tokens times a constant (Gemma's √hidden)

    @property
    def hidden_size(self) -> int:
        return self.lm_head.in_features

    def linears(self) -> list[Linear]:
        """Every weight once, in block order, lm_head last (a fused projection is one linear)."""
        return [lin for b in self.blocks for lin in b.linears.values()] + [self.lm_head]

    def expert_tables(self) -> list[ExpertTable]:
        return [t for b in self.blocks if b.experts for t in b.experts.tables]

    def norm_readers(self) -> list[tuple[Norm, list[Linear]]]:
        """Every norm that feeds linears, with the linears reading it (the final norm → lm_head last)."""
        groups: dict[int, tuple[Norm, list[Linear]]] = {}
        for linear in self.linears():
            if linear.norm is not None:
                groups.setdefault(id(linear.norm), (linear.norm, []))[1].append(linear)
        return list(groups.values())


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def gathered_table(node: ir.Node) -> ir.Value | None:
    """The constant table (its integers, past a DequantizeLinear) that `node`, a Gather or GatherND of a rank-3
    [E, ·, ·] tensor, picks experts' weights from; None for any other node."""
    if node.op_type not in ("Gather", "GatherND") or len(node.inputs[0].shape or ()) != 3:
        return None
    table = node.inputs[0]
    if (p := table.producer()) is not None and p.op_type == "DequantizeLinear":
        table = p.inputs[0]
    return table if _is_const(table) else None


def skip_back(value: ir.Value, ops=("Cast", "Identity")) -> ir.Value:
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
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    w = _weight_initializer(node)
    if w is None:
        return None
    k, n = w.const_value.shape
    if (producer := node.inputs[1].producer()) is not None and producer.op_type == "Transpose":
        k, n = n, k  # a tied lm_head reads the [vocab, hidden] embedding transposed
    return int(k), int(n)


_FUSED_NORMS = {"RMSNormalization": "rms", "LayerNormalization": "layer"}  # ONNX's own (opsets 23 and 17)


def _sqrt_mean_square_of(value: ir.Value) -> ir.Value | None:
    """x if `value` = sqrt(mean(x²) + eps), else None."""
    for op in ("Sqrt", "Add", "ReduceMean"):
        producer = skip_back(value).producer()
        if producer is None or producer.op_type != op:
            return None
        value = producer.inputs[0]
    square = skip_back(value).producer()
    if square is None:
        return None
    x = skip_back(square.inputs[0])
    if square.op_type == "Pow" and _is_const(square.inputs[1]) and float(square.inputs[1].const_value.numpy()) == 2:
        return x
    if square.op_type == "Mul" and skip_back(square.inputs[1]) is x:
        return x
    return None


def _rms_input(normed: ir.Value) -> ir.Value | None:
    """x if `normed` = x · 1/sqrt(mean(x²) + eps) in any exported spelling (Reciprocal, Div), else None."""
    node = normed.producer()
    if node is None:
        return None
    if node.op_type == "Div":
        x = skip_back(node.inputs[0])
        return x if _sqrt_mean_square_of(node.inputs[1]) is x else None
    if node.op_type != "Mul":
        return None
    for a, b in (node.inputs, node.inputs[::-1]):
        x, r = skip_back(a), skip_back(b).producer()
        if r is not None and r.op_type == "Reciprocal":
            inner = r.inputs[0]
        elif r is not None and r.op_type == "Div" and _is_const(r.inputs[0]):
            inner = r.inputs[1]
        else:
            continue
        if _sqrt_mean_square_of(inner) is x:
            return x
    return None


_BETWEEN_NORM_AND_LINEAR = ("QuantizeLinear", "DequantizeLinear", "QuantizeDequantizePerToken", "Hadamard")


def match_norm(value: ir.Value, forms: LoweredForms = NO_FORMS) -> Norm | None:
    """The norm producing `value` (through activation quantizers, an online Hadamard and `forms.between`), or None."""
    value = skip_back(value, ops=_BETWEEN_NORM_AND_LINEAR + forms.between)
    out = value
    node = skip_back(value).producer()
    if node is None:
        return None
    if (kind := _FUSED_NORMS.get(node.op_type) or forms.norms.get(node.op_type)) is not None:
        gain = node.inputs[1] if len(node.inputs) > 1 else None
        return Norm(kind, node, node.inputs[0], out, gain)
    if node.op_type != "Mul":
        return None
    for gi in (0, 1):
        gain, other = node.inputs[gi], node.inputs[1 - gi]
        if _is_const(gain) and len(gain.const_value.shape) == 1:
            x = _rms_input(skip_back(other))
            if x is not None:
                return Norm("rms", node, x, out, gain)
    return None


_ATTENTION_OPS = frozenset({"Attention"})  # ONNX's own (opset 23): q, k, v at inputs 0, 1, 2


def _forward_first(value: ir.Value, stop, limit: int = 400,
                   through: tuple[str, ...] = _BETWEEN_NORM_AND_LINEAR) -> tuple[ir.Node, int] | None:
    """Breadth-first over consumers of `value`; the first (node, input index) where stop(node) holds. `through`
    ops take no step (activation quantizers, an online Hadamard): a quantized model's distances are its float
    model's, whichever inputs a recipe quantizes."""
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
                (queue.extendleft if node.op_type in through else queue.extend)(node.outputs)
    return None


def _forward_uses(value: ir.Value, through: tuple[str, ...]) -> list[ir.Usage]:
    """The uses of `value`, and of what it becomes through `through` ops (reshapes), in order."""
    out, queue = [], [value]
    while queue:
        for use in queue.pop(0).uses():
            out.append(use)
            if use.node.op_type in through:
                queue.extend(use.node.outputs)
    return out


def backward_first(value: ir.Value, stop, limit: int = 16) -> ir.Node | None:
    """Depth-first over producers of `value` (at most `limit` nodes); the first node where stop(node) holds."""
    stack, seen = [value], set()
    while stack and len(seen) < limit:
        node = stack.pop().producer()
        if node is None or node in seen:
            continue
        if stop(node):
            return node
        seen.add(node)
        stack.extend(v for v in node.inputs if v is not None and not _is_const(v))
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


def _scores_matmul(probs: ir.Value) -> ir.Node | None:
    """The q·kᵀ MatMul behind an attention softmax (through the mask Add, the scale and a softcap)."""
    frontier = [probs.producer().inputs[0]]
    for _ in range(8):
        found = []
        for value in frontier:
            node = value.producer()
            if node is None:
                continue
            if node.op_type == "MatMul" and all(i.const_value is None for i in node.inputs):
                return node
            if node.op_type in SCORE_PATH_OPS:
                found += [i for i in node.inputs if i is not None and i.const_value is None]
        frontier = found
    return None


def _context_matmul(probs: ir.Value) -> ir.Node | None:
    """The probabilities·v MatMul that consumes an attention softmax (through IsNaN/Where/Cast)."""
    frontier = [probs]
    for _ in range(4):
        found = []
        for value in frontier:
            for use in value.uses():
                if use.node.op_type == "MatMul" and use.idx == 0:
                    return use.node
                if use.node.op_type in ("Where", "Cast"):
                    found.extend(use.node.outputs)
        frontier = found
    return None


def _cache_concat(value: ir.Value, outputs: set[ir.Value]) -> ir.Node | None:
    """The Concat(past, new) producing a graph output (`present.*`) that `value` (keys or values) comes from."""
    for _ in range(16):
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Concat" and node.outputs[0] in outputs and len(node.inputs) == 2:
            return node
        if node.op_type not in KEY_PATH_OPS:
            return None
        value = node.inputs[0]
    return None


def _attention(probs: ir.Value | None, outputs: set[ir.Value]) -> Attention | None:
    scores = _scores_matmul(probs) if probs is not None else None
    if scores is None:
        return None
    context = _context_matmul(probs)
    key_cache = _cache_concat(scores.inputs[1], outputs)
    softcapped, softcap, scale = _score_path(probs.producer().inputs[0], scores.outputs[0])
    if scale is not None and key_cache is not None:
        key_factor = _constant_factor(scores.inputs[1], key_cache.outputs[0], KEY_PATH_OPS)
        scale = scale * key_factor if key_factor is not None else None
    rotary = _rotary(scores.inputs[0], key_cache.inputs[1]) if key_cache is not None else None
    query = rotary.query if rotary is not None else scores.inputs[0]
    key = rotary.key if rotary is not None else key_cache.inputs[1] if key_cache is not None else None
    return Attention(scores, context, key_cache, _cache_concat(context.inputs[1], outputs) if context is not None else None,
                     softcapped, scale, softcap, rotary,
                     _head_norm(query), _head_norm(key) if key is not None else None)


def _head_norm(value: ir.Value) -> Norm | None:
    """The norm that per-head queries or keys come from, before the heads are split off, or None."""
    return match_norm(skip_back(value, ops=("Transpose", "Reshape", custom_ops.STATIC)))


def _score_path(value: ir.Value, stop: ir.Value) -> tuple[bool, float | None, float | None]:
    """(softcapped, c, f) for the scores `value` reaching the softmax from q·kᵀ (`stop`): c·tanh(f·q·kᵀ) (+ mask)
    or f·q·kᵀ (+ mask); c and f None where the path is not constant factors."""
    tanh = value
    for _ in range(24):
        node = tanh.producer()
        if node is None or tanh is stop:
            break
        if node.op_type == "Tanh":
            outer = _constant_factor(value, node.outputs[0], SCORE_PATH_OPS - {"Tanh"})
            inner = _constant_factor(node.inputs[0], stop, SCORE_PATH_OPS - {"Tanh"}) if outer is not None else None
            return True, outer if inner is not None else None, inner
        tanh = next((v for v in node.inputs if v is not None and v.const_value is None and _reaches(v, stop)), stop)
    return False, None, _constant_factor(value, stop, SCORE_PATH_OPS - {"Tanh"})


def _constant_factor(value: ir.Value, stop: ir.Value, allowed: set[str]) -> float | None:
    """The product of the constant scalar Mul/Div factors on the path from `stop` to `value` through `allowed`
    ops (an Add/Where's other operand being a mask), or None where the path holds anything else."""
    factor = 1.0
    for _ in range(24):
        if value is stop:
            return factor
        node = value.producer()
        if node is None or node.op_type not in allowed:
            return None
        data = [v for v in node.inputs if v is not None and v.const_value is None]
        if node.op_type in ("Mul", "Div"):
            scaled = _scalar_factor(node)
            if scaled is None:
                return None
            data, factor = [scaled[0]], factor * scaled[1]
        elif node.op_type in ("Add", "Where"):
            data = [v for v in data if v.dtype != ir.DataType.BOOL and _reaches(v, stop)]  # the mask is the other operand
            if len(data) != 1:
                return None
        if not data:
            return None
        value = data[0]
    return None


def _scalar_factor(node: ir.Node) -> tuple[ir.Value, float] | None:
    """(x, c) when `node` is x·c, c·x or x/c (then 1/c) for a constant scalar c; else None."""
    data = [v for v in node.inputs if v.const_value is None]
    const = [v for v in node.inputs if v.const_value is not None]
    if len(data) != 1 or len(const) != 1 or const[0].const_value.numpy().size != 1:
        return None
    c = float(const[0].const_value.numpy().reshape(-1)[0])
    if node.op_type == "Div":
        return (data[0], 1.0 / c) if node.inputs[1] is const[0] else None
    return data[0], c


def _reaches(value: ir.Value, target: ir.Value, limit: int = 24) -> bool:
    """Whether `target` lies on `value`'s single-data-input path back (at most `limit` steps)."""
    for _ in range(limit):
        if value is target:
            return True
        node = value.producer()
        data = [v for v in (node.inputs if node else []) if v is not None and v.const_value is None]
        if not data:
            return False
        value = data[-1] if node.op_type == "Where" else data[0]  # Where(cond, fill, x) carries x last
    return False


def _rotary(query: ir.Value, key: ir.Value) -> Rotary | None:
    """RoPE on the queries entering the scores (after a constant factor, if any) and on the new keys entering the
    cache (before a cache quantizer, if any), with one cos/sin, over whole heads or their first channels; None
    elsewhere (no RoPE, a rotation between RoPE and the scores)."""
    factor, node = 1.0, query.producer()
    if node is not None and node.op_type in ("Mul", "Div"):
        scaled = _scalar_factor(node)
        if scaled is None:
            return None
        query, factor = scaled
    key = skip_back(key, ops=(custom_ops.STATIC,))  # QuantizeKVCache's quantizer on the new keys
    q_rope, k_rope = _rope(query) or _partial_rope(query), _rope(key) or _partial_rope(key)
    if q_rope is None or k_rope is None or q_rope[1:] != k_rope[1:]:
        return None
    return Rotary(q_rope[0], k_rope[0], *q_rope[1:3], query_factor=factor, dims=q_rope[3])


def _partial_rope(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value, int] | None:
    """(x, cos, sin, r) when value = Concat(RoPE(x[..., :r]), x[..., r:]) along the last axis; else None."""
    concat = value.producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or concat.attributes.get_int("axis") not in (-1, 3):
        return None
    rope, rest = _rope(concat.inputs[0]), concat.inputs[1].producer()
    first = rope[0].producer() if rope is not None else None
    if first is None or rest is None or first.op_type != "Slice" or rest.op_type != "Slice" or first.inputs[0] is not rest.inputs[0]:
        return None
    x = rest.inputs[0]
    n = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
    rotated, passed = (_column_range(node, n) for node in (first, rest)) if n is not None else (None, None)
    if rotated is None or passed is None or rotated[0] != 0 or passed != (rotated[1], n):
        return None
    return x, rope[1], rope[2], rotated[1]


def _rope(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value, None] | None:
    """(x, cos, sin, None) when value = x·cos + rotate_half(x)·sin, rotate_half(x) = Concat(−x₂, x₁); else None."""
    add = value.producer()
    if add is None or add.op_type != "Add":
        return None
    for plain, rotated in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        mul_x, mul_r = plain.producer(), rotated.producer()
        if mul_x is None or mul_r is None or mul_x.op_type != "Mul" or mul_r.op_type != "Mul":
            continue
        for x, cos in (mul_x.inputs, mul_x.inputs[::-1]):
            for half, sin in (mul_r.inputs, mul_r.inputs[::-1]):
                if _is_rotate_half(half, x):
                    return x, cos, sin, None
    return None


def _is_rotate_half(value: ir.Value, x: ir.Value) -> bool:
    concat = value.producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or concat.attributes.get_int("axis") not in (-1, 3):
        return False
    neg, second = concat.inputs[0].producer(), concat.inputs[1].producer()
    if neg is None or neg.op_type != "Neg" or second is None or second.op_type != "Slice":
        return False
    first = neg.inputs[0].producer()
    if first is None or first.op_type != "Slice" or first.inputs[0] is not x or second.inputs[0] is not x:
        return False
    half = x.shape[-1] // 2 if x.shape is not None and isinstance(x.shape[-1], int) else None
    starts = [_constant_scalar(s.inputs[1]) for s in (first, second)]
    return half is not None and starts == [half, 0] and _constant_scalar(second.inputs[2]) == half


def _bias_after(node: ir.Node, n: int) -> ir.Value | None:
    """The constant [n] bias added right after `node` (MatMul → Add(·, b)), or None."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    other = uses[0].node.inputs[1 - uses[0].idx]
    return other if _is_const(other) and other.const_value.shape == (n,) else None


def _packed_qkv(node: ir.Node, forms: LoweredForms) -> tuple[ir.Node, tuple[int, int]] | None:
    """The fused attention reading `node`'s output as its packed query-key-value input, with its (query heads,
    key/value heads), or None."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].idx != 0:
        return None
    heads = forms.packed_qkv(uses[0].node)
    return (uses[0].node, heads) if heads is not None else None


def _constant_scalar(value: ir.Value | None) -> float | None:
    if not _is_const(value) or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(()))


def _column_range(node: ir.Node, n: int) -> tuple[int, int] | None:
    """The [start, stop) columns a Slice of the last axis keeps of a [.., n] tensor, or None."""
    starts, ends = (_constant_scalar(v) for v in node.inputs[1:3])
    axes = _constant_scalar(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else 0
    steps = _constant_scalar(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else 1
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if None in (starts, ends, axes, rank) or steps != 1 or axes not in (-1, rank - 1):
        return None
    start, stop = (int(max(0, min(n, x + n if x < 0 else x))) for x in (starts, ends))
    return start, stop


def _output_parts(node: ir.Node, n: int) -> list[tuple[ir.Value, tuple[int, int] | None]] | None:
    """The pieces a fused projection's output is cut into (through its bias Add): each piece's value and its
    contiguous column range, or None where the cut is not one along the last axis; None if not cut at all."""
    value = node.outputs[0]
    uses = list(value.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add" and _is_const(uses[0].node.inputs[1 - uses[0].idx]):
        value = uses[0].node.outputs[0]  # the bias
        uses = list(value.uses())
    if uses and all(u.node.op_type == "Slice" and u.idx == 0 for u in uses) and len(uses) > 1:
        return [(u.node.outputs[0], _column_range(u.node, n)) for u in uses]
    if len(uses) == 1 and uses[0].node.op_type == "Split":
        split = uses[0].node
        axis = split.attributes.get_int("axis", 0)
        rank = len(value.shape) if value.shape is not None else None
        sizes = split.inputs[1].const_value.numpy().tolist() if len(split.inputs) > 1 and _is_const(split.inputs[1]) else None
        if sizes is None and rank is not None and axis in (-1, rank - 1):
            count = len(split.outputs)
            sizes = [n // count] * count if n % count == 0 else None
        if rank is None or axis not in (-1, rank - 1) or sizes is None:
            return [(out, None) for out in split.outputs]
        bounds = np.cumsum([0, *sizes]).tolist()
        return [(out, (int(a), int(b))) for out, a, b in zip(split.outputs, bounds, bounds[1:])]
    return None


class _Analyzer:
    def __init__(self, model: ir.Model, forms: LoweredForms):
        self.graph = model.graph
        self.forms = forms
        self.attention_ops = _ATTENTION_OPS | forms.attention
        self.windows = json.loads(model.metadata_props.get(SLIDING_WINDOWS_KEY, "[]"))
        self.order = {node: i for i, node in enumerate(self.graph)}
        self.between = _BETWEEN_NORM_AND_LINEAR + forms.between
        self.lowered = {n: lowered for n in self.graph if (lowered := forms.linear(n)) is not None}
        self.linear_nodes = {n: d for n in self.graph
                             if (d := self.lowered[n][:2] if n in self.lowered else _linear_dims(n)) is not None}
        self.shared_norms: dict[ir.Node, Norm] = {}
        self.experts = self.find_experts()
        for router in self.experts:
            del self.linear_nodes[router]  # the router stays float: its scores choose, they are not summed
        self.expert_matmuls = {t.matmul for tables in self.experts.values() for t in tables}

    def find_experts(self) -> dict[ir.Node, list[ExpertTable]]:
        """Each router linear → the expert tables gathered at its TopK's indices (empty for a dense model)."""
        routers: dict[ir.Node, ir.Node] = {}  # TopK → router
        for node in self.graph:
            if node.op_type != "TopK":
                continue
            value, router = node.inputs[0], None
            for _ in range(8):  # back through Softmax/Sigmoid, a bias, casts and reshapes to the router's scores
                producer = value.producer()
                if producer is None or producer in self.linear_nodes:
                    router = producer
                    break
                data = [v for v in producer.inputs if v is not None and not _is_const(v)]
                if len(data) != 1:
                    break
                value = data[0]
            if router is None:
                raise self.fail(f"the TopK at '{node.name}' picks from no linear's scores (a router)")
            routers[node] = router
        found: dict[ir.Node, list[ExpertTable]] = {router: [] for router in routers.values()}
        for node in self.graph:
            if gathered_table(node) is None or (topk := backward_first(node.inputs[1], lambda n: n in routers)) is None:
                continue
            matmul = next((u for u in _forward_uses(node.outputs[0], ("Transpose", "Reshape", "Squeeze", "Unsqueeze"))
                           if u.node.op_type == "MatMul"), None)
            if matmul is None:
                raise self.fail(f"the expert table gathered at '{node.name}' is not multiplied by the token's input")
            tables = found[routers[topk]]
            tables.append(ExpertTable("", node, 2 if matmul.idx == 0 else 1, matmul.node))
        for node in self.graph:  # a whole block a target lowered to one node
            if (lowered := self.forms.experts(node)) is not None and (router := lowered[0].producer()) in self.linear_nodes:
                found[router] = [ExpertTable("", node, 2, None, index, lowered[2]) for index in lowered[1]]
        for router, tables in found.items():
            if not tables:
                raise self.fail(f"the router at '{router.name}' picks experts, but no expert weight table is gathered at its choice")
        return found

    def fail(self, what: str) -> errors.UnsupportedModelError:
        return errors.UnsupportedModelError(
            f"not a supported decoder-only LLM graph: {what}. qcompile handles transformer decoders "
            "(pre-, post- or sandwich RMSNorm/LayerNorm; q/k/v or fused qkv attention; gated, fused or GELU MLP; "
            "sequential or parallel blocks) exported by `qcompile export`"
        )

    def is_dynamic_matmul(self, node: ir.Node) -> bool:
        """An attention MatMul (not a linear, a router, or an expert's weight times its input) or attention op."""
        return ((node.op_type == "MatMul" and node not in self.linear_nodes and node not in self.expert_matmuls
                 and node not in self.experts) or node.op_type in self.attention_ops)

    def embedding(self) -> ir.Node:
        graph_inputs = [v for v in self.graph.inputs if v.name == "input_ids"] or list(self.graph.inputs)
        for node in self.graph:
            if (node.op_type != "Gather" and node.op_type not in self.forms.embeddings) or (
                    skip_back(node.inputs[1], ops=("Reshape", "Cast")) not in graph_inputs):
                continue
            table = node.inputs[0]
            if (p := table.producer()) is not None and p.op_type in ("DequantizeLinear", "Reshape"):
                table = p.inputs[0]  # a quantized table, or a linear's lowered weight read as one (shared with lm_head)
            if _is_const(table):
                return node
        raise self.fail("no token-embedding Gather reading a graph input was found")

    def lm_head(self) -> tuple[ir.Node, float | None]:
        """lm_head, through its bias and a final logit softcap c·tanh(x / c); and c, if there is one."""
        if not self.graph.outputs:
            raise self.fail("the graph has no outputs")
        value, ops = self.graph.outputs[0], []
        while (node := value.producer()) is not None and node not in self.linear_nodes:
            data = [v for v in node.inputs if v is not None and not _is_const(v)]
            if node.op_type not in ("Cast", "Identity", "Reshape", "Tanh", "Add", "Mul", "Div") or len(data) != 1:
                break
            ops.append(node)
            value = data[0]
        if node is None or node not in self.linear_nodes:
            raise self.fail(f"the first output '{self.graph.outputs[0].name}' is not produced by a linear (lm_head)")
        kinds = [n.op_type for n in ops if n.op_type in ("Tanh", "Mul", "Div")]
        softcap = None
        if kinds == ["Mul", "Tanh", "Div"]:
            outer, inner = (_constant_scalar(next(v for v in n.inputs if _is_const(v)))
                            for n in ops if n.op_type in ("Mul", "Div"))
            softcap = outer if outer is not None and outer == inner else None
        return node, softcap

    def stream(self, node: ir.Node) -> tuple[ir.Value, Norm | None]:
        """The value a linear reads its input from: its pre-norm's input (and the norm), or its own input."""
        norm = match_norm(node.inputs[0], self.forms)
        if norm is not None:
            norm = self.shared_norms.setdefault(norm.node, norm)  # one Norm per norm node, shared by its readers
            return norm.input, norm
        return skip_back(node.inputs[0], ops=self.between + ("Cast", "Identity")), None

    def run(self) -> ModelMap:
        embedding = self.embedding()
        head_node, softcap = self.lm_head()
        final_norm = match_norm(head_node.inputs[0], self.forms)
        if final_norm is None:
            raise self.fail("no norm (RMSNorm/LayerNorm) feeds lm_head")
        nodes = sorted((n for n in self.linear_nodes if n is not head_node), key=self.order.get)
        stop = lambda n: n in self.linear_nodes or self.is_dynamic_matmul(n)  # noqa: E731
        first_hit = {n: _forward_first(n.outputs[0], stop, through=self.between) for n in nodes}
        attention_inputs: dict[ir.Value, list[ir.Node]] = {}
        for node in nodes:
            hit = first_hit[node]
            if hit is not None and self.is_dynamic_matmul(hit[0]):
                attention_inputs.setdefault(self.stream(node)[0], []).append(node)
        if not attention_inputs:
            raise self.fail("no linear reaching an attention MatMul (q, k, v) was found")
        blocks, used = [], set()
        for i, (stream, qkv) in enumerate(attention_inputs.items()):
            linears, probs = self.attention_roles(i, qkv)
            blocks.append((i, stream, linears, probs))
            used.update(lin.node for lin in linears.values())
        rest = [n for n in nodes if n not in used]
        downs: dict[ir.Node, list[ir.Node]] = {}
        for node in rest:
            hit = first_hit[node]
            if hit is not None and hit[0] in rest and hit[0] is not node:
                downs.setdefault(hit[0], []).append(node)
        downs = {d: ups for d, ups in downs.items() if d not in {u for us in downs.values() for u in us}}
        mlps: dict[int, tuple[ir.Node, list[ir.Node], bool]] = {}  # block → (down, its inputs' linears, parallel)
        streams = {stream: i for i, stream, _, _ in blocks}
        o_positions = [self.order[linears[Role.O].node] for _, _, linears, _ in blocks]
        for down, ups in downs.items():
            first = min(ups, key=self.order.get)
            index = streams.get(self.stream(first)[0])
            parallel = index is not None
            if index is None:
                index = max((i for i, pos in enumerate(o_positions) if pos < self.order[first]), default=None)
            if index is None or index in mlps:
                raise self.fail(f"the MLP at '{down.name}' belongs to no block (or a block has two)")
            mlps[index] = (down, ups, parallel)
        experts = {}
        for router, tables in self.experts.items():
            index = max((i for i, pos in enumerate(o_positions) if pos < self.order[router]), default=None)
            if index is None or index in experts:
                raise self.fail(f"the router at '{router.name}' belongs to no block (or a block has two)")
            for j, table in enumerate(tables):
                table.name = f"blocks.{index}.experts.{j}"
            experts[index] = Experts(router, tables)
        out = []
        for i, stream, linears, probs in blocks:
            if i not in mlps and i not in experts:
                raise self.fail(f"block {i}: no MLP (up → down linears, or experts) after its attention")
            parallel = False
            if i in mlps:
                down, ups, parallel = mlps[i]
                linears.update(self.mlp_roles(i, ups, down))
            writers = [lin for role in (Role.O, Role.DOWN) if (lin := linears.get(role)) is not None]
            branch = [n for lin in writers if (n := self.branch_norm(lin)) is not None]
            window = self.windows[i] if i < len(self.windows) and self.windows[i] else None
            out.append(Block(i, stream, None, linears, probs, branch, parallel, window, experts.get(i),
                             _attention(probs, set(self.graph.outputs))))
        for block, after in zip(out, out[1:]):
            block.output = after.input
        out[-1].output = final_norm.input
        k, n = self.linear_nodes[head_node]
        tied = head_node.op_type == "MatMul" and _weight_initializer(head_node) is embedding.inputs[0]
        lm_head = Linear("lm_head", Role.LM_HEAD, None, head_node, k, n, final_norm, bias=_bias_after(head_node, n),
                         lowered=self.stored(head_node))
        uses = list(embedding.outputs[0].uses())
        scaled = _scalar_factor(uses[0].node) if len(uses) == 1 and uses[0].node.op_type in ("Mul", "Div") else None
        return ModelMap(embedding, out, final_norm, lm_head, tied, softcap, scaled[1] if scaled is not None else None)

    def stored(self, node: ir.Node) -> str | None:
        return self.lowered[node][2] if node in self.lowered else None

    def linear(self, block: int, role: Role, node: ir.Node, parts=None) -> Linear:
        k, n = self.linear_nodes[node]
        return Linear(f"blocks.{block}.{role.value}", role, block, node, k, n, self.stream(node)[1], parts=parts,
                      bias=_bias_after(node, n), lowered=self.stored(node))

    def attention_roles(self, i: int, nodes: list[ir.Node]) -> tuple[dict[Role, Linear], ir.Value | None]:
        """q, k, v (or the fused qkv) and o of block i, and the attention probabilities."""
        if len(nodes) == 1 and _packed_qkv(nodes[0], self.forms) is not None:
            return self.packed_attention_roles(i, nodes[0]), None
        if len(nodes) == 1:
            node = nodes[0]
            pieces = _output_parts(node, self.linear_nodes[node][1]) or [(node.outputs[0], None)]
            reached = {piece: self.attention_hit(i, value) for value, piece in pieces}
            roles = self.qkv_roles(i, reached)
            contiguous = len(pieces) == 3 and all(piece is not None for piece in roles)
            parts = {role: piece for piece, role in roles.items()} if contiguous else None
            linears = {Role.QKV: self.linear(i, Role.QKV, node, parts)}
        elif len(nodes) == 3:
            reached = {node: self.attention_hit(i, node.outputs[0]) for node in nodes}
            roles = self.qkv_roles(i, reached)
            linears = {role: self.linear(i, role, node) for node, role in roles.items()}
        else:
            raise self.fail(f"block {i}: {len(nodes)} linears reach the attention (expected q, k, v or one fused qkv)")
        targets = [target for target, _ in reached.values()]
        context = next((t for t in targets if t.op_type in self.attention_ops or _softmax_before(t) is not None), None)
        context = context or self.context(i, targets[0])
        o_hit = _forward_first(context.outputs[0], lambda n: n in self.linear_nodes)
        if o_hit is None:
            raise self.fail(f"block {i}: no output projection after attention")
        linears[Role.O] = self.linear(i, Role.O, o_hit[0])
        return linears, _softmax_before(context)

    def attention_hit(self, i: int, value: ir.Value) -> tuple[ir.Node, int]:
        hit = _forward_first(value, self.is_dynamic_matmul)
        if hit is None:
            raise self.fail(f"block {i}: a query/key/value projection reaches no attention MatMul")
        return hit

    def qkv_roles(self, i: int, reached: dict) -> dict:
        """key → Q, K or V from where each reaches the attention: q and k meet at the scores MatMul, v alone
        at the context MatMul (or a fused attention op's inputs 0, 1, 2)."""
        roles = {}
        for key, (target, idx) in reached.items():
            if target.op_type in self.attention_ops:
                roles[key] = (Role.Q, Role.K, Role.V)[idx]
            else:
                shared = sum(1 for t, _ in reached.values() if t is target)
                roles[key] = Role.V if shared == 1 else (Role.Q, Role.K)[idx]
        if len(reached) == 3 and sorted(roles.values()) != sorted((Role.Q, Role.K, Role.V)):
            raise self.fail(f"block {i}: could not tell q, k and v apart")
        return roles

    def context(self, i: int, scores: ir.Node) -> ir.Node:
        """The probabilities·V MatMul after the scores MatMul `scores`."""
        hit = _forward_first(scores.outputs[0], lambda n: n.op_type == "Softmax")
        if hit is not None:
            context = _forward_first(hit[0].outputs[0], self.is_dynamic_matmul)
            if context is not None:
                return context[0]
        raise self.fail(f"block {i}: no softmax(q·kᵀ)·v after the projections")

    def packed_attention_roles(self, i: int, node: ir.Node) -> dict[Role, Linear]:
        """q, k and v as column ranges of one packed linear: [q heads | kv heads | kv heads] × head size."""
        attention, (heads, kv_heads) = _packed_qkv(node, self.forms)
        k, n = self.linear_nodes[node]
        norm = self.stream(node)[1]
        head = n // (heads + 2 * kv_heads)
        bounds = {Role.Q: (0, heads * head), Role.K: (heads * head, (heads + kv_heads) * head),
                  Role.V: ((heads + kv_heads) * head, n)}
        out = {role: Linear(f"blocks.{i}.{role.value}", role, i, node, k, stop - start, norm, (start, stop),
                            bias=_bias_after(node, n), lowered=self.stored(node))
               for role, (start, stop) in bounds.items()}
        o_hit = _forward_first(attention.outputs[0], lambda n: n in self.linear_nodes)
        if o_hit is None:
            raise self.fail(f"block {i}: no output projection after attention")
        out[Role.O] = self.linear(i, Role.O, o_hit[0])
        return out

    def mlp_roles(self, i: int, nodes: list[ir.Node], down: ir.Node) -> dict[Role, Linear]:
        def only_mul(value):
            uses = list(value.uses())
            return len(uses) == 1 and uses[0].node.op_type == "Mul"

        out = {Role.DOWN: self.linear(i, Role.DOWN, down)}
        if len(nodes) == 2:
            ups = [n for n in nodes if only_mul(n.outputs[0])]
            if len(ups) != 1:
                raise self.fail(f"block {i}: could not tell the MLP gate and up projections apart")
            gate = nodes[0] if nodes[1] is ups[0] else nodes[1]
            return {Role.GATE: self.linear(i, Role.GATE, gate), Role.UP: self.linear(i, Role.UP, ups[0]), **out}
        if len(nodes) != 1:
            raise self.fail(f"block {i}: {len(nodes)} linears feed the down projection (expected gate and up, or one)")
        node = nodes[0]
        pieces = _output_parts(node, self.linear_nodes[node][1])
        if pieces is None:
            return {Role.UP: self.linear(i, Role.UP, node), **out}
        if len(pieces) != 2:
            raise self.fail(f"block {i}: the fused MLP projection is cut into {len(pieces)} pieces (expected gate, up)")
        up = [piece for value, piece in pieces if only_mul(value)]
        parts = None
        if len(up) == 1 and up[0] is not None and all(p is not None for _, p in pieces):
            gate = next(p for _, p in pieces if p != up[0])
            parts = {Role.GATE: gate, Role.UP: up[0]}
        return {Role.GATE_UP: self.linear(i, Role.GATE_UP, node, parts), **out}

    def branch_norm(self, linear: Linear) -> Norm | None:
        """A norm on `linear`'s output before the residual add (a post- or sandwich norm), or None."""
        skips = self.forms.skip_norms

        def norm_at(node: ir.Node) -> Norm | None:
            if node.op_type not in _FUSED_NORMS and node.op_type not in self.forms.norms and node.op_type != "Mul":
                return None
            norm = match_norm(node.outputs[0], self.forms)
            return norm if norm is not None and norm.node is node else None

        hit = _forward_first(linear.node.outputs[0], lambda n: n.op_type in skips or n in self.linear_nodes or (
            n.op_type == "Add" and not any(map(_is_const, n.inputs))) or norm_at(n) is not None)
        return None if hit is None or hit[0].op_type in skips else norm_at(hit[0])


def analyze(model: ir.Model, forms: LoweredForms = NO_FORMS) -> ModelMap:
    """Return the ModelMap of `model`, or raise UnsupportedModelError naming what was not found. A model a
    target lowered reads with that target's `forms` (`Target.forms`)."""
    return _Analyzer(model, forms).run()
