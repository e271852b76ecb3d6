"""Quantization schemes as data: frozen dataclasses with enum fields and a version."""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import re

from qcompile import errors


class Algorithm(str, enum.Enum):
    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"
    AWQ_GPTQ = "awq+gptq"


# A 4-bit lm_head is quantized by GPTQ (in `pipeline.compile`) in groups of 32 unless a recipe says otherwise: on
# SmolLM2's ort-int4 it then costs +1.4 % perplexity over an 8-bit one (33.72 against 33.27, 32 windows), against
# +24 % by RTN at group 128 (41.31).
LM_HEAD_INT4_GROUP = 32
WEIGHT_BITS = (2, 4, 8)  # 2-bit: ONNX Runtime only (MatMulNBits bits=2)


def parse_format(text: str) -> tuple[int | None, int]:
    """A linear's format as spelled in recipes: "int4g128" (bits, group size), "int8" (one scale per output
    channel, group 0) or "float" (None, 0)."""
    if text == "float":
        return None, 0
    match = re.fullmatch(r"int(\d+)(?:g(\d+))?", text)
    if match is None:
        raise errors.InputError(f"unknown weight format '{text}': use e.g. int4g128, int2g64, int8 (per channel) or float")
    bits, group = int(match[1]), int(match[2] or 0)
    _check_width("bits", bits, WEIGHT_BITS)
    _check_group("group size", group)
    return bits, group


def format_name(bits: int | None, group: int) -> str:
    """The inverse of `parse_format`."""
    return "float" if bits is None else f"int{bits}" + (f"g{group}" if group else "")


def _check_width(what: str, bits, allowed) -> None:
    if bits not in allowed:
        words = ", ".join(str(b) for b in allowed if b is not None) + (" or float" if None in allowed else "")
        raise errors.InputError(f"{what}={bits} is not supported: use {words}")


def _check_group(what: str, group: int) -> None:
    if group != 0 and (group < 16 or group & (group - 1)):
        raise errors.InputError(f"{what} {group} is not supported: use a power of two >= 16 (32, 64 or 128), "
                                "or 0 for one scale per output channel")


