"""Targets: a name, the recipe it defaults to, and what the runtime needs done around the canonical model.

A `Target` owns everything runtime-specific: `validate(recipe)` (what the runtime cannot run),
`lowering_passes(recipe, max_positions)` (canonical form → the runtime's spelling), `forms` (what the ops it
writes stand for, so that `analysis` reads its lowered models), `check(model)` (the
runtime's rules on the lowered model), `read_weight`/`read_embedding`/`read_expert_table` (the lowered form read back to the
canonical integers and scales, for `verify`), and `package(folder)` / `finish(out)` (files beside the
model). Nothing outside `targets/` names a runtime. Add a target by writing its lowering passes in a
module here and registering a `Target` below.
"""

from __future__ import annotations

import dataclasses
import pathlib

import onnx_ir as ir

from qcompile import analysis, errors, package
from qcompile.passes import FuseGroupQueryAttention, _canonical
from qcompile.schemes import ActivationKind
from qcompile.targets import ort, ort_experts, trt


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    defaults: dict = dataclasses.field(default_factory=dict)  # recipe sections changed from `Recipe`'s defaults
    runtime: str = ""  # shown to users and in manifests, never branched on
    edge: bool = False  # also write an edge package (onnxruntime-genai config, golden vectors, zip)
    builds_engines: bool = False  # `--engine` / `qcompile build` apply
    packages_edge: bool = False  # `qcompile package` applies (an onnxruntime-genai client loads it)
    rules: str | None = None  # what `check` enforces (None: nothing beyond the fidelity of the weights)
    mixed_formats: tuple[str, ...] = ()  # the weight formats a mixed-precision search chooses among (`schemes.parse_format`)
    forms: analysis.LoweredForms = analysis.NO_FORMS  # what the ops its lowering writes stand for (`analysis.analyze`)

    def check_source(self, folder: pathlib.Path) -> None:
        """Raise InputError when the float model's folder lacks what this target's files are made from."""
        if self.edge and not (folder / "config.json").is_file():
            raise errors.InputError(f"no config.json in '{folder}': an edge package needs the model's HF config")

    def validate(self, recipe) -> None:
        """Raise InputError, naming the fix, for a recipe this runtime cannot run."""

    def lowering_passes(self, recipe, max_positions: int | None = None) -> list[ir.passes.PassBase]:
        """`max_positions`: the model's context length (the rows of a fused attention's RoPE caches)."""
        return []

    def check(self, model: ir.Model) -> list:
        """The runtime's rules that `model` breaks (empty when it conforms)."""
        return []

    def cpu_session(self, recipe) -> dict:
        """ONNX Runtime CPU session config entries under which qcompile runs this target's artifacts (evaluation,
        `run`, `verify`) so that they compute what the runtime does; the manifest records them for `runtime.Decoder`."""
        return {}

    def read_weight(self, linear):
        return _canonical.read_weight(linear)

    def read_embedding(self, gather: ir.Node):
        return _canonical.read_embedding(gather)

    def read_expert_table(self, table):
        return _canonical.read_expert_table(table)

    def package(self, folder: pathlib.Path, name: str) -> dict | None:
        """Add this target's files to the artifact folder (before its manifest); returns their record."""
        return None

    def finish(self, out: pathlib.Path) -> None:
        """Work on the finished artifact folder (a zip of it)."""


class OnnxRuntimeTarget(Target):
    def validate(self, recipe) -> None:
        if recipe.kv_cache.bits is not None and not recipe.lowering.fuse:
            raise errors.InputError(f"{self.name}: a quantized KV cache is stored by GroupQueryAttention, which --no-fuse "
                                    "leaves out: drop --no-fuse or --kv-cache")

    def lowering_passes(self, recipe, max_positions: int | None = None) -> list[ir.passes.PassBase]:
        level = recipe.lowering.accuracy_level
        if not recipe.lowering.fuse:
            return [ort.LowerToMatMulNBits(level)]
        # A quantized cache exists only inside GroupQueryAttention: every block must fuse, or the compile fails.
        return [FuseGroupQueryAttention(max_positions, strict=recipe.kv_cache.bits is not None), ort.LowerToMatMulNBits(level),
                ort.FuseNormalizations(), ort.PackQKV(), ort.PackGateUp(),
                ort_experts.LowerExpertsToQMoE(level)]

    def read_weight(self, linear):
        return ort.read_weight(linear)

    def read_embedding(self, gather: ir.Node):
        return ort.read_embedding(gather)

    def read_expert_table(self, table):
        return ort_experts.read_expert_table(table)

    def package(self, folder: pathlib.Path, name: str) -> dict | None:
        return package.write_edge_files(folder, name) if self.edge else None

    def finish(self, out: pathlib.Path) -> None:
        if self.edge:
            package.zip_folder(out, out.with_name(f"{out.name}.zip"))


