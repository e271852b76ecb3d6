"""The pipeline behind `qcompile model` and the Python API: source → float ONNX → canonical → target."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import time

import numpy as np
import onnx_ir as ir

from qcompile import __version__, analysis, artifact, calibration, checkpoint, errors, evaluation, export as export_mod, fidelity, mixed, scratch, sources, targets
from qcompile import engine as engine_mod
from qcompile import recipe as recipe_mod
from qcompile.algorithms.gptq import CLIP_BITS, CLIP_RATIOS, quantize_gptq
from qcompile.algorithms.rtn import quantize_fp8, quantize_rtn
from qcompile.analysis import Role
from qcompile.passes import (FoldSmoothQuantScales, FuseNormGains, InsertOnlineHadamard, InsertQueryKeyHadamard, QuantizeActivations,
                             QuantizeEmbedding, QuantizeExperts, QuantizeKVCache, QuantizeWeightsAWQ, QuantizeWeightsGPTQ, QuantizeWeightsRTN,
                             RotateResidualStream, RotateValueOutput, SmoothRotateNormOutputs, WherePossible)
from qcompile.passes import _canonical
from qcompile.passes.calibrate import Calibrate
from qcompile.recipe import NormRotation, Recipe
from qcompile.runtime import Decoder, load_tokenizer
from qcompile.schemes import ActivationKind, Algorithm, WeightScheme, format_name, parse_format

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
    if out_dir is None:  # cached: compiles of one source started together wait for a single export
        out = cache_root() / "exports" / f"{src.name}-{src.sha256[:16]}-{__version__}-e{export_mod.EXPORT_FORMAT}"
        with artifact.exclusive(out):
            if not (out / "model.onnx").is_file():
                _write_export(src, out, progress)
        return out
    out = pathlib.Path(out_dir)
    _write_export(src, out, progress)
    return out


def _write_export(src: sources.Source, out: pathlib.Path, progress) -> None:
    artifact.check_output(out)  # before the minutes of tracing and writing
    with artifact.atomic_folder(out) as tmp:
        export_mod.export_source(src, tmp, progress)
        (tmp / "export.json").write_text(json.dumps({"source": src.describe(), "qcompile": __version__,
                                                      "versions": artifact.package_versions()}, indent=2))


def _float_model(src: sources.Source, progress) -> pathlib.Path:
    """The float model file of `src`: itself when it is ONNX, else its (cached) export."""
    return src.path if src.kind == sources.SourceKind.ONNX else _export(src, None, progress) / export_mod.MODEL_FILE


@dataclasses.dataclass
class _Evaluated:
    metrics: dict
    predictions: np.ndarray | None


def _evaluate(model_path: pathlib.Path, windows: int, progress, label: str, cache: pathlib.Path | None = None,
              session_config: dict | None = None) -> _Evaluated:
    """Perplexity, latency and size of one model (run under `session_config`). With `cache` (a folder per source,
    see `_float_cache`) the perplexity is reused across compiles; latency is always measured now, so the
    float/quantized timings share a run."""
    cached = cache / f"perplexity-{windows}.json" if cache is not None else None
    if cached is not None and cached.is_file():
        ppl = json.loads(cached.read_text())
        predictions = np.load(cache / f"predictions-{windows}.npy")
        lat = evaluation.latency(Decoder(model_path, session_config))
    else:
        result, lat = evaluation.evaluate_model(model_path, windows, progress=progress, label=label,
                                                session_config=session_config)
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
            bits_per_weight: float | None = None, search: bool = False, formats: list[str] | None = None,
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

    Mixed precision (see `mixed`): `bits_per_weight=B` chooses each linear's format among the target's
    (`Target.mixed_formats`, or `formats`, e.g. ["int4g32", "int8g128"]) by measured sensitivity, for the least
    estimated loss within B stored bits per weight; `search=True` with `max_ppl_increase=P` alone chooses the
    smallest mix that meets P, measured (trying larger mixes while the measurement misses). The chosen formats
    are the artifact recipe's `weights.layers` and `lm_head`: `recipe=ART/manifest.json` replays them.
    """
    started = time.perf_counter()
    plan = recipe_mod.resolve(target, recipe, overrides)
    tgt = targets.get(plan.target)
    _check_run_options(plan, tgt, eval_windows, max_ppl_increase, engine, resume)
    search = search or bits_per_weight is not None
    candidates = tuple(formats or tgt.mixed_formats)
    if search:
        _check_search(plan, tgt, candidates, bits_per_weight, max_ppl_increase, resume)
    src = sources.resolve(source)
    out = pathlib.Path(out_dir) if out_dir is not None else DEFAULT_OUT_ROOT / f"{src.name}-{tgt.name}"
    artifact.check_output(out)
    with artifact.scratch_folder(out) as tmp, scratch.into(tmp):  # big tensors wait on disk, not in memory
        if search:
            return _compile_searched(src, plan, tgt, candidates, out, bits_per_weight, eval_windows, max_ppl_increase, engine,
                                     progress, started)
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


