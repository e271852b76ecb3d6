"""SmoothQuant (Xiao et al., 2023): move quantization difficulty from activations into weights.

Linears reading the same input x (q/k/v, gate/up, down) share a per-input-channel scale s:
x·W = (x/s)·(diag(s)·W). With s_k = max|x_k|^α / max_n|W_kn|^(1-α) (the weight max over every linear of
the group), channel k's activation range becomes max|x_k|^(1-α)·max|W_k|^(1-α) and its weight range
max|x_k|^α·max|W_k|^α: α = 0.5 splits an outlier channel's range evenly. 1/s is folded into whatever
produces x, so the float model is unchanged.

Activation quantization (the numpy reference of the graph's Q/DQ, used to choose α):
- int8 static: one scale per tensor, max|x| / 127 from calibration; q = clip(round(x/scale), -128, 127).
- fp8 static: one scale per tensor, max|x| / 448; x/scale rounded to the E4M3 grid.
- int8 dynamic: one scale per token (row), max|x_row| / 127, computed at run time.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qcompile.algorithms.rtn import FP8_MAX, fp8_values
from qcompile.schemes import ActivationKind

_MIN = 1e-5
ALPHAS = np.linspace(0.0, 1.0, 11)


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s [K] = max|x|^α / max|W|^(1-α), both clamped away from 0 (a dead channel keeps s = 1)."""
    a = np.maximum(np.asarray(act_absmax, np.float64), _MIN)
    w = np.maximum(np.asarray(weight_absmax, np.float64), _MIN)
    s = a**alpha / w ** (1 - alpha)
    s[(np.asarray(act_absmax) <= 0) | (np.asarray(weight_absmax) <= 0)] = 1.0
    return s.astype(np.float32)


def static_scale(absmax: float, kind: ActivationKind) -> float:
    """The per-tensor scale of a static activation quantizer from the calibrated max |x|."""
    top = FP8_MAX if kind == ActivationKind.FP8_STATIC else 127.0
    return float(max(absmax, _MIN) / top)


def search_static_scale(rows: np.ndarray, absmax: float, kind: ActivationKind,
                        ratios: np.ndarray = np.linspace(1.0, 0.3, 15)) -> tuple[float, float]:
    """(scale, ratio): the per-tensor scale ratio·max|x|/top minimising Σ (Q(x) - x)² over sampled `rows`
    (values beyond the clipped range saturate; ratio 1 is plain max calibration)."""
    best = (np.inf, static_scale(absmax, kind), 1.0)
    for ratio in ratios:
        scale = static_scale(absmax * ratio, kind)
        err = float(((fake_quantize(rows, kind, scale) - rows) ** 2).sum(dtype=np.float64))
        if err < best[0]:
            best = (err, scale, float(ratio))
    return best[1], best[2]


def fake_quantize(x: np.ndarray, kind: ActivationKind, scale: float | None = None) -> np.ndarray:
    """x quantized and dequantized as the graph does (`scale` for static kinds), float32."""
    x = np.asarray(x, np.float32)
    if kind == ActivationKind.NONE:
        return x
    if kind == ActivationKind.INT8_DYNAMIC:
        return quantize_per_token(x, 127.0)
    if kind == ActivationKind.INT4_DYNAMIC:
        return quantize_per_token(x, 7.0)
    scale = np.float32(scale)
    if kind == ActivationKind.FP8_STATIC:
        return fp8_values(x / scale).astype(np.float32) * scale
    return np.clip(np.rint(x / scale), -128, 127) * scale


def quantize_per_token(x: np.ndarray, qmax: float, clip: float = 1.0) -> np.ndarray:
    """Symmetric per-row fake quantization: scale = clip·max|row| / qmax (the qcompile op's reference)."""
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) * np.float32(clip) / np.float32(qmax), np.float32(1e-12))
    return (np.clip(np.rint(x / scale), -qmax, qmax) * scale).astype(np.float32)


def group_error(x: np.ndarray, act_absmax: np.ndarray, weights: list[np.ndarray], s: np.ndarray,
                kind: ActivationKind, quantize_weight: Callable[[np.ndarray], np.ndarray]) -> float:
    """Σ_i ||x·W_i - Q(x/s)·Q(diag(s)·W_i)||² over the sampled rows `x` (static scales from `act_absmax`)."""
    xs = x / s
    xq = fake_quantize(xs, kind, static_scale(float((act_absmax / s).max()), kind))
    err = 0.0
    for w in weights:
        d = x @ w - xq @ quantize_weight(w * s[:, None])
        err += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
    return err


def search_alpha(x: np.ndarray, act_absmax: np.ndarray, weights: list[np.ndarray], kind: ActivationKind,
                 quantize_weight: Callable[[np.ndarray], np.ndarray], alphas: np.ndarray = ALPHAS) -> tuple[float, np.ndarray]:
    """(α, s): the grid α whose smoothing minimises the group's quantized output error on rows `x` [R, K]."""
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    best = (np.inf, 0.0, np.ones_like(act_absmax, dtype=np.float32))
    for alpha in alphas:
        s = smoothing_scales(act_absmax, w_absmax, float(alpha))
        err = group_error(x, act_absmax, weights, s, kind, quantize_weight)
        if err < best[0]:
            best = (err, float(alpha), s)
    return best[1], best[2]
