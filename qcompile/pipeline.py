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

from qcompile import __version__, analysis, artifact, calibration, checkpoint, errors, evaluation, export as export_mod, fidelity, scratch, sources, targets
from qcompile import engine as engine_mod
from qcompile import recipe as recipe_mod
from qcompile.algorithms.rtn import quantize_fp8, quantize_rtn
from qcompile.analysis import Role
from qcompile.passes import (FoldSmoothQuantScales, FuseNormGains, InsertOnlineHadamard, InsertQueryKeyHadamard, QuantizeActivations,
                             QuantizeEmbedding, QuantizeKVCache, QuantizeWeightsAWQ, QuantizeWeightsGPTQ, QuantizeWeightsRTN,
                             RotateResidualStream, RotateValueOutput, SmoothRotateNormOutputs, WherePossible)
from qcompile.passes import _canonical
from qcompile.passes.calibrate import Calibrate
from qcompile.recipe import NormRotation, Recipe
from qcompile.runtime import Decoder, load_tokenizer
from qcompile.schemes import ActivationKind, Algorithm, WeightScheme

DEFAULT_OUT_ROOT = pathlib.Path("qcompile-out")


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
        out = cache_root() / "exports" / f"{src.name}-{src.sha256[:16]}-{__version__}-e{export_mod.EXPORT_FORMAT}"
        if (out / "model.onnx").is_file():
            return out
    else:
        out = pathlib.Path(out_dir)
    artifact.check_output(out)  # before the minutes of tracing and writing
    with artifact.atomic_folder(out) as tmp:
        export_mod.export_source(src, tmp, progress)
        (tmp / "export.json").write_text(json.dumps({"source": src.describe(), "qcompile": __version__,
                                                      "versions": artifact.package_versions()}, indent=2))
    return out


@dataclasses.dataclass
class _Evaluated:
    metrics: dict
    predictions: np.ndarray | None


def _evaluate(model_path: pathlib.Path, windows: int, progress, label: str, cache: pathlib.Path | None = None) -> _Evaluated:
    """Perplexity, latency and size of one model. With `cache` (a folder per source, see
    `_float_cache`) the perplexity is reused across compiles; latency is always measured now, so the
    float/quantized timings share a run."""
    cached = cache / f"perplexity-{windows}.json" if cache is not None else None
    if cached is not None and cached.is_file():
        ppl = json.loads(cached.read_text())
        predictions = np.load(cache / f"predictions-{windows}.npy")
        lat = evaluation.latency(Decoder(model_path))
    else:
        result, lat = evaluation.evaluate_model(model_path, windows, progress=progress, label=label)
        ppl, predictions = result.to_dict(), result.predictions
        if cached is not None:
            cache.mkdir(parents=True, exist_ok=True)
            np.save(cache / f"predictions-{windows}.npy", predictions)
            artifact.publish_text(cached, json.dumps(ppl, indent=2))  # last: it marks the pair complete
    return _Evaluated({**ppl, **lat, "size_bytes": artifact.model_bytes(model_path)}, predictions)


def _float_cache(src: sources.Source) -> pathlib.Path:
    """Where the float model's evaluation is kept: one folder per source content, whatever its kind."""
    return cache_root() / "evaluations" / f"{src.name}-{src.sha256[:16]}-{__version__}"