MAX_SEARCH_TRIES = 4  # compiles a perplexity-bound search measures before it gives up


def _check_search(plan: Recipe, tgt: targets.Target, candidates: tuple[str, ...], bits_per_weight: float | None, max_ppl_increase: float | None,
                  resume: bool) -> None:
    """A search is either of weight formats (weight-only recipes: a size or a perplexity budget) or, for static
    activations, of the linears that keep float inputs (a perplexity budget)."""
    if bits_per_weight is None and max_ppl_increase is None:
        raise errors.InputError("--search needs a budget: --bits-per-weight B (the most accurate mix within B) or "
                                "--max-ppl-increase P (the smallest mix within P %)")
    if bits_per_weight is not None and not 1 <= bits_per_weight <= 32:
        raise errors.InputError(f"--bits-per-weight {bits_per_weight} is out of range: use stored bits per weight in 1..32, e.g. 3.5")
    if resume:
        raise errors.InputError("--resume continues one GPTQ compile, a search runs several: drop --resume")
    act = plan.activations
    if act.static and bits_per_weight is None:
        return  # which linears keep float inputs, besides the recipe's own
    if plan.weights.layers:
        raise errors.InputError("the recipe already holds a search's choice (weights.layers): drop --search / --bits-per-weight "
                                "to replay it, or clear them to search again")
    if act.kind != ActivationKind.NONE or plan.weights.fp8:
        raise errors.InputError(f"--bits-per-weight chooses weight formats of weight-only recipes; {tgt.name}'s recipe quantizes "
                                "activations or uses FP8: pick a weight-only target (ort-int4, trt-int4, edge-int4), or use "
                                "--search --max-ppl-increase P alone, which chooses the linears that keep float inputs")
    if not candidates:
        raise errors.InputError(f"{tgt.name} has no formats to choose among: use an ort-* or trt-int4 target, or give --formats")
    data = recipe_mod.to_dict(plan)
    for fmt in candidates:  # each one the target runs, e.g. no 2-bit weights on TensorRT
        recipe_mod.resolve(plan.target, {**data, "weights": {**data["weights"], "bits": parse_format(fmt)[0] or plan.weights.bits}})


