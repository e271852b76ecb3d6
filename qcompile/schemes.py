"""Quantization schemes as data: frozen dataclasses with enum fields and a version."""

from __future__ import annotations

import dataclasses
import enum

from qcompile import errors


class Algorithm(str, enum.Enum):
    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"
    AWQ_GPTQ = "awq+gptq"


@dataclasses.dataclass(frozen=True)
class WeightScheme:
    """How linear weights are quantized.

    bits/group_size/symmetric apply to every block linear; `lm_head_bits` is the lm_head's width
    (None keeps it float); `skip` names layers (ModelMap names, e.g. "blocks.0.down") left float.
    `act_order` and `damp` are GPTQ's (visit channels by decreasing Hessian diagonal; Hessian damping).
    `positive_scales`: symmetric scales stay > 0, as TensorRT requires; otherwise ONNX Runtime's
    full-range convention (see `algorithms.rtn`), which is more accurate.
    `embedding_bits`: the token-embedding table's width (None keeps it float; ONNX Runtime targets only).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    algorithm: Algorithm = Algorithm.RTN
    lm_head_bits: int | None = 8
    skip: tuple[str, ...] = ()
    act_order: bool = False
    damp: float = 0.01
    positive_scales: bool = False
    embedding_bits: int | None = None
    version: int = 1

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise errors.InputError(f"bits={self.bits} is not supported: use 4 or 8")
        if self.embedding_bits not in (None, 4, 8):
            raise errors.InputError(f"embedding bits={self.embedding_bits} is not supported: use 4, 8 or float")
        if self.lm_head_bits not in (None, 4, 8):
            raise errors.InputError(f"lm_head bits={self.lm_head_bits} is not supported: use 4, 8 or float")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise errors.InputError(
                f"group size {self.group_size} is not supported: use a power of two >= 16 (32, 64 or 128)"
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["algorithm"] = self.algorithm.value
        d["skip"] = list(self.skip)
        return d


def parse_algorithm(name: str) -> Algorithm:
    try:
        return Algorithm(name.lower())
    except ValueError:
        raise errors.InputError(f"unknown algorithm '{name}': use one of {', '.join(a.value for a in Algorithm)}") from None
