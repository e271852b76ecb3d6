"""Targets: a name, the weight scheme it defaults to, and the lowering passes from the canonical form.

Add a target by writing its lowering passes in a module here and registering a `Target` below.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import onnx_ir as ir

from qcompile import errors
from qcompile.schemes import ActivationKind, ActivationScheme, Algorithm, WeightScheme
from qcompile.passes import FuseGroupQueryAttention
from qcompile.targets.ort import FuseNormalizations, LowerToMatMulNBits, PackQKV
from qcompile.targets.trt import PadPartialBlocks


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    runtime: str
    scheme: WeightScheme
    lowering: Callable[["Target", int | None], list[ir.passes.PassBase]]
    accuracy_level: int = 4  # ORT MatMulNBits: 0 = fp32 compute; 4 = int8 activations per block
    edge: bool = False  # also write an edge package (onnxruntime-genai config, golden vectors, zip)
    activations: ActivationScheme = ActivationScheme()
    rotate: bool = False  # QuaRot's rotations (residual stream, value heads, online Hadamard before down_proj)
    fuse: bool = True  # ORT targets: GroupQueryAttention and SkipSimplifiedLayerNormalization fusions

    def lowering_passes(self, max_positions: int | None = None) -> list[ir.passes.PassBase]:
        """`max_positions`: the model's context length (the rows of a fused attention's RoPE caches)."""
        return self.lowering(self, max_positions)


def _ort_nbits(target: Target, max_positions: int | None) -> list[ir.passes.PassBase]:
    if not target.fuse:
        return [LowerToMatMulNBits(target.accuracy_level)]
    return [FuseGroupQueryAttention(max_positions, strict=False), LowerToMatMulNBits(target.accuracy_level),
            FuseNormalizations(), PackQKV()]


def _trt(target: Target, max_positions: int | None) -> list[ir.passes.PassBase]:
    return [PadPartialBlocks()]


_REGISTRY = {
    t.name: t
    for t in [
        Target(
            "ort-int4",
            "4-bit weights (RTN, group 128, symmetric; lm_head 4-bit GPTQ, group 32) as com.microsoft.MatMulNBits for ONNX Runtime CPU/CUDA",
            "onnxruntime",
            WeightScheme(bits=4, group_size=128, symmetric=True, lm_head_bits=4),
            _ort_nbits,
        ),
        Target(
            "trt-int4",
            "4-bit weight-only (RTN, group 128, symmetric, positive scales; lm_head 8-bit) as INT4 DequantizeLinear → MatMul for TensorRT",
            "tensorrt",
            WeightScheme(bits=4, group_size=128, symmetric=True, lm_head_bits=8, positive_scales=True),
            _trt,
        ),
        Target(
            "edge-int4",
            "ort-int4 with an int8 embedding table, packaged for devices: onnxruntime-genai folder and zip with tokenizer, config and golden vectors",
            "onnxruntime",
            WeightScheme(bits=4, group_size=128, symmetric=True, lm_head_bits=8, embedding_bits=8),
            _ort_nbits,
            edge=True,
        ),
        Target(
            "ort-w8a8",
            "8-bit weights per channel and int8 per-token activations after SmoothQuant, as com.microsoft.MatMulNBits bits=8 accuracy_level 4 for ONNX Runtime CPU",
            "onnxruntime",
            WeightScheme(bits=8, group_size=0, symmetric=True, lm_head_bits=8),
            _ort_nbits,
            activations=ActivationScheme(ActivationKind.INT8_DYNAMIC, smoothquant=True, alpha=0.5, smooth_up_down=True),
        ),
        Target(
            "ort-w4a8",
            "QuaRot-rotated model, 4-bit GPTQ weights (group 128, symmetric; lm_head 8-bit) as com.microsoft.MatMulNBits accuracy_level 4 (int8 activations) for ONNX Runtime CPU",
            "onnxruntime",
            WeightScheme(bits=4, group_size=128, symmetric=True, lm_head_bits=8, algorithm=Algorithm.GPTQ),
            _ort_nbits,
            rotate=True,
        ),
        Target(
            "trt-int8",
            "W8A8 for TensorRT: SmoothQuant, int8 weights per channel, static per-tensor int8 activation Q/DQ (lm_head weight-only)",
            "tensorrt",
            WeightScheme(bits=8, group_size=0, symmetric=True, lm_head_bits=8, positive_scales=True),
            _trt,
            activations=ActivationScheme(ActivationKind.INT8_STATIC, smoothquant=True, alpha=0.7, smooth_up_down=True),
        ),
        Target(
            "trt-fp8",
            "FP8 E4M3 for TensorRT: SmoothQuant, FP8 weights per channel, static per-tensor FP8 activation Q/DQ (lm_head weight-only)",
            "tensorrt",
            WeightScheme(bits=8, group_size=0, symmetric=True, lm_head_bits=8, positive_scales=True, fp8=True),
            _trt,
            activations=ActivationScheme(ActivationKind.FP8_STATIC, smoothquant=True, alpha=0.7, smooth_up_down=True),
        ),
    ]
}


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Target:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise errors.UnknownTargetError(
            f"unknown target '{name}': choose one of {', '.join(_REGISTRY)} (see `qcompile targets`)"
        ) from None