def _compile_searched(src: sources.Source, plan: Recipe, tgt: targets.Target, candidates: tuple[str, ...], out: pathlib.Path, bits_per_weight: float | None,
                      eval_windows: int | None, max_ppl_increase: float | None, engine: bool, progress, started: float) -> artifact.Artifact:
    """Measure every linear's sensitivity, choose the mix, compile it; under a perplexity bound alone, compile
    the next mix the corrected estimate allows while the measurement misses the bound."""
    if plan.activations.static:
        return _search_float_inputs(src, plan, tgt, out, eval_windows, max_ppl_increase, engine, progress, started)
    table = sensitivity(src, plan, candidates, progress)

    def compile_mix(mix: dict[str, str], record: dict) -> artifact.Artifact:
        chosen = _with_formats(plan, mix)
        return _lower(_quantize(src, chosen, [tgt], eval_windows is not None, out, False, progress), chosen, tgt, out,
                      eval_windows, max_ppl_increase, engine, progress, started, search=record)

    if bits_per_weight is not None:
        mix = mixed.fit_bits(table, bits_per_weight)
        if mix is None:
            smallest = mixed.estimate(table, mixed.ladder(table)[0])["bits_per_weight"]
            raise errors.InputError(f"no mix of the formats ({', '.join(candidates)}) fits {bits_per_weight:g} "
                                    f"bits per weight: the smallest takes {smallest:g}")
        return compile_mix(mix, {"budget_bits_per_weight": bits_per_weight, **mixed.estimate(table, mix)})
    mixes = mixed.ladder(table)
    searched = _search_bound([mixed.cost(table, mix) for mix in mixes], max_ppl_increase,
                             lambda index, record: compile_mix(mixes[index], record),
                             lambda index: {"bits_per_weight": mixed.estimate(table, mixes[index])["bits_per_weight"]})
    if searched is None:
        raise errors.InputError(f"no mix of the formats ({', '.join(candidates)}) is estimated to meet "
                                f"--max-ppl-increase {max_ppl_increase:g} %: raise the bound, or give --formats with more bits")
    return searched


def _search_float_inputs(src: sources.Source, plan: Recipe, tgt: targets.Target, out: pathlib.Path, eval_windows: int,
                         max_ppl_increase: float, engine: bool, progress, started: float) -> artifact.Artifact:
    """Static activations: besides the recipe's own float inputs, keep at float the kinds of inputs (every block's
    down projection's, ...) whose quantization costs most per weight they feed (their weights stay quantized),
    the fewest whose measured perplexity meets `max_ppl_increase`. Each kind's cost is the KL that switching its
    quantizers off removes from the fully quantized model (`mixed.measure_inputs`). KL does not say perplexity:
    when no set is estimated to meet the bound, the sets are measured in order, the fully quantized model first."""
    probed = _quantize(src, plan, [tgt], True, out, False, progress)
    windows, _ = _calibration_windows(plan, probed.float_path, always=True)
    probe = windows[:mixed.PROBE_WINDOWS, :mixed.PROBE_TOKENS]
    total, inputs = mixed.measure_inputs(probed.model, scratch.unmapped(artifact.load_onnx(probed.float_path)), probe, progress)
    inputs.sort(key=lambda entry: -entry.gain / entry.weights)
    base = sum(plan.activations.keeps_float_input(lin.name) for lin in analysis.analyze(probed.model).linears())
    left = [max(total - sum(entry.gain for entry in inputs[:count]), 0.0) for count in range(len(inputs) + 1)]  # estimated KL

    def kept(count: int) -> list[str]:
        return [*plan.activations.float_inputs, *sorted(pattern for entry in inputs[:count] for pattern in entry.patterns)]

    def compile_at(count: int, record: dict) -> artifact.Artifact:
        nonlocal probed
        data = recipe_mod.to_dict(plan)
        chosen = recipe_mod.resolve(plan.target, {**data, "activations": {**data["activations"], "float_inputs": kept(count)}})
        canonical, probed = (probed if count == 0 else None), None  # the probed model is the fully quantized one
        return _lower(canonical or _quantize(src, chosen, [tgt], True, out, False, progress), chosen, tgt, out, eval_windows,
                      max_ppl_increase, engine, progress, started, search=record)

    return _search_bound(left, max_ppl_increase, compile_at,
                         lambda count: {"float_input_linears": base + sum(len(entry.linears) for entry in inputs[:count])},
                         in_order=True)


