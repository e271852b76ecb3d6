"""Round-to-nearest blockwise weight quantization (pure numpy).

Blocks run along K (axis 0 of a [K, N] weight): block g covers rows g*B .. g*B+B-1, the last block may be
short. Dequantization is w ≈ (q - zero_point) * scale.

- symmetric: scale = m / -2^(b-1) with m the block's value of largest magnitude (signed), q in
  [-2^(b-1), 2^(b-1)-1], no zero point. m maps exactly to -2^(b-1), so all 2^b levels are used; this is
  the convention of ONNX Runtime's MatMulNBits quantizer (and llama.cpp's Q4_0). Scales can be negative.
- asymmetric: the range [min(w,0), max(w,0)] spread over 2^b - 1 steps, unsigned q, zero point in range.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class QuantizedWeight:
    q: np.ndarray  # [K, N] int8 (signed) or uint8 (asymmetric) holding b-bit values
    scale: np.ndarray  # [G, N] float32
    zero_point: np.ndarray | None  # [G, N] uint8, None when symmetric
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self) -> np.ndarray:
        """float32 [K, N], computed the way DequantizeLinear does: (q - zp) * scale in float32."""
        k = self.q.shape[0]
        scale = np.repeat(self.scale, self.group_size, axis=0)[:k]
        q = self.q.astype(np.float32)
        if self.zero_point is not None:
            q = q - np.repeat(self.zero_point, self.group_size, axis=0)[:k].astype(np.float32)
        return q * scale


def _blocks(w: np.ndarray, group_size: int) -> np.ndarray:
    """[K, N] -> [G, group_size, N], zero-padding the last block (zeros change neither range)."""
    k, n = w.shape
    groups = -(-k // group_size)
    padded = np.zeros((groups * group_size, n), dtype=np.float32)
    padded[:k] = w
    return padded.reshape(groups, group_size, n)


def quantize_rtn(w: np.ndarray, bits: int = 4, group_size: int = 128, symmetric: bool = True) -> QuantizedWeight:
    """Quantize a [K, N] float weight blockwise along K by round-to-nearest."""
    if w.ndim != 2:
        raise ValueError(f"expected a [K, N] weight, got shape {w.shape}")
    k = w.shape[0]
    blocks = _blocks(np.asarray(w, dtype=np.float32), group_size)
    if symmetric:
        half = 2 ** (bits - 1)
        idx = np.abs(blocks).argmax(axis=1)  # [G, N]
        extreme = np.take_along_axis(blocks, idx[:, None, :], axis=1)[:, 0, :]
        scale = (extreme / -half).astype(np.float32)
        scale[scale == 0] = 1.0  # an all-zero block: any scale gives q = 0
        q = np.clip(np.rint(blocks / scale[:, None, :]), -half, half - 1).astype(np.int8)
        zero_point = None
    else:
        top = 2**bits - 1
        lo = np.minimum(blocks.min(axis=1), 0.0)
        hi = np.maximum(blocks.max(axis=1), 0.0)
        scale = ((hi - lo) / top).astype(np.float32)
        scale[scale == 0] = 1.0
        zero_point = np.clip(np.rint(-lo / scale), 0, top).astype(np.uint8)
        q = np.clip(np.rint(blocks / scale[:, None, :]) + zero_point[:, None, :], 0, top).astype(np.uint8)
    q = q.reshape(-1, w.shape[1])[:k]
    return QuantizedWeight(q, scale, zero_point, bits, group_size)