def compile(source: str | pathlib.Path = "smollm2-135m", target: str | None = None, out_dir: str | pathlib.Path | None = None,
            recipe: str | pathlib.Path | dict | Recipe | None = None, *, eval_windows: int | None = 32,
            max_ppl_increase: float | None = None, engine: bool = False, resume: bool = False, progress=None,
            **overrides) -> artifact.Artifact:
    """Compile `source` for `target`; returns the Artifact (its `.metrics` is the manifest's metrics).

    The recipe is `target`'s defaults (ort-int4 when neither `target` nor `recipe` names one), then
    `recipe` (a TOML/JSON file, an artifact's manifest.json, a dict or a Recipe), then `overrides`
    (`recipe.OPTIONS`: algo, bits, group_size, lm_head_bits, activations, rotate, kv_cache_bits, calib,
    ...), all checked before any work. `eval_windows=None` skips evaluation; `max_ppl_increase` (percent over
    the float model's perplexity) is an accuracy gate: past it nothing is written and AccuracyGateError
    (exit code 3) carries the metrics; `engine=True` (TensorRT
    targets) also builds an engine; `resume=True` continues an interrupted GPTQ compile from the state
    kept beside `out_dir` (the artifact is byte-identical to an uninterrupted run's). The output folder
    appears only when everything succeeded.
    """
    started = time.perf_counter()
    plan = recipe_mod.resolve(target, recipe, overrides)
    tgt = targets.get(plan.target)
    _check_run_options(plan, tgt, eval_windows, max_ppl_increase, engine, resume)
    src = sources.resolve(source)
    out = pathlib.Path(out_dir) if out_dir is not None else DEFAULT_OUT_ROOT / f"{src.name}-{tgt.name}"
    artifact.check_output(out)
    with artifact.scratch_folder(out) as tmp, scratch.into(tmp):  # big tensors wait on disk, not in memory
        canonical = _quantize(src, plan, [tgt], eval_windows is not None, out, resume, progress)
        return _lower(canonical, plan, tgt, out, eval_windows, max_ppl_increase, engine, progress, started)


def compile_many(source: str | pathlib.Path, target_names: list[str], out_dir: str | pathlib.Path | None = None,
                 recipe: str | pathlib.Path | dict | Recipe | None = None, *, eval_windows: int | None = 32,
                 max_ppl_increase: float | None = None, engine: bool = False, progress=None,
                 **overrides) -> dict[str, artifact.Artifact]:
    """Quantize `source` once and lower the same canonical model to each of `target_names` (whose
    resolved recipes must agree on everything but the lowering): one artifact per target, in
    `out_dir`/<target> (default qcompile-out/<source>-<target>); `engine` builds the TensorRT targets' engines.
    Returns {target: Artifact}; check them against each other with `fidelity.verify_all`."""
    started = time.perf_counter()
    plans = [recipe_mod.resolve(name, recipe, overrides) for name in dict.fromkeys(target_names)]
    _require_one_canonical(plans)
    tgts = [targets.get(plan.target) for plan in plans]
    if engine and not any(tgt.builds_engines for tgt in tgts):
        _check_run_options(plans[0], tgts[0], eval_windows, max_ppl_increase, engine, False)  # names the fix
    for plan, tgt in zip(plans, tgts):
        _check_run_options(plan, tgt, eval_windows, max_ppl_increase, engine and tgt.builds_engines, False)
    src = sources.resolve(source)
    outs = [pathlib.Path(out_dir) / tgt.name if out_dir is not None else DEFAULT_OUT_ROOT / f"{src.name}-{tgt.name}" for tgt in tgts]
    for out in outs:
        artifact.check_output(out)
    arts = {}
    with artifact.scratch_folder(outs[0]) as tmp, scratch.into(tmp):
        canonical = _quantize(src, plans[0], tgts, eval_windows is not None, outs[0], False, progress)
        ir.save(canonical.model, tmp / "model.onnx", external_data="model.onnx.data")
        for plan, tgt, out in zip(plans, tgts, outs):  # each target lowers its own load of the saved canonical model
            canonical.model = scratch.unmapped(artifact.load_onnx(tmp / "model.onnx"))
            arts[tgt.name] = _lower(canonical, plan, tgt, out, eval_windows, max_ppl_increase, engine and tgt.builds_engines,
                                    progress, started)
    return arts


def _require_one_canonical(plans: list[Recipe]) -> None:
    sections = [{k: v for k, v in recipe_mod.to_dict(plan).items() if k not in ("target", "lowering")} for plan in plans]
    for plan, section in zip(plans[1:], sections[1:]):
        differ = [k for k in section if section[k] != sections[0][k]]
        if differ:
            raise errors.InputError(f"{plans[0].target} and {plan.target} quantize differently ({', '.join(differ)}): "
                                    "one compile lowers one canonical model, so compile them separately")