def _search_bound(costs: list[float], max_ppl_increase: float, compile_at, describe, in_order: bool = False):
    """Compile (`compile_at(index, record)`) the first candidate whose estimated cost (log perplexity ratio) meets
    `max_ppl_increase`; while the measurement misses the bound, correct the estimate by it and compile the next
    candidate the corrected estimate allows, at most MAX_SEARCH_TRIES times. `in_order`: when no candidate is
    estimated within the bound, measure the next one in order (the estimate only ranks them). None when no
    candidate is estimated within the bound; raises the last miss, with every try's measurement, when the tries
    run out."""
    scale, after, tries, missed = 1.0, -1, [], None
    for _ in range(MAX_SEARCH_TRIES):
        index = mixed.first_within(costs, max_ppl_increase, scale, after)
        if index is None and in_order and after + 1 < len(costs):
            index = after + 1
        if index is None:
            break
        estimate = {**describe(index), "estimated_ppl_increase_pct": round(100 * math.expm1(scale * costs[index]), 3)}
        try:
            return compile_at(index, {"max_ppl_increase": max_ppl_increase, **estimate, "correction": round(scale, 4), "tries": tries})
        except errors.AccuracyGateError as e:
            missed, measured = e, e.metrics["ppl_increase_pct"]
            tries.append({**estimate, "ppl_increase_pct": measured})
            if costs[index] > 0:  # the estimate, corrected by what it measured
                scale = math.log1p(max(measured, 0.0) / 100) / costs[index]
            after = index
    if missed is not None:
        raise _searched_out(missed, tries)
    return None


def _searched_out(missed: errors.AccuracyGateError, tries: list[dict]) -> errors.AccuracyGateError:
    """The last miss of a search, saying what every try measured."""
    measured = "; ".join(f"{', '.join(f'{k} {v}' for k, v in t.items() if k != 'ppl_increase_pct')}: {t['ppl_increase_pct']:+.2f} %"
                         for t in tries)
    return errors.AccuracyGateError(missed.metrics, missed.bound, f"after {len(tries)} searched compiles ({measured}): raise the bound")


def sensitivity(src: sources.Source, plan: Recipe, candidates: tuple[str, ...], progress=None) -> list[mixed.Sensitivity]:
    """Each linear's cost in each of the `candidates` formats (`mixed.measure`), on the float model after the recipe's
    rotations, quantized by the recipe's algorithm; kept in the cache, keyed by everything it depends on."""
    float_path = _float_model(src, progress)
    windows, calib_record = _calibration_windows(plan, float_path, always=True)
    w = plan.weights
    key = {"source": src.sha256, "qcompile": __version__, "rotation": recipe_mod.to_dict(plan)["rotation"],
           "weights": [w.algorithm.value, w.symmetric, w.positive_scales, w.act_order, w.damp, w.group_size],
           "formats": list(candidates), "tokens": calib_record["tokens_sha256"],
           "probe": [mixed.PROBE_WINDOWS, mixed.PROBE_TOKENS], "clip_ratios": CLIP_RATIOS.tolist(), "clip_bits": CLIP_BITS}
    cached = cache_root() / "sensitivity" / f"{src.name}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"
    if cached.is_file():
        return [mixed.Sensitivity(**{**entry, "shape": tuple(entry["shape"])}) for entry in json.loads(cached.read_text())]
    model = scratch.unmapped(artifact.load_onnx(float_path))
    run_passes(model, _rotation_passes(plan, windows, progress))
    linears = analysis.analyze(model).linears()
    formats = {lin.name: _formats_of(lin, candidates, plan) for lin in linears}
    table = mixed.measure(model, linears, formats, windows, _search_quantizer(plan), progress)
    cached.parent.mkdir(parents=True, exist_ok=True)
    artifact.publish_text(cached, json.dumps([s.to_dict() for s in table]))
    return table