class TensorRTTarget(Target):
    def validate(self, recipe) -> None:
        w, act = recipe.weights, recipe.activations
        if not (w.symmetric and w.positive_scales):
            raise errors.InputError(f"{self.name} needs symmetric weights with positive scales (TensorRT rejects zero "
                                    "points and negative scales): drop --asymmetric / --signed-scales")
        if act.dynamic:
            raise errors.InputError(f"{self.name}: TensorRT's explicit quantization is static per tensor: "
                                    "use --activations int8-static or fp8-static")
        if 2 in (w.bits, *(bits for bits, _ in recipe.weight_scheme().layer_formats().values())):
            raise errors.InputError(f"{self.name}: TensorRT has no 2-bit weights: use 4 or 8 bits, or an ort-* target "
                                    "(MatMulNBits bits=2)")

    def lowering_passes(self, recipe, max_positions: int | None = None) -> list[ir.passes.PassBase]:
        return [trt.PadPartialBlocks()]

    def check(self, model: ir.Model) -> list:
        return trt.check_tensorrt(model)

    def cpu_session(self, recipe) -> dict:
        # TensorRT computes Q/DQ exactly: float activations into a weight-only DQ → MatMul, exact integer products
        # for static activations. ORT's default session fuses DQ → MatMul into MatMulNBits at accuracy_level 4
        # (int8 activations), and int8 Q/DQ pairs into u8s8 GEMMs whose int16 partial sums saturate on x64 CPUs
        # without VNNI (SmolLM2's trt-int8 on 4 windows: +1.04 % perplexity fused, +0.33 % as written).
        if recipe.activations.kind in (ActivationKind.INT8_STATIC, ActivationKind.FP8_STATIC):
            return {"session.disable_quant_qdq": "1"}  # every Q/DQ as written
        return {"session.qdq_matmulnbits_accuracy_level": "0"}  # MatMulNBits with float activations

    def read_weight(self, linear):
        return trt.read_weight(linear)


# The canonical 4-bit default of ort-int4, trt-int4 and edge-int4: integers and scales every one of their runtimes
# runs (TensorRT: symmetric, positive scales, blocks of 64 or 128), so their default artifacts hold the same model
# (`qcompile verify` passes between them). AWQ+GPTQ with act-order in groups of 64 on 16 calibration windows, and a
# 4-bit GPTQ lm_head in groups of 64 whose integers also serve as the tied embedding table (stored once on ORT):
# chosen by benchmarks/bench_default_choice.py (README, "The default: one calibrated canonical model").
_INT4 = {"weights": {"bits": 4, "group_size": 64, "symmetric": True, "positive_scales": True, "algorithm": "awq+gptq",
                     "act_order": True},
         "lm_head": {"bits": 4, "group_size": 64}, "embeddings": {"bits": 4}, "calibration": {"samples": 16}}
_INT4_TEXT = ("AWQ+GPTQ with act-order on 16 windows, group 64, symmetric with positive scales; lm_head 4-bit GPTQ, "
              "group 64, shared with the embedding table")