@dataclasses.dataclass
class _Canonical:
    """The quantized canonical model and what its lowerings need: the float model, the passes' results,
    the quantized weights' digests, the calibration record and GPTQ's resumable state."""
    model: ir.Model | None
    src: sources.Source
    float_path: pathlib.Path
    results: list
    digests: dict
    calib_record: dict | None
    saved: checkpoint.Checkpoint | None


def _quantize(src: sources.Source, plan: Recipe, tgts: list[targets.Target], evaluated: bool, out: pathlib.Path,
              resume: bool, progress) -> _Canonical:
    float_path = src.path if src.kind == sources.SourceKind.ONNX else _export(src, None, progress) / export_mod.MODEL_FILE
    model = scratch.unmapped(artifact.load_onnx(float_path))
    tied = analysis.analyze(model).tied_lm_head  # and fail early, before any work, on an unsupported graph
    for tgt in tgts:
        tgt.check_source(float_path.parent)
    if evaluated:
        _require_evaluable(float_path)
    windows, calib_record = _calibration_windows(plan, float_path)
    saved = checkpoint.Checkpoint(out, {"qcompile": __version__, "source": src.describe(), "recipe": recipe_mod.to_dict(plan),
                                        "calibration": calib_record}, resume) if plan.weights.algorithm == Algorithm.GPTQ else None
    passes = build_passes(plan, windows, progress, saved, tied)
    _check_calibration_fits(passes, float_path)
    results = run_passes(model, passes)
    return _Canonical(model, src, float_path, results, fidelity.digests(model, _canonical), calib_record, saved)


def _check_calibration_fits(passes: list, float_path: pathlib.Path) -> None:
    """The shared calibration runs the float model up to its last norm in one ONNX Runtime session: refuse,
    before any work, a model whose float weights exceed the memory available (ORT would be killed midway)."""
    if not any(isinstance(p, Calibrate) for p in passes):
        return
    need, free = artifact.model_bytes(float_path), available_memory()
    if free is not None and need > free:
        raise errors.InputError(
            f"this recipe calibrates the whole float model ({need / 1e9:.1f} GB) in one ONNX Runtime session, more "
            f"than the {free / 1e9:.1f} GB of memory available: pass --algo gptq (it calibrates one block at a time) "
            "or --algo rtn --lm-head int8 (no calibration)")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where it is unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _lower(canonical: _Canonical, plan: Recipe, tgt: targets.Target, out: pathlib.Path, eval_windows: int | None,
           max_ppl_increase: float | None, engine: bool, progress, started: float) -> artifact.Artifact:
    """Lower the canonical model (taken from `canonical`, changed in place) to `tgt`; write, evaluate and gate the artifact."""
    model, canonical.model = canonical.model, None  # freed once saved, before the evaluation
    float_path = canonical.float_path
    lowered = run_passes(model, tgt.lowering_passes(plan, context_length(float_path.parent)))
    checks = _check_lowered(model, tgt, canonical.digests)
    with artifact.atomic_folder(out) as tmp:
        ir.save(model, tmp / "model.onnx", external_data="model.onnx.data")
        del model
        artifact.copy_tokenizer(float_path.parent, tmp)
        package_record = tgt.package(tmp, out.name)
        metrics = {}
        if eval_windows is not None:
            base = _evaluate(float_path, eval_windows, progress, "(float)", _float_cache(canonical.src))
            metrics = _compare(base, _evaluate(tmp / "model.onnx", eval_windows, progress, "(quantized)"))
            _gate(metrics, max_ppl_increase, canonical.saved)
        metrics["compile_seconds"] = round(time.perf_counter() - started, 1)
        manifest = _manifest(canonical.src, tgt, plan, canonical.calib_record, canonical.results, lowered,
                             {"weights": canonical.digests, **checks}, metrics, package_record)
        artifact.write_manifest(tmp, manifest)
    if canonical.saved is not None:
        canonical.saved.remove()  # the artifact is complete: nothing is left to resume
    tgt.finish(out)
    if engine:
        engine_mod.build(out, progress=progress)
    return artifact.Artifact.load(out)


