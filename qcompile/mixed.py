"""Mixed precision: each linear's weight format chosen from measured sensitivity, under a size or accuracy budget.

    table = measure(model, linears, formats, windows, quantizer)   # what each (linear, format) costs alone
    chosen = fit_bits(table, 3.5)                                   # the least estimated loss within a size
    mixes = ladder(table)
    index = first_within([cost(table, m) for m in mixes], max_ppl_increase=5)  # the smallest mix estimated within +5 %

Sensitivity. Quantizing linear l alone in format f costs ΔNLL ≈ KL(p_float ‖ p_l,f) nats per token. For
every linear, the KL of one measured probe per bit width below 8 (the width's coarsest format, quantized
exactly as the compile will: RTN, or GPTQ from the float model's Hessians) is run on calibration tokens, with
the quantized weight fed to one ONNX Runtime session in place of the float one. The other formats of that
width (and the 8-bit ones, whose KL is too small to measure well) are scaled from it by GPTQ's weighted error
E_l(f) = tr(ΔWᵀ H ΔW) (the output error the format leaves on the calibration inputs):
cost_l(f) = KL_l(probe) · E_l(f) / E_l(probe). Costs add across linears
(the estimate of a mix is exp(Σ cost) - 1 of perplexity), which `benchmarks/bench_mixed_precision.py`
checks against measured perplexity.

Allocation. Each linear's (stored bits, cost) points are reduced to their lower convex hull; the steps up
every hull, merged in order of decreasing cost saved per bit, form one chain of mixes from the smallest to
the largest. A bits-per-weight budget takes the chain as far as it fits; a perplexity bound takes it until the
estimate meets the bound (the caller then measures, and moves on along the chain if the estimate was wrong).

Stored bits of a b-bit weight [K, N] in groups of g: b bits per code, a short last group padded to g as the
runtimes store it, plus a float32 scale per group and column (and a b-bit zero point when asymmetric); a float
weight: 32 bits each. (On SmolLM2, K = 576 is 4.5 groups of 128: int4 g128 stores 4.72 bits per weight there,
more than g64's 4.5.)
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import tempfile

import numpy as np
import onnx_ir as ir

from qcompile import analysis, calibration
from qcompile.runtime import Decoder
from qcompile.schemes import parse_format

FLOAT_BITS = 32
SCALE_BITS = 32
PROBE_WINDOWS = 2  # calibration windows each probe runs (of up to PROBE_TOKENS tokens)
PROBE_TOKENS = 128


def stored_bits(bits: int | None, group: int, k: int, n: int, symmetric: bool = True) -> int:
    """Bits a [K, N] weight takes in `bits`-bit groups of `group` along K (0: one group), or as float (None)."""
    if bits is None:
        return FLOAT_BITS * k * n
    groups = -(-k // group) if group else 1
    rows = groups * group if group else k  # a short last group is stored padded (MatMulNBits, TensorRT's whole blocks)
    return bits * rows * n + groups * n * (SCALE_BITS + (0 if symmetric else bits))


def bits_per_weight(layers: list[dict]) -> float | None:
    """Stored bits per weight over a manifest's `layers` (linears, expert tables, and the embedding table when quantized;
    a float linear counts its 32 bits); None when nothing was quantized."""
    total = count = 0
    quantized = False
    for entry in layers:
        *experts, k, n = entry["shape"]  # [K, N], or [E, K, N] for a table of experts
        copies = experts[0] if experts else 1
        if "bits" in entry:
            quantized = True
            total += copies * stored_bits(entry["bits"], entry["group_size"], k, n, entry.get("symmetric", True))
        elif entry.get("format", "").upper() in ("FLOAT", "FLOAT32"):
            total += copies * stored_bits(None, 0, k, n)
        else:
            continue
        count += copies * k * n
    return round(total / count, 4) if quantized else None


@dataclasses.dataclass
class Sensitivity:
    """What quantizing one linear alone costs, per format name: estimated ΔNLL (nats/token), GPTQ's weighted
    error, and the KL measured at each probe."""

    name: str
    shape: tuple[int, int]  # [K, N]
    cost: dict[str, float]
    error: dict[str, float]
    probes: dict[str, float]

    def bits(self, fmt: str) -> float:
        k, n = self.shape
        return stored_bits(*parse_format(fmt), k, n) / (k * n)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure(model: ir.Model, linears: list, formats: dict[str, list[str]], windows: np.ndarray, quantize,
            progress=None) -> list[Sensitivity]:
    """Sensitivity of each of `linears` (of the float `model`) in each of its `formats` (linear name → format
    names; "float" costs nothing). `quantize(linear, bits, group, hessian) -> QuantizedWeight`."""
    _, hessians, _ = calibration.linear_statistics(model, linears, windows, progress, "Calibrating (sensitivity)")
    probe_windows = windows[:PROBE_WINDOWS, :PROBE_TOKENS]
    advance = progress.task("Measuring sensitivity", len(linears)) if progress else (lambda: None)
    table = []
    with _ProbeSession(model, linears) as session:
        reference = session.log_probs(probe_windows, {})
        for linear in linears:
            w = linear.float_weight().astype(np.float32)
            h = hessians[linear.name]
            errors, probes, dequantized = {}, {}, {}
            for fmt in formats[linear.name]:
                bits, group = parse_format(fmt)
                if bits is None:
                    errors[fmt] = 0.0
                    continue
                dq = quantize(linear, bits, group, h).dequantize()
                delta = (w - dq).astype(np.float64)
                errors[fmt] = float(np.sum((h @ delta) * delta))
                dequantized[fmt] = dq
            widths = sorted({parse_format(f)[0] for f in dequantized})
            for bits in [b for b in widths if b < 8] or widths[:1]:
                probe = max((f for f in dequantized if parse_format(f)[0] == bits), key=errors.get)  # the coarsest
                probes[probe] = session.kl(probe_windows, reference, linear, dequantized[probe])
            cost = {}
            for fmt in formats[linear.name]:
                bits = parse_format(fmt)[0]
                if bits is None:
                    cost[fmt] = 0.0
                    continue
                # the probe of this width, else of the widest probed one (8-bit error is small: the KL is quadratic in it)
                probe = max(probes, key=lambda p: (parse_format(p)[0] == bits, parse_format(p)[0]))
                cost[fmt] = probes[probe] * (errors[fmt] / errors[probe] if errors[probe] > 0 else 0.0)
            table.append(Sensitivity(linear.name, (linear.in_features, linear.out_features), cost, errors, probes))
            advance()
    return table


class _Session:
    """One ONNX Runtime session over `copy` (a clone of a model, prepared so that probes are fed as overridable
    inputs: no session per probe). The copy is saved to a temporary folder that lasts as long as the `with`."""

    def __init__(self, copy: ir.Model):
        self.copy = copy

    def __enter__(self):
        ir.passes.common.RemoveUnusedNodesPass()(self.copy)
        self._tmp = tempfile.TemporaryDirectory(prefix="qcompile-probe-")
        path = pathlib.Path(self._tmp.name) / "model.onnx"
        ir.save(self.copy, path, external_data="model.onnx.data")
        del self.copy
        self.decoder = Decoder(path)
        return self

    def __exit__(self, *exc):
        del self.decoder
        self._tmp.cleanup()

    def log_probs(self, windows: np.ndarray, overrides: dict | None = None) -> np.ndarray:
        """log p [windows, tokens, vocab] (float32) with `overrides` fed (input name → array); all windows in one batch."""
        feeds = {**self.decoder.feeds(windows, self.decoder.empty_cache(len(windows)), 0), **(overrides or {})}
        logits = self.decoder.session.run(["logits"], feeds)[0].astype(np.float32)
        logits -= logits.max(axis=-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def kl(reference: np.ndarray, log_q: np.ndarray) -> float:
    """Mean KL(reference ‖ q) per token, in nats, from log-probabilities [..., vocab]."""
    return max(float(np.sum(np.exp(reference) * (reference - log_q), axis=-1, dtype=np.float64).mean()), 0.0)


class _ProbeSession(_Session):
    """A session over a copy of `model` whose linears' weights are overridable inputs. A tied lm_head gets a
    weight of its own (the embedding table stays float); a linear that is some columns of a fused projection
    is fed the whole fused weight with its columns replaced."""

    def __init__(self, model: ir.Model, linears: list):
        copy = model.clone()
        self.weights = {}  # linear name → (input name, float weight of the whole input, columns or None)
        nodes = {node.name: node for node in copy.graph}
        for linear in linears:
            node = nodes[linear.node.name]
            value = node.inputs[1]
            if value.const_value is None:  # a tied lm_head reads the embedding through a Transpose
                array = linear.float_weight().astype(np.float32)
                value = ir.Value(name=f"{linear.name}.probe_weight", shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                                 const_value=ir.Tensor(array))
                copy.graph.register_initializer(value)
                node.replace_input_with(1, value)
            if value not in copy.graph.inputs:
                copy.graph.inputs.append(value)
            self.weights[linear.name] = (value.name, value.const_value.numpy(), linear.columns)
        super().__init__(copy)

    def kl(self, windows: np.ndarray, reference: np.ndarray, linear, weight: np.ndarray) -> float:
        """Mean KL(float ‖ this linear's weight replaced by `weight`) per token, in nats."""
        name, full, columns = self.weights[linear.name]
        if columns is not None:
            full = full.copy()
            full[:, slice(*columns)] = weight
        else:
            full = weight
        return kl(reference, self.log_probs(windows, {name: np.ascontiguousarray(full, np.float32)}))


@dataclasses.dataclass
class InputSensitivity:
    """The activation quantizers of one kind of linear in every block (`blocks.*.down`, the q/k/v projections'
    shared input, ...): the KL their quantization adds, measured as what keeping those inputs float removes with
    every other input quantized."""

    patterns: list[str]  # the linears as activations.float_inputs names them: blocks.*.down, ...
    linears: list[str]
    weights: int  # Σ K·N of its linears: what keeping them at float inputs costs in speed, roughly
    gain: float


def every_block(name: str) -> str:
    """A linear's name with its block index as a wildcard: blocks.3.down → blocks.*.down (lm_head stays)."""
    return re.sub(r"^blocks\.\d+\.", "blocks.*.", name)


def measure_inputs(model: ir.Model, float_model: ir.Model, windows: np.ndarray, progress=None) -> tuple[float, list[InputSensitivity]]:
    """(KL of `model`, each kind of static activation quantizer's gain): `model` is a canonical model with static
    QuantizeLinear → DequantizeLinear on its linears' inputs, `float_model` its float reference. The quantizers
    are grouped by the linears they feed, the same in every block (`every_block`), and each group is switched
    off at once: one at a time, quantizers measure badly (on SmolLM2's trt-int8, 20 of the 30 down projections'
    inputs, switched off alone, made the probe's KL larger, while all 30 together removed a third of it and took
    the perplexity from +1.27 % to -0.49 %). The gains are scaled to add up to what keeping every input float
    removes (measured too)."""
    with _Session(float_model.clone()) as session:
        reference = session.log_probs(windows)
    copy = model.clone()
    quantized = []  # (linear, its input's DequantizeLinear, QuantizeLinear), found before the graph changes
    for linear in analysis.analyze(copy).linears():
        dq = linear.node.inputs[0].producer()
        q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            quantized.append((linear, dq, q))
    readers: dict[str, list] = {}  # switch → the linears reading its quantizer
    for linear, dq, q in quantized:
        name = f"{dq.name}_on"
        if name not in readers:  # x → Where(on, DQ(Q(x)), x): an input switched off is read float
            on = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.BOOL), const_value=ir.tensor(True))
            copy.graph.register_initializer(on)
            copy.graph.inputs.append(on)
            where = ir.node("Where", [on, dq.outputs[0], q.inputs[0]], name=f"{dq.name}_switch")
            where.outputs[0].name, where.outputs[0].dtype, where.outputs[0].shape = f"{dq.name}_switched", dq.outputs[0].dtype, dq.outputs[0].shape
            ir.convenience.replace_all_uses_with(dq.outputs[0], where.outputs[0])
            where.replace_input_with(1, dq.outputs[0])
            copy.graph.insert_after(dq, where)
            readers[name] = []
        readers[name].append(linear)
    groups: dict[tuple[str, ...], InputSensitivity] = {}
    switches: dict[tuple[str, ...], list[str]] = {}  # group → the boolean inputs that switch its quantizers
    for name, linears in readers.items():
        key = tuple(sorted({every_block(linear.name) for linear in linears}))
        entry = groups.setdefault(key, InputSensitivity(list(key), [], 0, 0.0))
        entry.linears += [linear.name for linear in linears]
        entry.weights += sum(linear.in_features * linear.out_features for linear in linears)
        switches.setdefault(key, []).append(name)
    advance = progress.task("Measuring activation sensitivity", len(groups)) if progress else (lambda: None)
    with _Session(copy) as session:
        total = kl(reference, session.log_probs(windows))
        for key, entry in groups.items():
            off = {name: np.array(False) for name in switches[key]}
            entry.gain = total - kl(reference, session.log_probs(windows, off)) if len(groups) > 1 else 0.0
            advance()
        weights_only = kl(reference, session.log_probs(windows, {name: np.array(False) for name in readers}))
    # Gains measured one group at a time do not add up to switching every input off (errors interact): scale them so
    # that they do, so that keeping all inputs float is estimated at what it measures.
    measured = sum(max(entry.gain, 0.0) for entry in groups.values())
    for entry in groups.values():
        entry.gain = max(entry.gain, 0.0) * (total - weights_only) / measured if measured > 0 else (total - weights_only) / len(groups)
    return total, list(groups.values())


