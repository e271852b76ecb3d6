"""AWQ (Lin et al., 2023): activation-aware scales and clipping for weight-only quantization.

Scales. Linears reading the same input x (q/k/v, gate/up, or down after up) share a per-input-channel
scale s: x·W = (x/s)·(diag(s)·W). Salient channels (large mean |x|) get s > 1, so their weights are
quantized more finely. s = mean|x|^α, normalised to geometric mean 1, with α on a grid chosen to minimise
the summed layer-output error of the quantized group. The 1/s is folded into whatever produces x.

Clipping. Then, per quantization group and output channel, the range is shrunk by the ratio (from a grid)
that minimises that group's output error.

Output errors use the calibration Hessian H = Σ xᵀx: ||X·ΔW||² = tr(ΔWᵀ H ΔW), so no activations are kept.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.linalg.blas

from qcompile.algorithms.rtn import QuantizedWeight, _blocks, quantize_rtn


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """||X·W - X·Ŵ||² = tr(ΔWᵀ H ΔW) for W [K, N], H = XᵀX [K, K] (float32 H, float32 products)."""
    return factored_error(w, w_hat, hessian_factor(h))


def hessian_factor(h: np.ndarray) -> np.ndarray:
    """The lower Cholesky factor L of H + λI, float32, in LAPACK's order, so that tr(ΔWᵀ H ΔW) ≈ ||ΔWᵀ·L||²:
    a triangular product, half a general one's flops. λ is 1e-6 of H's mean diagonal (channels that never
    fire), raised tenfold at a time up to 1e-2 where H is singular enough that float32 accumulation left it
    slightly indefinite (a tiny model on a few calibration tokens: smallest eigenvalue -1e-6 of the largest)."""
    h = np.asarray(h, dtype=np.float64)
    mean = max(float(np.einsum("ii->", h)) / len(h), 1e-30)
    for ridge in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        a = np.array(h, order="F")
        a[np.diag_indices_from(a)] += ridge * mean
        lower, info = scipy.linalg.lapack.dpotrf(a, lower=1, clean=1, overwrite_a=1)
        if info == 0:
            return np.asfortranarray(lower, dtype=np.float32)
    raise np.linalg.LinAlgError(f"Hessian is not positive semi-definite (LAPACK dpotrf info {info})")


def factored_error(w: np.ndarray, w_hat: np.ndarray, lower: np.ndarray) -> float:
    """`output_error` with H's factor from `hessian_factor`."""
    d = (np.asarray(w, np.float64) - w_hat).astype(np.float32)
    y = scipy.linalg.blas.strmm(1.0, lower, d.T, side=1, lower=1, overwrite_b=1)  # ΔWᵀ·L, [N, K]
    return float(np.einsum("nk,nk->", y, y, dtype=np.float64))


COARSE = 4  # search_scales tries every COARSE-th α of the grid, then the grid points beside the best


def search_scales(weights: list[np.ndarray], hessians: list[np.ndarray], absmean: np.ndarray, bits: int,
                  group_size: int, symmetric: bool, grid: int = 20, positive: bool = False) -> tuple[np.ndarray, float]:
    """(s [K], α): the scale minimising the summed output error of `weights` (all [K, N_i], one input x;
    each error measured with its own Hessian, e.g. attention-weighted for v).

    α is on the reference's grid (0, 1/grid, ...), searched coarse to fine: every COARSE-th point, then the
    COARSE - 1 points on either side of the best (11 of 20 errors). Where the error falls and then rises
    along the grid, as it does on every group of SmolLM2-135M, this is the grid's own choice.
    """
    base = np.maximum(absmean.astype(np.float64), 1e-8)
    shared: dict[int, np.ndarray] = {}  # linears reading one input share its Hessian: factor it once
    for h in hessians:
        if id(h) not in shared:
            shared[id(h)] = hessian_factor(h)
    factors = [shared[id(h)] for h in hessians]
    errors: dict[int, float] = {}

    def scales(i: int) -> np.ndarray:
        s = base ** (i / grid)
        return s / np.sqrt(s.max() * s.min())

    def error(i: int) -> float:
        if i not in errors:
            s = scales(i)
            errors[i] = 0.0
            for w, lower in zip(weights, factors):
                scaled = quantize_rtn((w * s[:, None]).astype(np.float32), bits, group_size, symmetric,
                                      positive=positive).dequantize()
                errors[i] += factored_error(w, scaled / s[:, None], lower)
        return errors[i]

    coarse = min(range(0, grid, COARSE), key=error)  # the first of equal errors, as a full pass would keep
    best = min(range(max(coarse - COARSE + 1, 0), min(coarse + COARSE, grid)), key=error)
    return scales(best), best / grid


def search_clip(w: np.ndarray, h: np.ndarray, bits: int, group_size: int, symmetric: bool,
                ratios: np.ndarray = np.linspace(1.0, 0.5, 11), positive: bool = False) -> QuantizedWeight:
    """RTN with a per-(group, output channel) clip ratio minimising Δw_gᵀ H_gg Δw_g (block-diagonal H)."""
    k, n = w.shape
    per_channel, group_size = group_size == 0, group_size or k
    blocks = _blocks(np.asarray(w, np.float32), group_size)  # [G, B, N] (last block zero-padded)
    groups = blocks.shape[0]
    h_blocks = np.zeros((groups, group_size, group_size), np.float32)
    for g in range(groups):
        size = min(group_size, k - g * group_size)
        h_blocks[g, :size, :size] = h[g * group_size: g * group_size + size, g * group_size: g * group_size + size]
    best_err = np.full((groups, n), np.inf)
    best_ratio = np.ones((groups, n), np.float32)
    for ratio in ratios:
        d = blocks - _blocks(quantize_rtn(w, bits, group_size, symmetric, ratio, positive).dequantize(), group_size)
        err = np.einsum("gbn,gbc,gcn->gn", d, h_blocks, d, optimize=True)
        better = err < best_err
        best_err[better], best_ratio[better] = err[better], ratio
    return quantize_rtn(w, bits, 0 if per_channel else group_size, symmetric, best_ratio, positive)