def _manifest(src, tgt, plan, calib_record, results, lowered, fidelity_record, metrics, package_record) -> dict:
    """What was done and measured: the recipe (enough to rebuild the artifact), each pass's result, each
    weight's format, the quantized weights' digests, the metrics."""
    return {
        "qcompile_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": src.describe(),
        "target": {"name": tgt.name, "runtime": tgt.runtime},
        "recipe": recipe_mod.to_dict(plan),
        "calibration": calib_record,
        "passes": [{"name": getattr(p, "manifest_name", type(p).__name__), "modified": r.modified, **getattr(r, "record", {})} for p, r in results + lowered],
        "layers": merged_layers(r for _, r in results),
        "fidelity": fidelity_record,
        "versions": artifact.package_versions(),
        "metrics": metrics,
        **({"package": package_record} if package_record else {}),
    }


def _check_run_options(plan: Recipe, tgt: targets.Target, eval_windows: int | None, max_ppl_increase: float | None,
                       engine: bool, resume: bool) -> None:
    if engine and not tgt.builds_engines:
        raise errors.InputError(f"--engine builds TensorRT engines: {tgt.name} is an {tgt.runtime} target (use trt-int4, trt-int8 or trt-fp8)")
    if resume and plan.weights.algorithm != Algorithm.GPTQ:
        raise errors.InputError(f"--resume continues GPTQ compiles (--algo gptq); --algo {plan.weights.algorithm.value} "
                                "keeps no state to resume from")
    if eval_windows is not None and not 1 <= eval_windows <= 500:
        raise errors.InputError(f"--eval-windows {eval_windows} is out of range: use 1..500 or --no-eval")
    if max_ppl_increase is not None and eval_windows is None:
        raise errors.InputError("--max-ppl-increase gates on the measured perplexity: drop --no-eval, or drop the gate")
    if max_ppl_increase is not None and not max_ppl_increase >= 0:
        raise errors.InputError(f"--max-ppl-increase {max_ppl_increase} is not a percentage: use a number >= 0, e.g. 15")


def _gate(metrics: dict, bound: float | None, saved: checkpoint.Checkpoint | None) -> None:
    """Record the accuracy gate in the metrics, or fail it (inside the temporary folder: nothing is written)."""
    if bound is None:
        return
    if metrics["ppl_increase_pct"] > bound:
        if saved is not None:
            saved.remove()  # the compile finished: there is nothing to resume
        raise errors.AccuracyGateError(metrics, bound)
    metrics["accuracy_gate"] = {"max_ppl_increase_pct": bound, "passed": True}


def _calibration_windows(plan: Recipe, float_path: pathlib.Path) -> tuple[np.ndarray | None, dict | None]:
    """The recipe's calibration token windows (None when nothing is calibrated) and their manifest record."""
    if not plan.calibrated:
        return None, None
    uncalibrated = [*(["--algo rtn"] if plan.weights.algorithm != Algorithm.RTN else []),
                    *(["--lm-head int8"] if plan.lm_head.bits == 4 else []),
                    *(["--kv-cache float"] if plan.kv_cache.bits is not None else [])]
    _require_tokenizer(float_path, "calibrate with", f", or pass {' '.join(uncalibrated)} (uncalibrated)" if uncalibrated else "")
    cal = plan.calibration
    context = context_length(float_path.parent)
    seqlen = min(cal.seqlen, context or cal.seqlen)  # windows past the model's context would fail
    windows = calibration.calibration_windows(load_tokenizer(float_path.parent), cal.file, cal.samples, seqlen)
    return windows, {"file": cal.file or "wikitext-2 valid.txt (packaged)", "samples": cal.samples, "seqlen": seqlen,
                     "tokens_sha256": hashlib.sha256(windows.tobytes()).hexdigest()}


def _require_tokenizer(float_path: pathlib.Path, purpose: str, fix: str) -> None:
    if not (float_path.parent / "tokenizer.json").is_file():
        raise errors.InputError(f"no tokenizer.json beside '{float_path}' to {purpose}: copy it there{fix}")