@dataclasses.dataclass(frozen=True)
class WeightScheme:
    """How linear weights are quantized.

    bits/group_size/symmetric apply to every block linear (group_size 0: one scale per output channel); `lm_head_bits` is the lm_head's width
    (None keeps it float; a 4-bit lm_head is quantized in groups of `lm_head_group_size`, by GPTQ in `compile`); `skip` names layers (ModelMap names, e.g. "blocks.0.down") left float.
    `act_order`, `damp` and `sequential` are GPTQ's (visit channels by decreasing Hessian diagonal; Hessian
    damping; measure each block's Hessians on the model whose earlier blocks are already quantized).
    `positive_scales`: symmetric scales stay > 0, as TensorRT requires; otherwise ONNX Runtime's
    full-range convention (see `algorithms.rtn`), which is more accurate.
    `embedding_bits`: the token-embedding table's width (None keeps it float; ONNX Runtime targets only).
    `fp8`: 8-bit weights as FP8 E4M3 (per output channel) instead of INT8.
    `layers`: per-linear formats over the above, "name=format" (`parse_format`: "blocks.3.down=int8",
    "blocks.0.q=int2g64", "blocks.5.up=float"), as a mixed-precision search chooses them.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    algorithm: Algorithm = Algorithm.RTN
    lm_head_bits: int | None = 8
    skip: tuple[str, ...] = ()
    act_order: bool = False
    damp: float = 0.01
    sequential: bool = False
    positive_scales: bool = False
    embedding_bits: int | None = None
    fp8: bool = False
    lm_head_group_size: int = LM_HEAD_INT4_GROUP
    layers: tuple[str, ...] = ()
    version: int = 1

    def __post_init__(self):
        _check_width("bits", self.bits, WEIGHT_BITS)
        _check_width("embedding bits", self.embedding_bits, (4, 8, None))
        _check_width("lm_head bits", self.lm_head_bits, (4, 8, None))
        for what, group in (("group size", self.group_size), ("lm_head group size", self.lm_head_group_size)):
            _check_group(what, group)
        for entry in self.layers:
            name, _, spelled = entry.partition("=")
            if not name or not spelled:
                raise errors.InputError(f"weights.layers entry '{entry}' is not name=format (e.g. blocks.3.down=int8)")
            if name == "lm_head":
                raise errors.InputError("lm_head's format is the [lm_head] section's (bits, group_size), not weights.layers")
            parse_format(spelled)
        if self.fp8 and any(parse_format(e.partition("=")[2])[0] not in (8, None) for e in self.layers):
            raise errors.InputError("FP8 recipes store every quantized linear as FP8: weights.layers can only keep some float")
        if self.sequential and self.algorithm != Algorithm.GPTQ:
            raise errors.InputError(f"sequential mode is GPTQ's: use --algo gptq, or drop --gptq-mode sequential "
                                    f"(algorithm {self.algorithm.value})")
        if self.fp8 and (self.bits != 8 or self.group_size != 0 or not self.symmetric):
            raise errors.InputError("FP8 weights are 8-bit, symmetric, one scale per output channel: "
                                    "use --bits 8 --group-size 0 --symmetric")

    def layer_formats(self) -> dict[str, tuple[int | None, int]]:
        """`layers` parsed: linear name → (bits or None for float, group size)."""
        return {name: parse_format(spelled) for name, _, spelled in (e.partition("=") for e in self.layers)}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["algorithm"] = self.algorithm.value
        d["skip"] = list(self.skip)
        d["layers"] = list(self.layers)
        return d


def parse_algorithm(name: str) -> Algorithm:
    try:
        return Algorithm(name.lower())
    except ValueError:
        raise errors.InputError(f"unknown algorithm '{name}': use one of {', '.join(a.value for a in Algorithm)}") from None


class ActivationKind(str, enum.Enum):
    NONE = "none"
    INT8_STATIC = "int8-static"  # per-tensor scale from calibration (TensorRT's INT8 form)
    INT8_DYNAMIC = "int8-dynamic"  # per-token scale computed at run time
    INT4_DYNAMIC = "int4-dynamic"  # per-token int4 (W4A4 reference, after QuaRot's rotations), clipped
    FP8_STATIC = "fp8-static"  # FP8 E4M3, per-tensor scale from calibration (TensorRT's FP8 form)


@dataclasses.dataclass(frozen=True)
class ActivationScheme:
    """How the inputs of quantized linears are quantized, and the SmoothQuant folding that prepares them.

    `smoothquant`: fold per-channel scales s = max|x|^α / max|w|^(1-α) into the norms feeding q/k/v and
    gate/up; `alpha` None searches α per layer group; `smooth_up_down` also smooths the
    input of down (scales in up's output columns). `lm_head`: quantize lm_head's input too; by default
    lm_head stays weight-only (measured on SmolLM2: its per-tensor activations cost more than any other
    layer's, see benchmarks/results/w8a8.md). `clip`: dynamic per-token scales are clip·max|x| / qmax.
    `float_inputs`: linears whose inputs stay float (their weights stay quantized): ModelMap names, as an
    activation-precision search chooses them, or shell patterns of them ("blocks.*.down").
    """

    kind: ActivationKind = ActivationKind.NONE
    smoothquant: bool = False
    alpha: float | None = 0.5
    smooth_up_down: bool = False
    lm_head: bool = False
    clip: float = 1.0
    float_inputs: tuple[str, ...] = ()
    version: int = 1

    def __post_init__(self):
        if not 0.5 <= self.clip <= 1.0:
            raise errors.InputError(f"activation clip ratio {self.clip} is out of range: use 0.5..1")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise errors.InputError(f"SmoothQuant alpha {self.alpha} is out of range: use 0..1 or auto")

    @property
    def dynamic(self) -> bool:
        return self.kind in (ActivationKind.INT8_DYNAMIC, ActivationKind.INT4_DYNAMIC)

    def keeps_float_input(self, linear: str) -> bool:
        """Whether `linear`'s (a ModelMap name) input stays float."""
        return matches(linear, self.float_inputs)

    @property
    def static(self) -> bool:
        return self.kind in (ActivationKind.INT8_STATIC, ActivationKind.FP8_STATIC)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "kind": self.kind.value, "alpha": "auto" if self.alpha is None else self.alpha,
                "float_inputs": list(self.float_inputs)}


def parse_alpha(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise errors.InputError(f"--alpha '{text}' is not a number in 0..1 or 'auto'") from None


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a ModelMap name is one of `patterns`, or matches one as a shell pattern ("blocks.*.down")."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
