"""Calibration: run ONNX Runtime on a graph with taps on chosen tensors and stream statistics.

For every tapped tensor x (flattened to [tokens, K]) it accumulates, window by window, the per-channel
max |x| and mean |x| and, if asked, the Hessian H = Σ xᵀx in float64 — never holding the activations of
more than one window. Linears that read the same tensor (q/k/v, gate/up) share one tap.

Attention-weighted Hessians (for v): the attention output at query i is Σ_t p_it·v_t, so an error e_t in
token t's value reaches the output with weight Σ_i p_it² (summed over heads). Sink tokens that every query
attends to dominate; an unweighted H counts them once in 512 and GPTQ would dump error on them.
`H_att = Σ_t w_t·x_tᵀx_t` with w_t = Σ_{h,i} p_hit² / heads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import tempfile

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qcompile import errors, evaluation, experts
from qcompile.analysis import Role, analyze
from qcompile.runtime import Decoder

DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512
START_INPUT = "qcompile_calibration_start"


@dataclasses.dataclass
class TapStats:
    absmax: np.ndarray  # [K]
    abssum: np.ndarray  # [K], Σ|x| (float64)
    hessian: np.ndarray | None  # [K, K], Σ xᵀx (float64)
    sqsum: np.ndarray  # [K], Σx² (float64)
    tokens: int = 0
    rows: list[np.ndarray] = dataclasses.field(default_factory=list)  # sampled token rows [r, K] per window
    first: np.ndarray | None = None  # [K], Σ over windows of the first position's row (float64)
    windows: int = 0
    high: np.ndarray | None = None  # [K], the largest value (signed)
    low: np.ndarray | None = None  # [K], the smallest

    @property
    def samples(self) -> np.ndarray:
        """The sampled rows as one [R, K] array (empty unless `collect` was asked for rows)."""
        return np.concatenate(self.rows) if self.rows else np.zeros((0, self.absmax.shape[0]), np.float32)

    def scale_channels(self, s: np.ndarray) -> None:
        """The statistics of x / s (a per-channel scale folded into x's producer): exact, no new run."""
        self.absmax /= s
        self.abssum /= s
        self.sqsum /= s * s
        if self.hessian is not None:
            self.hessian /= np.outer(s, s)
        self.rows = [r / s for r in self.rows]
        if self.first is not None:
            self.first /= s
        if self.high is not None:
            self.high, self.low = self.high / s, self.low / s

    @property
    def absmean(self) -> np.ndarray:
        return self.abssum / max(self.tokens, 1)

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(self.sqsum / max(self.tokens, 1))

    def add(self, x: np.ndarray, token_weights: np.ndarray | None = None, rows: int = 0,
            envelope: np.ndarray | None = None, first: bool = True) -> None:
        """One window's rows x [..., K]; `envelope` (x's shape), where given, stands for |x| in the max (`rope_envelope`);
        `first`: x's first row is a sequence's first position (summed in `first`, counted in `windows`)."""
        x = x.reshape(-1, x.shape[-1])
        if first:
            self.first = x[0].astype(np.float64) + (0 if self.first is None else self.first)
            self.windows += 1
        if rows:
            pick = np.random.default_rng(self.tokens).choice(x.shape[0], min(rows, x.shape[0]), replace=False)
            self.rows.append(x[np.sort(pick)].copy())
        high, low = x.max(axis=0), x.min(axis=0)
        self.high = high if self.high is None else np.maximum(self.high, high)
        self.low = low if self.low is None else np.minimum(self.low, low)
        magnitude = np.abs(x)
        np.maximum(self.absmax, (magnitude if envelope is None else envelope.reshape(x.shape)).max(axis=0), out=self.absmax)
        self.abssum += magnitude.sum(axis=0, dtype=np.float64)
        self.sqsum += np.square(x).sum(axis=0, dtype=np.float64)
        if self.hessian is not None:
            weighted = x if token_weights is None else x * token_weights.reshape(-1, 1)
            self.hessian += (weighted.T @ x).astype(np.float64)  # one window in float32, the sum in float64
        self.tokens += x.shape[0]


def rope_envelope(x: np.ndarray, head_dim: int, rotated: int) -> np.ndarray:
    """|x| for keys after RoPE (x [..., heads · head_dim], head-major), with the channels of each rotate-half pair
    (c, c + rotated/2 of each head's first `rotated`) both replaced by the pair's magnitude √(x_c² + x_{c+rotated/2}²).
    RoPE turns every pair by an angle that grows with the position, so a channel's largest value over a 512-token
    window can be far below what the same content reaches further on (a pair turning once in 4000 positions barely
    moves within 512); the pair's magnitude is the same at every position."""
    shape = x.shape
    x = x.reshape(*shape[:-1], -1, head_dim)
    out, half = np.abs(x), rotated // 2
    out[..., :half] = out[..., half:rotated] = np.hypot(x[..., :half], x[..., half:rotated])
    return out.reshape(shape)


def calibration_windows(tokenizer, file: str | pathlib.Path | None = None, samples: int = DEFAULT_SAMPLES,
                        seqlen: int = DEFAULT_SEQLEN) -> np.ndarray:
    """[samples, seqlen] token windows: WikiText-2 valid.txt by default, or a text / JSONL file
    (one {"text": ...} per line), cut into consecutive non-overlapping windows."""
    if file is None:
        text = evaluation.wikitext("valid")
    else:
        path = pathlib.Path(file)
        if not path.is_file():
            raise errors.SourceNotFoundError(f"calibration file '{file}' not found")
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            try:
                text = "\n\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
            except (json.JSONDecodeError, KeyError, TypeError):
                raise errors.InputError(f"'{file}': every JSONL line must be an object with a \"text\" field") from None
        else:
            text = raw
    ids = evaluation.leading_ids(tokenizer, text, samples * seqlen)
    available = len(ids) // seqlen
    if available == 0:
        raise errors.InputError(
            f"calibration text has {len(ids)} tokens, fewer than one window of {seqlen}: give more text or a smaller --calib-seqlen"
        )
    if samples > available:
        raise errors.InputError(
            f"calibration text has {available} windows of {seqlen} tokens, fewer than --calib-samples {samples}: "
            "give more text or ask for fewer samples"
        )
    return ids[: samples * seqlen].reshape(samples, seqlen)


def attention_key(tap: str) -> str:
    """The stats key of `tap`'s attention-weighted statistics."""
    return f"{tap}|attention"


def expert_key(tap: str, expert: int) -> str:
    """The stats key of `tap`'s statistics over the rows routed to `expert`."""
    return f"{tap}|expert{expert}"


@contextlib.contextmanager
def tapped_session(model: ir.Model, outputs: list[ir.Value], start: ir.Value | None = None):
    """A Decoder over a pruned copy of `model` whose graph outputs are `outputs` (values of `model`).

    With `start`, that value becomes a graph input named START_INPUT (fed per window by the caller), so
    only what lies between it and `outputs` runs: one block of a model whose earlier blocks changed. The
    copy shares `model`'s tensors and is saved to a temporary folder that lasts as long as the `with`.
    """
    copy = model.clone()
    experts.group(copy)  # here, before the one save (Decoder would group a second copy); the taps are kept
    values = ir.convenience.create_value_mapping(copy.graph)
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(dict.fromkeys(values[v.name] for v in outputs))
    if start is not None:
        fed = ir.Value(name=START_INPUT, shape=start.shape, type=start.type)
        old = values[start.name]
        if old in copy.graph.outputs:  # a tap on the start itself (linears reading the block's input stream)
            tap = ir.node("Identity", [fed], name=f"{START_INPUT}_tap")
            tap.outputs[0].name, tap.outputs[0].shape, tap.outputs[0].type = f"{old.name}_tap", old.shape, old.type
            copy.graph.append(tap)
            copy.graph.outputs[list(copy.graph.outputs).index(old)] = tap.outputs[0]
            old.name, tap.outputs[0].name = f"{old.name}_replaced", old.name
        ir.convenience.replace_all_uses_with(old, fed)
        copy.graph.inputs.append(fed)
    RemoveUnusedNodesPass()(copy)
    with tempfile.TemporaryDirectory(prefix="qcompile-calib-") as tmp:
        ir.save(copy, pathlib.Path(tmp) / "model.onnx", external_data="model.onnx.data")
        del copy
        decoder = Decoder(pathlib.Path(tmp) / "model.onnx")
        try:
            yield decoder
        finally:
            del decoder


def shifts(windows: np.ndarray, positions: int) -> np.ndarray:
    """Each window's position offset for taps that depend on absolute positions (`Request.positions`): 0 for every
    other window, else uniform in [0, positions − window length] (seeded). A window's tokens then sit where a long
    context puts them: RoPE turns a key by an angle that grows with its position, and some of its channel pairs
    turn through less than a radian in 512 positions and several in 4000. RoPE's scores depend only on relative
    positions, so the rest of the model computes the same as unshifted."""
    offsets = np.random.default_rng(0).integers(0, max(positions - windows.shape[1], 0) + 1, len(windows))
    offsets[::2] = 0
    return offsets


def _runs(decoder: Decoder, names: list[str], windows: np.ndarray, start: np.ndarray | None,
          offsets: np.ndarray | None = None):
    """Each window's outputs `names` (a dict), the window fed as a prompt with an empty cache; with
    `start`, window i also feeds START_INPUT = start[i]; with `offsets`, at positions shifted by offsets[i]."""
    for i, window in enumerate(windows):
        feeds = decoder.feeds(window[None], decoder.empty_cache(), 0)
        if start is not None:
            feeds[START_INPUT] = start[i][None]
        if offsets is not None:
            feeds["position_ids"] = feeds["position_ids"] + offsets[i]
        yield dict(zip(names, decoder.session.run(names, feeds)))


def values(model: ir.Model, value: ir.Value, windows: np.ndarray, start: tuple[ir.Value, np.ndarray] | None = None,
           progress=None, label: str = "Propagating") -> np.ndarray:
    """`value` for every window, stacked [windows, ...] (float32; a [128, 512, 576] hidden state is 151 MB).

    `start` = (value, its arrays per window) computes from there instead of from the token ids."""
    start_value, start_arrays = start if start is not None else (None, None)
    advance = progress.task(label, len(windows)) if progress else (lambda: None)
    out = []
    with tapped_session(model, [value], start_value) as decoder:
        for run in _runs(decoder, [value.name], windows, start_arrays):
            out.append(run[value.name][0])
            advance()
    return np.stack(out)


@dataclasses.dataclass
class Request:
    """What one pass needs from a calibration run: statistics of `taps`, with Hessians if `hessian`, that
    many sampled `rows` per window, and attention-weighted statistics for the taps `attention` maps to
    attention probabilities (see the module docstring). `linears`: the linears whose inputs the taps are,
    for `linear_hessians`. `per_head`: the taps are [batch, heads, seq, head_dim] (a KV cache's new keys
    or values) and their channels are the (head, dim) pairs, head-major. `rope`: per-head taps of keys after
    RoPE → the rotated channels of each head; their absmax is taken over `rope_envelope`. `positions`: the taps
    depend on where in a context of that many positions their tokens sit (keys after RoPE, queries): every second
    window then runs at positions shifted by a seeded offset (`shifts`), and these taps leave out the shifted
    windows' first position, a sequence start no real context has there. `experts`: for a tap
    that is the input of a mixture of experts' MatMul (one row per token and chosen expert), the value holding
    each row's expert index: its statistics are kept per expert, under `expert_key(tap, e)`."""

    taps: list[ir.Value]
    hessian: bool = False
    rows: int = 0
    attention: dict[str, ir.Value] = dataclasses.field(default_factory=dict)
    linears: list = dataclasses.field(default_factory=list)
    per_head: bool = False
    rope: dict[str, int] = dataclasses.field(default_factory=dict)
    positions: int = 0
    experts: dict[str, ir.Value] = dataclasses.field(default_factory=dict)


def linear_request(model: ir.Model, linears: list) -> Request:
    """Hessians of the inputs of `linears` (analysis.Linear); a v projection's attention-weighted when its
    block's attention probabilities are known."""
    probs = {b.index: b.attention_probs for b in analyze(model).blocks if b.attention_probs is not None}
    attention = {lin.node.inputs[0].name: probs[lin.block] for lin in linears if lin.role == Role.V and lin.block in probs}
    return Request(list(dict.fromkeys(lin.node.inputs[0] for lin in linears)), hessian=True, attention=attention,
                   linears=list(linears))


def linear_hessians(stats: dict[str, "TapStats"], request: Request) -> dict[str, np.ndarray]:
    """Hessian by linear name from the stats of a run that served `request` (a `linear_request`)."""
    def key(lin) -> str:
        tap = lin.node.inputs[0].name
        return attention_key(tap) if lin.role == Role.V and tap in request.attention else tap

    return {lin.name: stats[key(lin)].hessian for lin in request.linears}


def run(model: ir.Model, requests: list[Request], windows: np.ndarray, progress=None, label: str = "Calibrating",
        start: tuple[ir.Value, np.ndarray] | None = None, keep: ir.Value | None = None,
        ) -> tuple[dict[str, "TapStats"], np.ndarray | None]:
    """One ORT run over `windows` serving every request: (stats keyed by tap name, and `keep`'s value for
    every window stacked as `values` stacks it, or None). Taps shared by requests are measured once, with
    the union of what they ask. ORT runs a pruned copy that computes only the taps (from `start`, as in
    `values`, when given)."""
    taps = list(dict.fromkeys(t for r in requests for t in r.taps))
    hessian = {t.name for r in requests if r.hessian for t in r.taps}
    rows = {t.name: max(r.rows for r in requests if t in r.taps) for t in taps}
    attention = {k: v for r in requests for k, v in r.attention.items()}
    per_head = {t.name for r in requests if r.per_head for t in r.taps}
    rope = {k: v for r in requests for k, v in r.rope.items()}
    positioned = {t.name for r in requests if r.positions for t in r.taps}
    offsets = shifts(windows, max(r.positions for r in requests)) if positioned else None
    experts = {k: v for r in requests for k, v in r.experts.items()}
    wanted = list(dict.fromkeys([*taps, *attention.values(), *experts.values(), *([keep] if keep is not None else [])]))
    names = [t.name for t in wanted]
    start_value, start_arrays = start if start is not None else (None, None)
    stats: dict[str, TapStats] = {}
    kept = []
    advance = progress.task(label, len(windows)) if progress else (lambda: None)
    with tapped_session(model, wanted, start_value) as decoder:
        offsets = offsets if decoder.positions else None  # positions computed inside the graph cannot be shifted
        for i, out in enumerate(_runs(decoder, names, windows, start_arrays, offsets)):
            for tap in taps:
                x = out[tap.name]
                head_dim = x.shape[-1]
                if tap.name in per_head:
                    x = x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
                shifted = offsets is not None and tap.name in positioned and offsets[i] > 0
                if shifted:
                    x = x[:, 1:]
                envelope = rope_envelope(x, head_dim, rope[tap.name]) if tap.name in rope else None
                keys = [(tap.name, x, None)]
                if tap.name in attention:
                    probs = out[attention[tap.name].name]  # [1, heads, q, k]
                    keys.append((attention_key(tap.name), x, (probs**2).sum(axis=(1, 2)) / probs.shape[1]))
                if tap.name in experts:  # one row per (token, chosen expert): [rows, K] split by expert
                    index = out[experts[tap.name].name].reshape(-1)
                    x = x.reshape(index.shape[0], -1)
                    keys = [(expert_key(tap.name, int(e)), x[index == e], None) for e in np.unique(index)]
                for key, x, weights in keys:
                    if key not in stats:
                        k = x.shape[-1]
                        stats[key] = TapStats(np.zeros(k, np.float32), np.zeros(k, np.float64),
                                              np.zeros((k, k), np.float64) if tap.name in hessian else None,
                                              np.zeros(k, np.float64))
                    stats[key].add(x, weights, rows[tap.name] if weights is None else 0, envelope if key == tap.name else None,
                                   first=not shifted)
            if keep is not None:
                kept.append(out[keep.name][0])
            advance()
    return stats, np.stack(kept) if keep is not None else None


def collect(model: ir.Model, taps: list[ir.Value], windows: np.ndarray, hessian: bool = True,
            progress=None, label: str = "Calibrating", rows_per_window: int = 0) -> dict[str, TapStats]:
    """Statistics of `taps` (values of `model`) over `windows`, keyed by value name: `run` for one request.
    `rows_per_window` > 0 also keeps that many randomly chosen token rows of each window (seeded), for
    searches that need real activations (SmoothQuant's α), not only their statistics."""
    return run(model, [Request(taps, hessian, rows_per_window)], windows, progress, label)[0]


def linear_statistics(model: ir.Model, linears: list, windows: np.ndarray, progress=None,
                      label: str = "Calibrating", start: tuple[ir.Value, np.ndarray] | None = None,
                      keep: ir.Value | None = None,
                      ) -> tuple[dict[str, TapStats], dict[str, np.ndarray], np.ndarray | None]:
    """One calibration run for `linears` (analysis.Linear): (stats by input tap, Hessian by linear name,
    `keep`'s value for every window or None). `start`: as in `run` (GPTQ runs one block at a time);
    `keep`: a value computed in the same run (GPTQ takes the float block's output from it)."""
    request = linear_request(model, linears)
    stats, kept = run(model, [request], windows, progress, label, start, keep)
    return stats, linear_hessians(stats, request), kept