def _require_evaluable(float_path: pathlib.Path) -> None:
    _require_tokenizer(float_path, "evaluate with", " or pass --no-eval")
    context = context_length(float_path.parent)
    if context is not None and context < evaluation.SEQ_LEN:
        raise errors.InputError(f"the model's context ({context} tokens) is shorter than the {evaluation.SEQ_LEN}-token "
                                "evaluation windows: pass --no-eval")


def context_length(folder: pathlib.Path) -> int | None:
    """max_position_embeddings from the HF config beside the float model (None if there is none)."""
    config = folder / "config.json"
    return json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None


# The recipe's enums choose passes from these registries. A weight pass marked `shares_calibration` takes
# its statistics from the one float calibration run; the others (GPTQ) walk the blocks themselves.
_NORM_ROTATIONS = {  # the smoothed rotation measures the float model's norm outputs itself, before it rotates
    NormRotation.RESIDUAL: lambda rot, windows, progress: [FuseNormGains(), RotateResidualStream(rot.seed)],
    NormRotation.SMOOTHED: lambda rot, windows, progress: [SmoothRotateNormOutputs(windows, seed=rot.seed, progress=progress,
                                                                                   down_inputs=True)],
}
_WEIGHT_PASSES = {
    Algorithm.RTN: (lambda scheme, windows, progress, saved: QuantizeWeightsRTN(scheme, progress), False),
    Algorithm.GPTQ: (lambda scheme, windows, progress, saved: QuantizeWeightsGPTQ(
        scheme, windows, scheme.act_order, scheme.damp, progress, sequential=scheme.sequential, checkpoint=saved), False),
    Algorithm.AWQ: (lambda scheme, windows, progress, saved: QuantizeWeightsAWQ(scheme, progress=progress), True),
    Algorithm.AWQ_GPTQ: (lambda scheme, windows, progress, saved: QuantizeWeightsAWQ(scheme, gptq=True, progress=progress), True),
}


def build_passes(plan: Recipe, windows: np.ndarray | None, progress=None, saved: checkpoint.Checkpoint | None = None,
                 tied: bool = False) -> list[ir.passes.PassBase]:
    """The passes that turn the float model into the canonical quantized model, in order: QuaRot's
    rotations (float-equivalent), one calibration run for every pass that needs the float model's
    statistics, SmoothQuant's fold, the weights (a 4-bit lm_head by GPTQ first, when the blocks are not
    GPTQ's), the activation and KV-cache quantizers, the embedding. `tied`: the float model's lm_head reads
    the embedding table; quantized to the same width, the table then takes the lm_head's integers."""
    scheme, act, rot = plan.weight_scheme(), plan.activations, plan.rotation
    passes: list[ir.passes.PassBase] = []
    if rot.enabled:
        online = InsertOnlineHadamard((Role.DOWN, Role.O) if rot.attention_hadamards else (Role.DOWN,))
        passes += [WherePossible(*_NORM_ROTATIONS[rot.norm_outputs](rot, windows, progress)),  # each where the
                   WherePossible(RotateValueOutput(rot.seed)), online,                       # structure allows it
                   *([WherePossible(InsertQueryKeyHadamard())] if rot.attention_hadamards else [])]
    head = QuantizeWeightsGPTQ(scheme, None, scheme.act_order, scheme.damp, progress, names={"lm_head"}) if plan.head_calibrated else None
    make_weights, shares_calibration = _WEIGHT_PASSES[scheme.algorithm]
    weights = make_weights(dataclasses.replace(scheme, skip=(*scheme.skip, "lm_head")) if head else scheme, windows, progress, saved)
    fold = FoldSmoothQuantScales(act, quantize_weight=_fake_quantizer(scheme), skip=scheme.skip, weights=scheme) if act.smoothquant else None
    acts = QuantizeActivations(act.kind, lm_head=act.lm_head, clip=act.clip, weights=scheme) if act.kind != ActivationKind.NONE else None
    kv = QuantizeKVCache(plan.kv_cache.bits) if plan.kv_cache.bits is not None else None
    consumers = [p for p in (fold, acts if act.static else None, head, weights if shares_calibration else None, kv)
                 if p is not None]
    if consumers:
        passes.append(Calibrate(windows, consumers, progress))
    passes += [p for p in (fold, head, weights, acts, kv) if p is not None]
    if plan.embeddings.bits is not None:
        passes.append(_embedding_pass(plan, scheme, tied))
    return passes


