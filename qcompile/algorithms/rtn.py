"""Round-to-nearest blockwise weight quantization (pure numpy).

Blocks run along K (axis 0 of a [K, N] weight): block g covers rows g*B .. g*B+B-1, the last block may be
short. Dequantization is w ≈ (q - zero_point) * scale.

- symmetric: q in [-2^(b-1), 2^(b-1)-1], no zero point. By default scale = m / -2^(b-1) with m the
  block's value of largest magnitude (signed): m maps exactly to -2^(b-1), so all 2^b levels are used
  and the step is m/2^(b-1); scales are negative wherever m is positive. This is the convention of ONNX
  Runtime's MatMulNBits quantizer (and llama.cpp's Q4_0).
  `positive=True` (TensorRT rejects non-positive scales): the smallest positive scale that fits the
  block's largest value at 2^(b-1)-1 and its most negative at -2^(b-1). Where m is positive the step is
  m/(2^(b-1)-1), coarser: on SmolLM2 (RTN g128, 128 windows) perplexity 39.35 vs 35.28 (benchmarks/results/targets.md).
- asymmetric: the range [min(w,0), max(w,0)] spread over 2^b - 1 steps, unsigned q, zero point in range.
- group_size 0 (or K): one block, i.e. one scale per output channel.
- FP8 (`quantize_fp8`): per output channel, scale = max|w| / 448 so the largest weight lands on E4M3's
  largest finite value; values round to nearest even on the E4M3 grid.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN


@dataclasses.dataclass
class QuantizedWeight:
    q: np.ndarray  # [K, N] int8 (signed) or uint8 (asymmetric) holding b-bit values, or float8_e4m3fn
    scale: np.ndarray  # [G, N] float32
    zero_point: np.ndarray | None  # [G, N] uint8, None when symmetric
    bits: int
    group_size: int  # 0: one block spanning K (per output channel)

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self) -> np.ndarray:
        """float32 [K, N], computed the way DequantizeLinear does: (q - zp) * scale in float32."""
        k = self.q.shape[0]

        def rows(a):
            return None if a is None else np.repeat(a, self.group_size or k, axis=0)[:k]

        return dequantize_values(self.q, rows(self.scale), rows(self.zero_point))


def _blocks(w: np.ndarray, group_size: int) -> np.ndarray:
    """[K, N] -> [G, group_size, N], zero-padding the last block (zeros change neither range)."""
    k, n = w.shape
    groups = -(-k // group_size)
    padded = np.zeros((groups * group_size, n), dtype=np.float32)
    padded[:k] = w
    return padded.reshape(groups, group_size, n)


def block_params(blocks: np.ndarray, bits: int, symmetric: bool, clip: np.ndarray | float = 1.0,
                 positive: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) of each block: `blocks` is [..., B, N], reduced over B → [..., N].

    `clip` (broadcast to [..., N]) shrinks the range: values beyond clip·range saturate. `positive`:
    symmetric scales stay > 0 (see the module docstring).
    """
    if symmetric and positive:
        half = 2 ** (bits - 1)
        hi = np.maximum(blocks.max(axis=-2), 0.0) * clip / (half - 1)
        lo = np.minimum(blocks.min(axis=-2), 0.0) * clip / -half
        scale = np.maximum(hi, lo).astype(np.float32)
        scale[scale == 0] = 1.0  # an all-zero block: any scale gives q = 0
        return scale, None
    if symmetric:
        idx = np.abs(blocks).argmax(axis=-2)
        extreme = np.take_along_axis(blocks, np.expand_dims(idx, -2), axis=-2)[..., 0, :] * clip
        scale = (extreme / -(2 ** (bits - 1))).astype(np.float32)
        scale[scale == 0] = 1.0  # an all-zero block: any scale gives q = 0
        return scale, None
    top = 2**bits - 1
    lo = np.minimum(blocks.min(axis=-2), 0.0) * clip
    hi = np.maximum(blocks.max(axis=-2), 0.0) * clip
    scale = ((hi - lo) / top).astype(np.float32)
    scale[scale == 0] = 1.0
    return scale, np.clip(np.rint(-lo / scale), 0, top).astype(np.uint8)


def quantize_values(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, bits: int) -> np.ndarray:
    """Codes of `x` on the grid (scale, zero_point), broadcasting: int8 when symmetric, else uint8."""
    if zero_point is None:
        half = 2 ** (bits - 1)
        return np.clip(np.rint(x / scale), -half, half - 1).astype(np.int8)
    return np.clip(np.rint(x / scale) + zero_point, 0, 2**bits - 1).astype(np.uint8)


def dequantize_values(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
    q = q.astype(np.float32)
    return (q if zero_point is None else q - zero_point.astype(np.float32)) * scale


CHUNK = 1 << 24  # weights quantized this many values at a time: a 128k-vocabulary lm_head's temporaries stay small


def quantize_rtn(w: np.ndarray, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                 clip: np.ndarray | float = 1.0, positive: bool = False) -> QuantizedWeight:
    """Quantize a [K, N] float weight blockwise along K by round-to-nearest (`clip`: [G, N] or scalar).
    Columns are independent: a big weight is quantized a slice of columns at a time."""
    if w.ndim != 2:
        raise ValueError(f"expected a [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    step = max(1, CHUNK // k)
    parts = [_quantize_columns(w[:, j:j + step], bits, group_size or k, symmetric,
                               clip[..., j:j + step] if np.ndim(clip) else clip, positive) for j in range(0, n, step)]
    q, scale, zero_point = (np.concatenate(p, axis=-1) if p[0] is not None else None for p in zip(*parts))
    return QuantizedWeight(q, scale, zero_point, bits, group_size)


def _quantize_columns(w: np.ndarray, bits: int, group_size: int, symmetric: bool, clip: np.ndarray | float,
                      positive: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    blocks = _blocks(np.asarray(w, dtype=np.float32), group_size)
    scale, zero_point = block_params(blocks, bits, symmetric, clip, positive)
    q = quantize_values(blocks, scale[:, None, :], None if zero_point is None else zero_point[:, None, :], bits)
    return q.reshape(-1, w.shape[1])[:w.shape[0]], scale, zero_point


def quantize_fp8(w: np.ndarray) -> QuantizedWeight:
    """A [K, N] weight as FP8 E4M3 codes with one positive scale per output channel."""
    scale = (np.abs(w).max(axis=0, keepdims=True) / FP8_MAX).astype(np.float32)
    scale[scale == 0] = 1.0
    return QuantizedWeight(fp8_values(w / scale), scale, None, 8, 0)


def fp8_values(x: np.ndarray) -> np.ndarray:
    """`x` on the E4M3 grid, saturating at ±448 as QuantizeLinear does."""
    return np.clip(x, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