@dataclasses.dataclass
class Step:
    """One move along the chain: `name` goes from format `before` to `after`."""
    name: str
    before: str
    after: str
    bits: float  # total stored bits added
    cost: float  # estimated ΔNLL removed


def chain(table: list[Sensitivity]) -> tuple[dict[str, str], list[Step]]:
    """The smallest mix (each linear's fewest-bit format) and the steps up each linear's lower convex hull of
    (bits, cost), merged by decreasing cost saved per bit."""
    start, steps = {}, []
    for s in table:
        k, n = s.shape
        points = sorted((s.bits(f) * k * n, s.cost[f], f) for f in s.cost)
        hull = [points[0]]
        for p in points[1:]:
            if p[1] >= hull[-1][1]:
                continue  # more bits for no less cost
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], p):
                hull.pop()  # hull[-1] lies above the segment from hull[-2] to p
            hull.append(p)
        start[s.name] = hull[0][2]
        steps += [Step(s.name, a[2], b[2], b[0] - a[0], a[1] - b[1]) for a, b in zip(hull, hull[1:])]
    steps.sort(key=lambda step: -step.cost / step.bits)
    return start, steps


def _slope(a, b) -> float:
    """Cost saved per bit from hull point a to b."""
    return (a[1] - b[1]) / (b[0] - a[0])