def _embedding_pass(plan: Recipe, scheme: WeightScheme, tied: bool) -> QuantizeEmbedding:
    """One table for a tied lm_head and embedding of the same width (a rotation folds the final norm's gain
    into lm_head: they are no longer tied); else the table's own RTN in lm_head's blocks, blocked along H even
    for a per-channel recipe (GatherBlockQuantized needs blocks)."""
    head_group = scheme.lm_head_group_size if plan.lm_head.bits == 4 else scheme.group_size
    if tied and not plan.rotation.enabled and plan.embeddings.bits == plan.lm_head.bits and head_group:
        return QuantizeEmbedding(plan.embeddings.bits, head_group, scheme.positive_scales, shared=True)
    return QuantizeEmbedding(plan.embeddings.bits, head_group or 128, scheme.positive_scales)


def _fake_quantizer(scheme: WeightScheme):
    """w → its dequantized quantization under `scheme` (SmoothQuant's α search scores with it)."""
    if scheme.fp8:
        return lambda w: quantize_fp8(w).dequantize()
    return lambda w: quantize_rtn(w, scheme.bits, scheme.group_size, scheme.symmetric, positive=scheme.positive_scales).dequantize()


class _PassManager(ir.passes.PassManager):
    """onnx-ir's PassManager that keeps every pass's result (for the manifest) and lets a pass's own
    qcompile error through as raised, rather than wrapped in PassError."""

    def __init__(self, passes):
        super().__init__(passes, steps=1)
        self.results: list[tuple[ir.passes.PassBase, ir.passes.PassResult]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for p in self.passes:
            try:
                self.results.append((p, p(model)))
            except ir.passes.PreconditionError as e:
                if isinstance(e.__cause__, errors.QcompileError):
                    raise e.__cause__ from None
                raise
        return ir.passes.PassResult(model, any(r.modified for _, r in self.results))


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> list[tuple[ir.passes.PassBase, ir.passes.PassResult]]:
    """Run `passes` on `model` in order; (pass, its result) for each."""
    if not passes:
        return []
    manager = _PassManager(passes)
    manager(model)
    return manager.results


def merged_layers(results) -> list[dict]:
    """One manifest entry per weight, in model order: the pass that quantized it, else the first to list it."""
    layers: dict[str, dict] = {}
    for result in results:
        for entry in getattr(result, "layers", []):
            if entry["name"] not in layers or "bits" in entry:
                layers[entry["name"]] = entry
    return list(layers.values())


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


def _check_lowered(model: ir.Model, tgt: targets.Target, digests: dict[str, str]) -> dict:
    """Prove the lowering kept every integer and scale (and every rule of the target's runtime)."""
    problems = fidelity.compare_digests(digests, model, tgt)
    if problems:
        raise errors.QcompileError(f"lowering to {tgt.name} changed quantized weights: {'; '.join(problems[:3])}")
    checks = {"lowered_weights": "bit-identical to the canonical model"}
    violations = tgt.check(model)
    if violations:
        raise errors.QcompileError(f"{tgt.name} output breaks {tgt.rules}: {'; '.join(map(str, violations[:3]))}")
    if tgt.rules:
        checks["runtime_rules"] = f"{tgt.rules}: passed"
    return checks


def evaluate(path: str | pathlib.Path, windows: int = evaluation.DEFAULT_WINDOWS, latency: bool = True, progress=None) -> dict:
    """Perplexity (pinned protocol), latency and size of an artifact, export folder or .onnx file,
    or of a float source (HF folder, GGUF, alias), exported first (cached)."""
    src = sources.resolve(path)
    model_path = src.path if src.kind == sources.SourceKind.ONNX else _export(src, None, progress) / export_mod.MODEL_FILE
    ppl, lat = evaluation.evaluate_model(model_path, windows, latency, progress)
    return {**ppl.to_dict(), **lat, "size_bytes": artifact.model_bytes(model_path)}