def _formats_of(linear: analysis.Linear, candidates: tuple[str, ...], plan: Recipe) -> list[str]:
    """The `candidates` for `linear`; lm_head's are those its recipe section can say (4 or 8 bits, or float;
    8-bit in the block linears' groups)."""
    if linear.role != Role.LM_HEAD:
        return list(candidates)
    formats = []
    for fmt in candidates:
        bits, group = parse_format(fmt)
        if bits in (4, 8, None):
            formats.append(format_name(bits, plan.weights.group_size if bits == 8 else group))
    return list(dict.fromkeys(formats))


def _search_quantizer(plan: Recipe):
    """(linear, bits, group, Hessian) → QuantizedWeight as the compile will quantize it: GPTQ for GPTQ recipes
    (AWQ's scales are not searched: AWQ+GPTQ is estimated as GPTQ) and a 4-bit lm_head, else RTN."""
    s = plan.weight_scheme()
    gptq = s.algorithm in (Algorithm.GPTQ, Algorithm.AWQ_GPTQ)

    def quantize(linear, bits, group, h):
        w = linear.float_weight()
        if gptq or (linear.role == Role.LM_HEAD and bits == 4):
            return quantize_gptq(w, h, bits, group, s.symmetric, damp=s.damp, act_order=s.act_order, positive=s.positive_scales)
        return quantize_rtn(w, bits, group, s.symmetric, positive=s.positive_scales)

    return quantize


def _with_formats(plan: Recipe, mix: dict[str, str]) -> Recipe:
    """`plan` with each block linear's format in weights.layers and lm_head's in its section (resolved again, so
    the recipe is the one a replay of the manifest resolves)."""
    head_bits, head_group = parse_format(mix["lm_head"]) if "lm_head" in mix else (plan.lm_head.bits, plan.lm_head.group_size)
    data = recipe_mod.to_dict(plan)
    data["weights"]["layers"] = [f"{name}={fmt}" for name, fmt in mix.items() if name != "lm_head"]
    data["lm_head"] = {"bits": "float" if head_bits is None else head_bits,
                       "group_size": head_group if head_bits == 4 else plan.lm_head.group_size}
    return recipe_mod.resolve(plan.target, data)


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
    float_path = _float_model(src, progress)
    model = scratch.unmapped(artifact.load_onnx(float_path))
    model_map = analysis.analyze(model)  # and fail early, before any work, on an unsupported graph
    tied = model_map.tied_lm_head
    names = {lin.name for lin in model_map.linears()} | {t.name for t in model_map.expert_tables()}
    unknown = sorted(set(plan.weight_scheme().layer_formats()) - names)
    if unknown:
        raise errors.InputError(f"weights.layers names {', '.join(unknown[:3])}, which this model does not have: "
                                f"use its linears' names (e.g. {model_map.linears()[0].name}, see `qcompile inspect`)")
    for tgt in tgts:
        tgt.check_source(float_path.parent)
    if evaluated:
        _require_evaluable(float_path)
    windows, calib_record = _calibration_windows(plan, float_path)
    saved = checkpoint.Checkpoint(out, {"qcompile": __version__, "source": src.describe(), "recipe": recipe_mod.to_dict(plan),
                                        "calibration": calib_record}, resume) if plan.weights.algorithm == Algorithm.GPTQ else None
    passes = build_passes(plan, windows, progress, saved, tied, context_length(float_path.parent))
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
           max_ppl_increase: float | None, engine: bool, progress, started: float, search: dict | None = None) -> artifact.Artifact:
    """Lower the canonical model (taken from `canonical`, changed in place) to `tgt`; write, evaluate and gate the
    artifact (`search`: the mixed-precision search's record, for the manifest)."""
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
            metrics = _compare(base, _evaluate(tmp / "model.onnx", eval_windows, progress, "(quantized)",
                                                  session_config=tgt.cpu_session(plan)))
            _gate(metrics, max_ppl_increase, canonical.saved)
        metrics["compile_seconds"] = round(time.perf_counter() - started, 1)
        metrics["bits_per_weight"] = mixed.bits_per_weight(merged_layers(r for _, r in canonical.results))
        manifest = _manifest(canonical.src, tgt, plan, canonical.calib_record, canonical.results, lowered,
                             {"weights": canonical.digests, **checks}, metrics, package_record)
        if search is not None:
            manifest["search"] = search
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
        "target": {"name": tgt.name, "runtime": tgt.runtime, "cpu_session": tgt.cpu_session(plan)},
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