_W8A8 = {"weights": {"bits": 8, "group_size": 0, "symmetric": True, "positive_scales": True}, "lm_head": {"bits": 8}}
# trt-int8 keeps the MLP down projections' inputs float (weights int8): on SmolLM2 (128 windows) +1.27 % → -0.49 %
# perplexity, where the activation search (`--search --max-ppl-increase 0.5`, which adds to these) stalled at +0.99 %
# with 52 inputs chosen by KL per weight (benchmarks/bench_mixed_precision.py; README, "Mixed precision").
_DOWN_INPUTS = ["blocks.*.down"]
# Formats a search chooses among. MatMulNBits runs 2, 4 and 8 bits in blocks of 16..256 (per-channel 8-bit is stored
# in blocks of 128 anyway); TensorRT int4 in blocks of 64 or 128, int8 per channel. Blocks of 32 are left out: the
# built-in model's weights lie on a 4-bit grid in blocks of 32, which would flatter them (list them in a recipe).
_ORT_FORMATS = ("int2g128", "int2g64", "int4g128", "int4g64", "int8g128", "float")
_TRT_FORMATS = ("int4g128", "int4g64", "int8", "float")
_ORT = dict(runtime="onnxruntime", packages_edge=True, mixed_formats=_ORT_FORMATS, forms=ort.FORMS)
_TRT = dict(runtime="tensorrt", builds_engines=True, rules="TensorRT's explicit-quantization rules", forms=trt.FORMS)

_REGISTRY = {
    t.name: t
    for t in [
        OnnxRuntimeTarget("ort-int4", f"4-bit weights ({_INT4_TEXT}) as com.microsoft.MatMulNBits for ONNX Runtime CPU/CUDA",
                          _INT4, **_ORT),
        TensorRTTarget("trt-int4", f"4-bit weight-only ({_INT4_TEXT}) as INT4 DequantizeLinear → MatMul for TensorRT",
                       _INT4, **_TRT, mixed_formats=_TRT_FORMATS),
        OnnxRuntimeTarget("edge-int4", "ort-int4's model packaged for devices: onnxruntime-genai folder and zip with tokenizer, "
                                       "config and golden vectors", _INT4, **_ORT, edge=True),
        OnnxRuntimeTarget(
            "ort-w8a8",
            "8-bit weights per channel and int8 per-token activations after SmoothQuant, as com.microsoft.MatMulNBits bits=8 accuracy_level 4 for ONNX Runtime CPU",
            {"weights": {"bits": 8, "group_size": 0, "symmetric": True}, "lm_head": {"bits": 8},
             "activations": {"kind": "int8-dynamic", "smoothquant": True, "alpha": 0.5, "smooth_up_down": True}},
            **_ORT,
        ),
        OnnxRuntimeTarget(
            "ort-w4a8",
            "QuaRot-rotated model, 4-bit GPTQ weights (group 128, symmetric; lm_head 8-bit) as com.microsoft.MatMulNBits accuracy_level 4 (int8 activations) for ONNX Runtime CPU",
            {"weights": {"bits": 4, "group_size": 128, "symmetric": True, "algorithm": "gptq"}, "lm_head": {"bits": 8},
             "rotation": {"enabled": True}},
            **_ORT,
        ),
        TensorRTTarget(
            "trt-int8",
            "W8A8 for TensorRT: SmoothQuant, int8 weights per channel, static per-tensor int8 activation Q/DQ (lm_head and the "
            "down projections' inputs float)",
            {**_W8A8, "activations": {"kind": "int8-static", "smoothquant": True, "alpha": 0.7, "smooth_up_down": True,
                                      "float_inputs": _DOWN_INPUTS}},
            **_TRT,
        ),
        TensorRTTarget(
            "trt-fp8",
            "FP8 E4M3 for TensorRT: SmoothQuant, FP8 weights per channel, static per-tensor FP8 activation Q/DQ (lm_head weight-only)",
            {"weights": {**_W8A8["weights"], "fp8": True}, "lm_head": {"bits": 8},
             "activations": {"kind": "fp8-static", "smoothquant": True, "alpha": 0.7, "smooth_up_down": True}},
            **_TRT,
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


def reading(model: ir.Model) -> Target:
    """A target that reads `model`: one whose own ops' domain `model` imports, else one whose ops are ONNX's (every
    target also reads the canonical form)."""
    return next((t for t in _REGISTRY.values() if t.forms.domain in model.opset_imports),
                next(t for t in _REGISTRY.values() if t.forms.domain is None))


def of(manifest: dict) -> Target:
    """The target an artifact's manifest names."""
    return get(manifest.get("target", {}).get("name", ""))
