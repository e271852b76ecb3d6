"""The pipeline behind `qcompile model` and the Python API: source → float ONNX → canonical → target."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import time

import numpy as np
import onnx_ir as ir

from qcompile import __version__, analysis, artifact, calibration, checkpoint, errors, evaluation, export as export_mod, fidelity, package, sources, targets
from qcompile import engine as engine_mod
from qcompile.algorithms.rtn import quantize_fp8, quantize_rtn
from qcompile.passes import (FoldSmoothQuantScales, FuseGroupQueryAttention, FuseNormGains, InsertOnlineHadamard, InsertQueryKeyHadamard, QuantizeActivations,
                             QuantizeEmbedding, QuantizeKVCache, QuantizeWeightsAWQ, QuantizeWeightsGPTQ, QuantizeWeightsRTN,
                             RotateResidualStream, RotateValueOutput, SmoothRotateNormOutputs)
from qcompile.passes._canonical import bits_for
from qcompile.runtime import Decoder, load_tokenizer
from qcompile.schemes import ActivationKind, ActivationScheme, Algorithm, WeightScheme, parse_algorithm
from qcompile.targets.trt import check_tensorrt

DEFAULT_OUT_ROOT = pathlib.Path("qcompile-out")
# The default clip ratio of per-token int4 activations. Measured on SmolLM2, rotated, GPTQ weights, 8 windows
# (ppl × float): clip 0.65 1.83, 0.7 1.69, 0.75 1.58, 0.8 1.66, 1.0 worse than all (RTN: 3.98 against 3.22).
INT4_CLIP = 0.75


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("QCOMPILE_CACHE_DIR", pathlib.Path.home() / ".cache" / "qcompile"))


def export(source: str | pathlib.Path = "smollm2-135m", out_dir: str | pathlib.Path | None = None, progress=None) -> pathlib.Path:
    """Export a HF folder / GGUF / alias to an fp32 ONNX KV-cache decoder folder; returns the folder.

    Without `out_dir` the export goes to the cache (keyed by the source's content hash) and is reused.
    """
    return _export(sources.resolve(source), out_dir, progress)


def _export(src: sources.Source, out_dir, progress) -> pathlib.Path:
    if src.kind == sources.SourceKind.ONNX:
        raise errors.InputError(f"'{src.path}' is already ONNX: pass it straight to `qcompile model` or `eval`")
    if out_dir is None:
        out = cache_root() / "exports" / f"{src.name}-{src.sha256[:16]}-{__version__}"
        if (out / "model.onnx").is_file():
            return out
    else:
        out = pathlib.Path(out_dir)
    model, tokenizer = export_mod.load_hf(src)
    advance = progress.task("Exporting to ONNX (torch.onnx, dynamo)", 1) if progress else (lambda: None)
    with artifact.atomic_folder(out) as tmp:
        export_mod.export_model(model, tmp, tokenizer)
        (tmp / "export.json").write_text(json.dumps({"source": src.describe(), "qcompile": __version__,
                                                      "versions": artifact.package_versions()}, indent=2))
    advance()
    return out


@dataclasses.dataclass
class _Evaluated:
    metrics: dict
    predictions: np.ndarray | None


def _evaluate(model_path: pathlib.Path, windows: int, progress, label: str, cache: pathlib.Path | None = None) -> _Evaluated:
    """Perplexity, latency and size of one model. With `cache` (an export folder) the perplexity is
    reused across compiles; latency is always measured now, so the float/quantized timings share a run."""
    cached = cache / f"perplexity-{windows}.json" if cache is not None else None
    if cached is not None and cached.is_file():
        ppl = json.loads(cached.read_text())
        predictions = np.load(cache / f"predictions-{windows}.npy")
        lat = evaluation.latency(Decoder(model_path))
    else:
        result, lat = evaluation.evaluate_model(model_path, windows, progress=progress, label=label)
        ppl, predictions = result.to_dict(), result.predictions
        if cached is not None:
            cached.write_text(json.dumps(ppl, indent=2))
            np.save(cache / f"predictions-{windows}.npy", predictions)
    return _Evaluated({**ppl, **lat, "size_bytes": artifact.model_bytes(model_path)}, predictions)


def _head_first(scheme: WeightScheme) -> bool:
    """Whether a separate GPTQ pass quantizes lm_head before the others: a 4-bit lm_head is always GPTQ's
    (group LM_HEAD_INT4_GROUP), and only GPTQ algorithms quantize it along with the blocks."""
    return scheme.lm_head_bits == 4 and "lm_head" not in scheme.skip and scheme.algorithm in (Algorithm.RTN, Algorithm.AWQ)


def _weight_pass(scheme: WeightScheme, windows: np.ndarray | None, progress, checkpoint=None):
    """The weight-quantization pass for `scheme.algorithm`."""
    if scheme.algorithm == Algorithm.RTN:
        return QuantizeWeightsRTN(scheme, progress)
    if scheme.algorithm == Algorithm.GPTQ:
        return QuantizeWeightsGPTQ(scheme, windows, scheme.act_order, scheme.damp, progress, sequential=scheme.sequential,
                                   checkpoint=checkpoint)
    return QuantizeWeightsAWQ(scheme, windows, gptq=scheme.algorithm == Algorithm.AWQ_GPTQ, progress=progress)


def _smooth(model: ir.Model, scheme: WeightScheme, act: ActivationScheme, windows: np.ndarray, progress):
    """Calibrate the inputs of the quantized linears once, fold SmoothQuant's scales (if asked), and return
    (the fold pass or None, the stats of the now-smoothed inputs for static activation scales)."""
    linears = [lin for lin in analysis.analyze(model).linears() if bits_for(scheme, lin) is not None]
    taps = list(dict.fromkeys(lin.node.inputs[0] for lin in linears))
    rows = 8 if act.static or act.alpha is None else 0  # 8 random tokens per window for the searches
    stats = calibration.collect(model, taps, windows, hessian=False, progress=progress,
                                label="Calibrating (activations)", rows_per_window=rows)
    if not act.smoothquant:
        return None, stats

    def quantize_weight(w):
        if scheme.fp8:
            return quantize_fp8(w).dequantize()
        return quantize_rtn(w, scheme.bits, scheme.group_size, scheme.symmetric, positive=scheme.positive_scales).dequantize()

    fold = FoldSmoothQuantScales(act, stats, quantize_weight, scheme.skip)
    fold(model)
    return fold, stats


def _compare(base: _Evaluated, quant: _Evaluated) -> dict:
    b, q = base.metrics, quant.metrics
    return {
        "float": b,
        "quantized": q,
        "ppl_increase_pct": round(100 * (q["ppl"] / b["ppl"] - 1), 3),
        "argmax_agreement": round(float((base.predictions == quant.predictions).mean()), 4),
        "decode_speedup": round(b["decode_ms_per_token"] / q["decode_ms_per_token"], 2),
        "size_ratio": round(q["size_bytes"] / b["size_bytes"], 4),
    }


def compile(
    source: str | pathlib.Path = "smollm2-135m",
    target: str = "ort-int4",
    out_dir: str | pathlib.Path | None = None,
    *,
    algo: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    lm_head_bits: int | None | str = "default",
    embedding_bits: int | None | str = "default",
    accuracy_level: int | None = None,
    act_order: bool | None = None,
    gptq_mode: str | None = None,
    positive_scales: bool | None = None,
    activations: str | None = None,
    smoothquant: bool | None = None,
    smooth_up_down: bool | None = None,
    alpha: float | None | str = "default",
    calib: str | pathlib.Path | None = None,
    calib_samples: int | None = None,
    calib_seqlen: int = calibration.DEFAULT_SEQLEN,
    eval_windows: int | None = 32,
    engine: bool = False,
    rotate: bool | None = None,
    rotation_seed: int = 0,
    attention_hadamards: bool | None = None,
    rotation: str | None = None,
    kv_cache_bits: int | None = None,
    activation_clip: float | None = None,
    fuse: bool | None = None,
    resume: bool = False,
    progress=None,
) -> artifact.Artifact:
    """Compile `source` for `target`; returns the Artifact (its `.metrics` is the manifest's metrics).

    `eval_windows=None` skips evaluation. Options left as None take the target's defaults (`lm_head_bits`
    None means float and `alpha` None means a per-layer search, so their "use the default" value is the
    string "default"). `gptq_mode`: "parallel" (default; all Hessians from the float model) or "sequential"
    (block by block on the partly quantized model). `activations`: none, int8-static, int8-dynamic, int4-dynamic or fp8-static. Calibration (GPTQ, AWQ)
    reads WikiText-2 valid.txt unless `calib` names a text or JSONL file: `calib_samples` windows of
    `calib_seqlen` tokens (at most the model's context; samples default to 128, or 32 when only a 4-bit lm_head
    is calibrated). The output folder appears only
    when everything succeeded. `engine=True` (trt-* targets) also builds a TensorRT engine into it.
    `rotate` applies QuaRot's rotations (seeded by `rotation_seed`) to the float model before calibration;
    `attention_hadamards` adds online Hadamards on o_proj's input and on the post-RoPE queries and keys
    (default: on with rotations when activations are 4-bit or the KV cache is quantized). `rotation`: how the
    block norms' outputs are rotated: "residual" (QuaRot: the residual stream, offline) or "smoothed" (each
    norm output scaled per channel, then an online Hadamard; calibrated; see `SmoothRotateNormOutputs`; down_proj's
    input is then scaled per channel too, through up_proj, before its Hadamard); default smoothed for 4-bit
    activations, residual otherwise.
    `kv_cache_bits` (4 or 8) quantizes the KV cache (per token and head, asymmetric); `activation_clip` is
    the clip ratio of dynamic per-token activation scales. `fuse` (ORT targets, default on) fuses each
    attention into com.microsoft.GroupQueryAttention and the norms into (Skip)SimplifiedLayerNormalization.
    GPTQ compiles save each finished linear beside `out` (see `checkpoint`); `resume=True` continues an
    interrupted one from there, and the artifact is byte-identical to an uninterrupted run's.
    """
    started = time.perf_counter()
    tgt = targets.get(target)
    if gptq_mode not in (None, "parallel", "sequential"):
        raise errors.InputError(f"unknown GPTQ mode '{gptq_mode}': use parallel or sequential")
    options = {"algorithm": parse_algorithm(algo) if algo else None, "bits": bits, "group_size": group_size,
               "symmetric": symmetric, "act_order": act_order, "positive_scales": positive_scales,
               "sequential": None if gptq_mode is None else gptq_mode == "sequential"}
    changes = {k: v for k, v in options.items() if v is not None}
    for name, value in (("lm_head_bits", lm_head_bits), ("embedding_bits", embedding_bits)):
        if value != "default":
            changes[name] = value
    scheme = dataclasses.replace(tgt.scheme, **changes)
    act_changes = {k: v for k, v in (("smoothquant", smoothquant), ("smooth_up_down", smooth_up_down)) if v is not None}
    if activations is not None:
        act_changes["kind"] = _parse_activations(activations)
    if alpha != "default":
        act_changes["alpha"] = alpha
    if activation_clip is not None:
        act_changes["clip"] = activation_clip
    act = dataclasses.replace(tgt.activations, **act_changes)
    if activation_clip is None and act.kind == ActivationKind.INT4_DYNAMIC:
        act = dataclasses.replace(act, clip=INT4_CLIP)
    if rotate is not None:
        tgt = dataclasses.replace(tgt, rotate=rotate)
    if fuse is not None:
        tgt = dataclasses.replace(tgt, fuse=fuse)
    if accuracy_level is not None:
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise errors.InputError(f"accuracy level {accuracy_level} is not one of 0, 1, 2, 3, 4")
        tgt = dataclasses.replace(tgt, accuracy_level=accuracy_level)
    if tgt.runtime == "tensorrt" and not (scheme.symmetric and scheme.positive_scales):
        raise errors.InputError(f"{tgt.name} needs symmetric weights with positive scales ({tgt.runtime} rejects zero "
                                "points and negative scales): drop --asymmetric / --signed-scales")
    if tgt.runtime == "tensorrt" and act.dynamic:
        raise errors.InputError(f"{tgt.name}: TensorRT's explicit quantization is static per tensor: "
                                "use --activations int8-static or fp8-static")
    if scheme.fp8 and scheme.algorithm != Algorithm.RTN:
        raise errors.InputError(f"FP8 weights are rounded to nearest: drop --algo {scheme.algorithm.value}")
    if scheme.embedding_bits is not None and tgt.runtime != "onnxruntime":
        raise errors.InputError(f"quantized embeddings run on ONNX Runtime (GatherBlockQuantized): drop --embeddings for {tgt.name}")
    if engine and tgt.runtime != "tensorrt":
        raise errors.InputError(f"--engine builds TensorRT engines: {tgt.name} is an {tgt.runtime} target (use trt-int4, trt-int8 or trt-fp8)")
    if rotation not in (None, "residual", "smoothed"):
        raise errors.InputError(f"unknown rotation '{rotation}': use residual or smoothed")
    if rotation is not None and not tgt.rotate:
        raise errors.InputError(f"--rotation {rotation} chooses among QuaRot's rotations: add --rotate or drop --rotation")
    if resume and scheme.algorithm != Algorithm.GPTQ:
        raise errors.InputError(f"--resume continues GPTQ compiles (--algo gptq); --algo {scheme.algorithm.value} "
                                "keeps no state to resume from")
    if eval_windows is not None and not 1 <= eval_windows <= 500:
        raise errors.InputError(f"--eval-windows {eval_windows} is out of range: use 1..500 or --no-eval")

    src = sources.resolve(source)
    out = pathlib.Path(out_dir) if out_dir is not None else DEFAULT_OUT_ROOT / f"{src.name}-{tgt.name}"
    artifact.check_output(out)

    if src.kind == sources.SourceKind.ONNX:
        float_path, float_cache = src.path, None
    else:
        float_dir = _export(src, None, progress)
        float_path, float_cache = float_dir / export_mod.MODEL_FILE, float_dir
    model = artifact.load_onnx(float_path)
    analysis.analyze(model)  # fail early, before any work, on an unsupported graph
    if eval_windows is not None:
        _require_tokenizer(float_path, "evaluate with", " or pass --no-eval")
    if tgt.edge and not (float_path.parent / "config.json").is_file():
        raise errors.InputError(f"no config.json beside '{float_path}': an edge package needs the model's HF config")
    if attention_hadamards is None:
        attention_hadamards = default_attention_hadamards(tgt.rotate, act.kind == ActivationKind.INT4_DYNAMIC,
                                                          kv_cache_bits is not None)
    if attention_hadamards and not tgt.rotate:
        raise errors.InputError("attention Hadamards are part of QuaRot's rotations: add --rotate or drop --attention-hadamards")
    rotation = rotation or ("smoothed" if act.kind == ActivationKind.INT4_DYNAMIC else "residual")
    smoothed = tgt.rotate and rotation == "smoothed"
    windows, calib_record = None, None
    head_first = _head_first(scheme)
    body_calibrated = scheme.algorithm != Algorithm.RTN or act.smoothquant or act.static or smoothed
    if body_calibrated or head_first:
        _require_tokenizer(float_path, "calibrate with", " or pass --lm-head int8 (a 4-bit lm_head is calibrated)"
                           if head_first and not body_calibrated else "")
        context = _context_length(float_path.parent)
        calib_seqlen = min(calib_seqlen, context or calib_seqlen)  # windows past the model's context would fail
        if calib_samples is None:
            calib_samples = calibration.DEFAULT_SAMPLES if body_calibrated else calibration.LM_HEAD_SAMPLES
        windows = calibration.calibration_windows(load_tokenizer(float_path.parent), calib, calib_samples, calib_seqlen)
        calib_record = {"file": str(calib) if calib else "wikitext-2 valid.txt (packaged)", "samples": calib_samples,
                        "seqlen": calib_seqlen, "tokens_sha256": hashlib.sha256(windows.tobytes()).hexdigest()}
    rotations = _rotations(rotation_seed, attention_hadamards, windows if smoothed else None, progress) if tgt.rotate else []
    for step in rotations:
        step(model)
    smooth, stats = _smooth(model, scheme, act, windows, progress) if act.smoothquant or act.static else (None, None)
    saved = None
    if scheme.algorithm == Algorithm.GPTQ:
        fingerprint = {"qcompile": __version__, "source": src.describe(), "target": tgt.name, "weights": scheme.to_dict(),
                       "activations": dataclasses.asdict(act), "calibration": calib_record,
                       "rotation": [rotation_seed, attention_hadamards, rotation] if rotations else None}
        saved = checkpoint.Checkpoint(out, fingerprint, resume)
    head = None
    if head_first:
        head = QuantizeWeightsGPTQ(scheme, windows, scheme.act_order, scheme.damp, progress, names={"lm_head"})
        head(model)
    quantize = _weight_pass(dataclasses.replace(scheme, skip=(*scheme.skip, "lm_head")) if head else scheme,
                            windows, progress, saved)
    quantize(model)
    layers = quantize.layers
    if head is not None:
        head_record = next(r for r in head.layers if r["name"] == "lm_head")
        layers = [head_record if r["name"] == "lm_head" else r for r in layers]
    quantize_acts = None
    if act.kind != ActivationKind.NONE:
        quantize_acts = QuantizeActivations(act.kind, stats, lm_head=act.lm_head, clip=act.clip)
        quantize_acts(model)
    kv_cache = QuantizeKVCache(kv_cache_bits) if kv_cache_bits is not None else None
    if kv_cache is not None:
        kv_cache(model)
    embed = None
    if scheme.embedding_bits is not None:
        # a per-channel recipe (group 0) still blocks the table along H: GatherBlockQuantized needs blocks
        embed = QuantizeEmbedding(scheme.embedding_bits, scheme.group_size or 128, scheme.positive_scales)
        embed(model)
    digests = fidelity.digests(model)
    lowering = tgt.lowering_passes(_context_length(float_path.parent))
    for lower in lowering:  # called directly, like every other pass here, so their own errors reach the user
        lower(model)
    checks = _check_lowered(model, tgt, digests)

    with artifact.atomic_folder(out) as tmp:
        ir.save(model, tmp / "model.onnx", external_data="model.onnx.data")
        del model
        artifact.copy_tokenizer(float_path.parent, tmp)
        package_record = package.write_edge_files(tmp, out.name) if tgt.edge else None
        metrics = {}
        if eval_windows is not None:
            base = _evaluate(float_path, eval_windows, progress, "(float)", float_cache)
            quant = _evaluate(tmp / "model.onnx", eval_windows, progress, "(quantized)")
            metrics = _compare(base, quant)
        metrics["compile_seconds"] = round(time.perf_counter() - started, 1)
        manifest = {
            "qcompile_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": src.describe(),
            "target": {"name": tgt.name, "runtime": tgt.runtime, "accuracy_level": tgt.accuracy_level,
                       **{"fused_attention": p.record() for p in lowering if isinstance(p, FuseGroupQueryAttention)}},
            "recipe": {"weights": scheme.to_dict(), "activations": _activation_record(act, smooth, quantize_acts),
                       "calibration": calib_record,
                       "kv_cache": {"bits": kv_cache_bits, "symmetric": False, "group": "head_dim"} if kv_cache else None,
                       "rotation": {"seed": rotation_seed, "norm_outputs": rotation,
                                    "online_hadamard": (["norm outputs"] if smoothed else []) + (["down", "o", "query", "key"] if attention_hadamards else ["down"])}
                       if rotations else None,
                       "passes": [type(p).__name__ for p in (*rotations, smooth, head, quantize, quantize_acts, kv_cache, embed, *lowering)
                                  if p is not None]},
            "layers": layers + ([embed.record] if embed else []),
            "fidelity": {"weights": digests, **checks},
            "versions": artifact.package_versions(),
            "metrics": metrics,
        }
        if package_record:
            manifest["package"] = package_record
        artifact.write_manifest(tmp, manifest)
    if saved is not None:
        saved.remove()  # the artifact is complete: nothing is left to resume
    if tgt.edge:
        package.zip_folder(out, out.with_name(f"{out.name}.zip"))
    if engine:
        engine_mod.build(out, progress=progress)
    return artifact.Artifact.load(out)


def _require_tokenizer(float_path: pathlib.Path, purpose: str, fix: str) -> None:
    if not (float_path.parent / "tokenizer.json").is_file():
        raise errors.InputError(f"no tokenizer.json beside '{float_path}' to {purpose}: copy it there{fix}")


def _context_length(folder: pathlib.Path) -> int | None:
    """max_position_embeddings from the HF config beside the float model (None if there is none)."""
    config = folder / "config.json"
    return json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None


def default_attention_hadamards(rotate: bool, int4_activations: bool, quantized_cache: bool) -> bool:
    """Whether rotations include the attention Hadamards unless asked otherwise: for 4-bit activations or a
    quantized KV cache, whose outliers they spread."""
    return rotate and (int4_activations or quantized_cache)


def _rotations(seed: int, attention: bool, smoothed_windows: np.ndarray | None = None, progress=None) -> list[ir.passes.PassBase]:
    """QuaRot on the float graph, in order: γ into the readers, the residual stream by a seeded random
    Hadamard, each value head, and an online Hadamard before down_proj; with `attention` also before
    o_proj and on the post-RoPE queries and keys (for 4-bit activations and KV cache). Float-equivalent.
    With `smoothed_windows` the first two become SmoothRotateNormOutputs, and down_proj's input is smoothed the
    same way before its Hadamard, both calibrated on those windows."""
    online = InsertOnlineHadamard((analysis.Role.DOWN, analysis.Role.O) if attention else (analysis.Role.DOWN,))
    norms = ([SmoothRotateNormOutputs(smoothed_windows, seed=seed, progress=progress, down_inputs=True)]
             if smoothed_windows is not None
             else [FuseNormGains(), RotateResidualStream(seed)])
    return [*norms, RotateValueOutput(seed), online, *([InsertQueryKeyHadamard()] if attention else [])]


def _parse_activations(name: str) -> ActivationKind:
    try:
        return ActivationKind(name.lower())
    except ValueError:
        raise errors.InputError(f"unknown activation scheme '{name}': use one of {', '.join(k.value for k in ActivationKind)}") from None


def _activation_record(act: ActivationScheme, smooth, quantize_acts) -> dict:
    record = act.to_dict()
    if smooth is not None:
        record["alphas"] = smooth.alphas
    if quantize_acts is not None and quantize_acts.scales:
        scales = list(quantize_acts.scales.values())
        record["static_scales"] = {"count": len(scales), "min": min(scales), "max": max(scales)}
    return record


def _check_lowered(model: ir.Model, tgt, digests: dict[str, str]) -> dict:
    """Prove the lowering kept every integer and scale (and, for TensorRT, every parser rule)."""
    problems = fidelity.compare_digests(digests, model)
    if problems:
        raise errors.QcompileError(f"lowering to {tgt.name} changed quantized weights: {'; '.join(problems[:3])}")
    checks = {"lowered_weights": "bit-identical to the canonical model"}
    if tgt.runtime == "tensorrt":
        violations = check_tensorrt(model)
        if violations:
            raise errors.QcompileError(f"{tgt.name} output breaks TensorRT rules: {'; '.join(map(str, violations[:3]))}")
        checks["tensorrt_check"] = "passed"
    return checks


def evaluate(path: str | pathlib.Path, windows: int = evaluation.DEFAULT_WINDOWS, latency: bool = True, progress=None) -> dict:
    """Perplexity (pinned protocol), latency and size of an artifact, export folder or .onnx file,
    or of a float source (HF folder, GGUF, alias), exported first (cached)."""
    src = sources.resolve(path)
    model_path = src.path if src.kind == sources.SourceKind.ONNX else _export(src, None, progress) / export_mod.MODEL_FILE
    ppl, lat = evaluation.evaluate_model(model_path, windows, latency, progress)
    return {**ppl.to_dict(), **lat, "size_bytes": artifact.model_bytes(model_path)}