def _calibration_windows(plan: Recipe, float_path: pathlib.Path, always: bool = False) -> tuple[np.ndarray | None, dict | None]:
    """The recipe's calibration token windows (None when nothing is calibrated, unless `always`) and their manifest record."""
    if not (plan.calibrated or always):
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
                 tied: bool = False, context: int | None = None) -> list[ir.passes.PassBase]:
    """The passes that turn the float model into the canonical quantized model, in order: QuaRot's
    rotations (float-equivalent), one calibration run for every pass that needs the float model's
    statistics, SmoothQuant's fold, the weights (a 4-bit lm_head by GPTQ first, when the blocks are not
    GPTQ's; a mixture of experts' tables by RTN), the activation and KV-cache quantizers, the embedding. `tied`: the float model's lm_head reads
    the embedding table; quantized to the same width, the table then takes the lm_head's integers. `context`: the
    model's context length, which a quantized KV cache's scales must cover."""
    scheme, act = plan.weight_scheme(), plan.activations
    passes = _rotation_passes(plan, windows, progress)
    head = QuantizeWeightsGPTQ(scheme, None, scheme.act_order, scheme.damp, progress, names={"lm_head"}) if plan.head_calibrated else None
    make_weights, shares_calibration = _WEIGHT_PASSES[scheme.algorithm]
    weights = make_weights(dataclasses.replace(scheme, skip=(*scheme.skip, "lm_head")) if head else scheme, windows, progress, saved)
    fold = FoldSmoothQuantScales(act, quantize_weight=_fake_quantizer(scheme), skip=scheme.skip, weights=scheme) if act.smoothquant else None
    acts = QuantizeActivations(act.kind, lm_head=act.lm_head, clip=act.clip, weights=scheme,
                               float_inputs=act.float_inputs) if act.kind != ActivationKind.NONE else None
    kv = (QuantizeKVCache(plan.kv_cache.bits, context=context, center_values=plan.rotation.enabled)
          if plan.kv_cache.bits is not None else None)
    consumers = [p for p in (fold, acts if act.static else None, head, weights if shares_calibration else None, kv)
                 if p is not None]
    if consumers:
        passes.append(Calibrate(windows, consumers, progress))
    passes += [p for p in (fold, head, weights, QuantizeExperts(scheme, windows, progress), acts, kv) if p is not None]
    if plan.embeddings.bits is not None:
        passes.append(_embedding_pass(plan, scheme, tied))
    return passes


def _rotation_passes(plan: Recipe, windows: np.ndarray | None, progress) -> list[ir.passes.PassBase]:
    """QuaRot's rotations as the recipe asks for them (float-equivalent), each where the structure allows it."""
    rot = plan.rotation
    if not rot.enabled:
        return []
    online = InsertOnlineHadamard((Role.DOWN, Role.O) if rot.attention_hadamards else (Role.DOWN,))
    return [WherePossible(*_NORM_ROTATIONS[rot.norm_outputs](rot, windows, progress)), WherePossible(RotateValueOutput(rot.seed)),
            online, *([WherePossible(InsertQueryKeyHadamard())] if rot.attention_hadamards else [])]


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
    model_path = _float_model(src, progress)
    ppl, lat = evaluation.evaluate_model(model_path, windows, latency, progress)
    return {**ppl.to_dict(), **lat, "size_bytes": artifact.model_bytes(model_path)}
