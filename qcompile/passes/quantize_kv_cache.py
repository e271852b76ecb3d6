"""QuantizeKVCache: the keys and values a step appends to the KV cache, quantized with calibrated scales."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import analysis, custom_ops, errors
from qcompile.algorithms.hadamard import random_orthogonal
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
    Calibration windows are 512 tokens, but RoPE turns each key's channel pairs by angles that grow with the
    position (in SmolLM2 some pairs turn through less than a radian in 512 positions and several in 4000), so a
    channel's range at the start of a context says little about position 4000. Two things cover the whole
    `context` (the model's max_position_embeddings): for keys straight from RoPE, max |x| is each rotate-half
    pair's largest magnitude, the same at every position (`calibration.rope_envelope`); and every second
    calibration window runs at shifted positions (`calibration.shifts`), so the sampled key and query rows (the
    4-bit clip search and key transform) come from all over the context. (SmolLM2, RTN weights, positions 2048–4096
    of one WikiText-2 test sequence against the float cache: int8 +89 % perplexity before, +0.7 % after; int4
    +376 % before, +14.2 % after; bench_kv_cache.py.)

    At 4 bits the keys are also transformed before they are cached, where a block's attention is the
    decomposed softmax(q·kᵀ) that reads the cache: per KV head, k·A − μ is cached and its queries read q·A⁻ᵀ,
    so q·kᵀ changes only by q·μᵀ, the same for every key of a query, which the softmax ignores (with a
    softcap, tanh is not shift-invariant: there μ = 0). Exact in float; see `key_transform` for A. μ is the
    keys' mean, moved by less than half a step so that the first position's key, where attention sinks form
    (in SmolLM2 its spread across windows is a hundredth of other keys' and later layers give it up to half
    their attention), lies on the quantization grid and is cached almost exactly.

    With `center_values` (the pipeline sets it where QuaRot's rotations are on), 4-bit values are centered on
    that sink too: v − ν is cached, ν the first position's mean value over
    the calibration windows, and ν is added back to the attention output (heads merged, before o_proj): the
    probabilities of a query sum to 1, so Σ p·(v − ν) + ν = Σ p·v, exact in float. The sink's value is then
    cached as about 0, on the grid, where its rounding error would otherwise reach every query at the weight
    the sink gets (a third to a half in SmolLM2's later layers), while other positions' errors, spread over
    many keys, partly average out. Without a rotation the sink's value is large in a
    few channels, whose ranges centering widens (SmolLM2: by up to 1.83×, per-layer medians 1.00 to 1.14×), and on RTN weights it cost
    more than it saved (+6.29 → +6.97 % over the float cache, 128 windows), so unrotated values stay as they are.
    (benchmarks/bench_kv_cache.py, SmolLM2, perplexity over the same model with a float cache: the clip
    search took the 4-bit cache from +15.4 % to +13.8 %, and the 8-bit one from +0.00 % to +0.17 %, so 8 bits
    keep max |x|; the key transform then took 4 bits to +6.8 %; with QuaRot's rotations and GPTQ weights 4 bits
    cost +4.4 %, against +8.0 % before the transform, measured with an earlier GPTQ. All of these on 512-token
    windows before the calibration covered the context; with it: int8 +0.02 %, int4 +6.29 %, rotated +5.42 %.
    Centering the values on the sink then took the rotated GPTQ model's 4-bit cache from +5.42 % to +4.83 % on 128
    windows; on rotated 8-bit RTN weights, 32 windows, from +5.36 % to +4.32 %, where only putting the sink's
    value on the grid, a shift under half a step, gave +4.80 %.)
    """

    def __init__(self, bits: int, stats: dict[str, TapStats] | None = None, context: int | None = None,
                 center_values: bool = False):
        super().__init__()
        if bits not in (4, 8):
            raise errors.InputError(f"KV-cache bits={bits} is not supported: use 4 or 8")
        self.bits, self.stats, self.context, self.center_values = bits, stats, context, center_values

    def requires(self, model: ir.Model) -> None:
        cache_concats(analysis.analyze(model))

    def calibration_request(self, model: ir.Model) -> list[Request]:
        model_map = analysis.analyze(model)
        rope = {a.key_cache.inputs[1].name: a.rotary.dims or a.head_size(a.key_cache) for a in (b.attention for b in model_map.blocks)
                if a is not None and a.rotary is not None and a.head_size(a.key_cache) is not None}
        positions = self.context or 0
        caches = Request([concat.inputs[1] for _, concat in cache_concats(model_map)], rows=_ROWS if self.bits == 4 else 0,
                         per_head=True, rope=rope, positions=positions)
        queries = [attention.scores.inputs[0] for attention in self._transformed(model_map)]
        return [caches, *([Request(queries, rows=_QUERY_ROWS, per_head=True, positions=positions)] if queries else [])]

    def calibrated(self, stats: dict[str, TapStats], request) -> None:
        self.stats = stats

    def _transformed(self, model_map: analysis.ModelMap) -> list[analysis.Attention]:
        """At 4 bits, the attention of every block whose keys the cache stores transformed (see above)."""
        return [b.attention for b in model_map.blocks if self.bits == 4 and b.attention
                and b.attention.head_size(b.attention.key_cache) is not None]

    def call(self, model: ir.Model) -> Result:
        graph = model.graph
        if self.stats is None:
            raise errors.InputError("QuantizeKVCache needs calibration: run it after Calibrate(windows, [this pass])")
        qmax = 2 ** (self.bits - 1) - 1
        model_map = analysis.analyze(model)
        caches = cache_concats(model_map)
        transformed = {a.key_cache.outputs[0].name: self._transform_keys(graph, a.scores, a.key_cache, not a.softcapped, qmax)
                       for a in self._transformed(model_map)}
        centered = {b.attention.value_cache.outputs[0].name: self._center_values(graph, b, merged, qmax)
                    for b, merged in self._centered(model_map)}
        prepared = {**transformed, **centered}  # present name → the cached tensor's scales and largest magnitude
        amax = []
        for present, concat in caches:
            new = concat.inputs[1]
            shape = new.shape
            if present.name in prepared:
                scale, top = prepared[present.name]
            elif new.name in self.stats and shape is not None and all(isinstance(shape[i], int) for i in (1, 3)):
                scale, top = _scales(self.stats[new.name], qmax), float(self.stats[new.name].absmax.max())
            else:
                raise errors.UnsupportedModelError(f"no calibration statistics for the [batch, heads, seq, head_dim] "
                                                   f"keys or values '{new.name}' entering '{present.name}'")
            amax.append(top)
            node = custom_ops.static_node(new, _initializer(graph, f"{present.name}.kv_scale",
                                                            scale.reshape(1, shape[1], 1, shape[3])),
                                          self.bits, f"{present.name}.kv{self.bits}")
            graph.insert_before(concat, node)
            concat.replace_input_with(1, node.outputs[0])
        custom_ops.register(model, custom_ops.STATIC)
        record = {"bits": self.bits, "scales": "static, per KV head and channel",
                  "max_abs": [round(min(amax), 4), round(max(amax), 4)]}
        if transformed:
            record["keys"] = f"transformed per KV head before caching (k·A − μ, queries q·A⁻ᵀ) in {len(transformed)} blocks"
        if centered:
            record["values"] = f"centered on the first position's value before caching, added back after attention in {len(centered)} blocks"
        return Result(model, modified=bool(caches), record={"kv_cache": record})

    def _centered(self, model_map: analysis.ModelMap) -> list[tuple[analysis.Block, ir.Value]]:
        """With `center_values` at 4 bits, the blocks whose values the cache stores centered (see above), each with
        the merged attention output [batch, seq, heads · head_dim] that o_proj reads and ν is added back to."""
        if not (self.center_values and self.bits == 4):
            return []
        found = [(b, b.attention.merged_output(b.linears[analysis.Role.O].node.inputs[0])) for b in model_map.blocks
                 if b.attention and b.attention.heads and analysis.Role.O in b.linears]
        return [(b, merged) for b, merged in found if merged is not None]

    def _center_values(self, graph: ir.Graph, block: analysis.Block, merged: ir.Value, qmax: int) -> tuple[np.ndarray, float]:
        """Insert v − ν before the value cache and + ν on `merged`, ν the first position's mean value over the
        calibration windows (see the class docstring); returns the cached values' scales and largest magnitude."""
        concat = block.attention.value_cache
        values = concat.inputs[1]
        (heads, kv_heads), head_dim = block.attention.heads, values.shape[3]
        stats = self.stats[values.name]
        mean = stats.first / stats.windows
        top = np.maximum(stats.high - mean, mean - stats.low)
        scale = _clip_scales(stats.samples - mean, top, qmax)
        concat.replace_input_with(1, _subtract(graph, concat, values, mean, kv_heads, head_dim))
        name = concat.outputs[0].name
        back = np.repeat(mean.reshape(kv_heads, head_dim), heads // kv_heads, axis=0)  # query head j reads KV head j // group
        readers = list(merged.uses())
        add = ir.node("Add", [merged, _initializer(graph, f"{name}.mean_back", back.reshape(-1).astype(np.float32))],
                      name=f"{name}.uncenter")
        _like(add.outputs[0], merged, f"{name}.uncentered")
        for use in readers:
            use.node.replace_input_with(use.idx, add.outputs[0])
        graph.insert_after(merged.producer(), add)
        return scale, float(top.max())

    def _transform_keys(self, graph: ir.Graph, scores: ir.Node, concat: ir.Node, centered: bool,
                        qmax: int) -> tuple[np.ndarray, float]:
        """Insert k·A − μ before the key cache and q·A⁻ᵀ before the scores (see the class docstring); returns the
        cached keys' scales and largest sampled magnitude."""
        keys, queries = concat.inputs[1], scores.inputs[0]
        kv_heads, head_dim, heads = keys.shape[1], keys.shape[3], queries.shape[1]
        group = heads // kv_heads  # query head j reads KV head j // group
        k_stats = self.stats[keys.name]
        k = k_stats.samples.reshape(-1, kv_heads, head_dim).astype(np.float64)
        q = self.stats[queries.name].samples.reshape(-1, kv_heads, group, head_dim).astype(np.float64)
        a = np.stack([key_transform(q[:, h].reshape(-1, head_dim), k[:, h], centered) for h in range(kv_heads)])
        k = np.einsum("rhd,hde->rhe", k, a).reshape(len(k), -1)
        mean = np.zeros(k.shape[1])
        if centered:
            mean = k.mean(axis=0)
            first = np.einsum("hd,hde->he", (k_stats.first / k_stats.windows).reshape(kv_heads, head_dim), a).reshape(-1)
        rows = k - mean
        scale = _clip_scales(rows, np.abs(rows).max(axis=0), qmax).astype(np.float64)
        if centered:  # the first position's key on the grid
            mean = first - np.clip(np.rint((first - mean) / scale), -qmax - 1, qmax) * scale
        name = concat.outputs[0].name
        node = _per_head_matmul(graph, keys, a, f"{name}.transform")
        graph.insert_before(concat, node)
        cached = node.outputs[0]
        if centered:
            cached = _subtract(graph, concat, cached, mean, kv_heads, head_dim)
        concat.replace_input_with(1, cached)
        inverse = np.repeat(np.linalg.inv(a).transpose(0, 2, 1), group, axis=0)
        node = _per_head_matmul(graph, queries, inverse, f"{name}.query_transform")
        graph.insert_before(scores, node)
        scores.replace_input_with(0, node.outputs[0])
        return scale.astype(np.float32), float(np.abs(k - mean).max())


_ROWS = 64  # token rows sampled per calibration window for the 4-bit clip search and the key transform
_QUERY_ROWS = 16  # query rows per window for the key transform (each covers every query head of a KV head)
_RATIOS = np.linspace(1.0, 0.5, 11)
_RIDGE = 1e-3  # the key transform's covariances get this fraction of their mean variance added on the diagonal


def key_transform(queries: np.ndarray, keys: np.ndarray, centered: bool) -> np.ndarray:
    """A [d, d] for one KV head from sampled queries [n, d] and keys [m, d]: caching k·A (queries q·A⁻ᵀ)
    with a per-channel quantizer makes a score error (q·A⁻ᵀ)·eᵀ whose variance is about Σ_c Q_c·K_c, with
    Q = diag(A⁻¹·S_q·A⁻ᵀ), S_q = E[qᵀq], and K = diag(Aᵀ·S_k·A), S_k the keys' covariance (about their mean
    when `centered`, else E[kᵀk]), each channel's step growing with its spread. Over invertible A that sum is
    least, (Σ √m_i)² / d with m the eigenvalues of S_k^½·S_q·S_k^½ = U·diag(m)·Uᵀ, for
    A = S_k^-½·U·diag(m)^¼·R with R an orthogonal matrix of equal-magnitude entries (a Hadamard): both
    diagonals are then Σ √m_i / d. On SmolLM2's rotated model this halved the score error of held-out
    windows against the Hadamard alone (both centered)."""
    d = keys.shape[1]
    s_k = np.cov(keys, rowvar=False, bias=True) if centered else keys.T @ keys / len(keys)
    s_q = queries.T @ queries / len(queries)
    s_k, s_q = (s + _RIDGE * np.trace(s) / d * np.eye(d) for s in (s_k, s_q))
    w, v = np.linalg.eigh(s_k)
    root, inverse_root = (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T
    m, u = np.linalg.eigh(root @ s_q @ root)
    return inverse_root @ u @ np.diag(np.maximum(m, 0) ** 0.25) @ random_orthogonal(d, 0)


def _per_head_matmul(graph: ir.Graph, x: ir.Value, matrices: np.ndarray, name: str) -> ir.Node:
    """x [b, heads, s, d] times one [d, d] matrix per head (an Einsum: not a linear of the model map)."""
    node = ir.node("Einsum", [x, _initializer(graph, f"{name}.matrix", matrices.astype(np.float32))],
                   attributes={"equation": "bhsd,hde->bhse"}, name=name)
    _like(node.outputs[0], x, f"{name}.out")
    return node


def _subtract(graph: ir.Graph, concat: ir.Node, x: ir.Value, mean: np.ndarray, kv_heads: int, head_dim: int) -> ir.Value:
    """x − mean (one value per KV head and channel), inserted before the cache Concat `concat`."""
    name = concat.outputs[0].name
    node = ir.node("Sub", [x, _initializer(graph, f"{name}.mean", mean.reshape(1, kv_heads, 1, head_dim).astype(np.float32))],
                   name=f"{name}.center")
    _like(node.outputs[0], x, f"{name}.centered")
    graph.insert_before(concat, node)
    return node.outputs[0]


def _like(value: ir.Value, like: ir.Value, name: str) -> None:
    value.name, value.dtype, value.shape = name, like.dtype, like.shape


def _scales(stats: TapStats, qmax: int) -> np.ndarray:
    """Per channel, c · max|x| / qmax with the clip ratio c of `_RATIOS` that minimises the squared error of
    the sampled rows (c = 1 without rows: 8 bits)."""
    return _clip_scales(stats.samples, stats.absmax, qmax)


def _clip_scales(rows: np.ndarray, absmax: np.ndarray, qmax: int) -> np.ndarray:
    top = np.maximum(absmax, 1e-8) / qmax
    if not len(rows):
        return top.astype(np.float32)
    losses = [np.square(np.clip(np.rint(rows / (c * top)), -qmax - 1, qmax) * (c * top) - rows).sum(axis=0) for c in _RATIOS]
    return (top * _RATIOS[np.argmin(losses, axis=0)]).astype(np.float32)


def cache_concats(model_map: analysis.ModelMap) -> list[tuple[ir.Value, ir.Node]]:
    """Every block's KV-cache Concat(past, new) nodes (the ModelMap's `Block.attention`), key then value, each
    with the `present.*` output it produces; UnsupportedModelError naming a block without them."""
    caches = []
    for block in model_map.blocks:
        concats = (block.attention.key_cache, block.attention.value_cache) if block.attention else (None, None)
        if None in concats:
            raise errors.UnsupportedModelError(
                f"block {block.index}: its keys and values do not both enter a KV cache as Concat(past, new) producing "
                "a present.* output: export it with `qcompile export`")
        caches += [(concat.outputs[0], concat) for concat in concats]
    return caches