def fit_bits(table: list[Sensitivity], bits_per_weight: float) -> dict[str, str] | None:
    """The mix of least estimated cost the chain builds within `bits_per_weight` (a step that does not fit is
    passed over for later, smaller ones); None when even the smallest mix does not fit."""
    start, steps = chain(table)
    mix, budget = dict(start), bits_per_weight * sum(s.shape[0] * s.shape[1] for s in table)
    bits = sum(_weight_bits(table, mix).values())
    if bits > budget:
        return None
    for step in steps:
        if mix[step.name] == step.before and bits + step.bits <= budget:
            mix[step.name] = step.after
            bits += step.bits
    return mix


def ladder(table: list[Sensitivity]) -> list[dict[str, str]]:
    """Every mix along the chain, smallest first (each one step more than the last)."""
    start, steps = chain(table)
    mixes = [dict(start)]
    for step in steps:
        mixes.append({**mixes[-1], step.name: step.after})
    return mixes


def first_within(costs: list[float], max_ppl_increase: float, scale: float = 1.0, after: int = -1) -> int | None:
    """The index of the first candidate past `after` whose estimated cost (log perplexity ratio, × `scale`, a
    correction measured on an earlier try) meets `max_ppl_increase` percent; None when none does."""
    target = math.log1p(max_ppl_increase / 100)
    return next((i for i in range(after + 1, len(costs)) if scale * costs[i] <= target), None)


def cost(table: list[Sensitivity], mix: dict[str, str]) -> float:
    """A mix's estimated cost: the log of its perplexity ratio to float."""
    return sum(_costs(table, mix).values())


def _weight_bits(table: list[Sensitivity], mix: dict[str, str]) -> dict[str, float]:
    return {s.name: s.bits(mix[s.name]) * s.shape[0] * s.shape[1] for s in table}


def _costs(table: list[Sensitivity], mix: dict[str, str]) -> dict[str, float]:
    return {s.name: s.cost[mix[s.name]] for s in table}


def estimate(table: list[Sensitivity], mix: dict[str, str]) -> dict:
    """A mix's stored bits per weight and estimated perplexity increase (percent)."""
    weights = sum(s.shape[0] * s.shape[1] for s in table)
    return {"bits_per_weight": round(sum(_weight_bits(table, mix).values()) / weights, 4),
            "estimated_ppl_increase_pct": round(100 * math.expm1(cost(table, mix)), 3)}
