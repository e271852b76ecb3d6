"""Mixed precision: per-linear formats in the recipe, sensitivity probes, the allocation, the searched compile."""

import hashlib
import itertools
import json
import math

import numpy as np
import onnx_ir as ir
import pytest

import qcompile
from qcompile import analysis, artifact, errors, mixed, pipeline, recipe as recipe_mod, targets
from qcompile.algorithms.rtn import quantize_rtn
from qcompile.cli import main
from qcompile.export import export_model
from qcompile.passes._canonical import attach_quantized_weight
from qcompile.runtime import Decoder
from qcompile.schemes import parse_format
from tests.conftest import tiny_hf_model, write_byte_tokenizer


def _table(costs: dict[str, dict[str, float]], shape=(128, 64)) -> list[mixed.Sensitivity]:
    return [mixed.Sensitivity(name, shape, cost, {}, {}) for name, cost in costs.items()]


TABLE = _table({
    "a": {"int2g64": 0.30, "int4g128": 0.020, "int4g64": 0.015, "int8g128": 0.0001, "float": 0.0},
    "b": {"int2g64": 0.05, "int4g128": 0.004, "int4g64": 0.003, "int8g128": 0.00002, "float": 0.0},
    "c": {"int2g64": 0.90, "int4g128": 0.100, "int4g64": 0.060, "int8g128": 0.0005, "float": 0.0},
})


def _brute_force(table, budget):
    """The least-cost mix within `budget` bits per weight, by trying every one."""
    best = None
    for choice in itertools.product(*(list(s.cost) for s in table)):
        mix = dict(zip((s.name for s in table), choice))
        est = mixed.estimate(table, mix)
        if est["bits_per_weight"] <= budget and (best is None or est["estimated_ppl_increase_pct"] < best[0]):
            best = (est["estimated_ppl_increase_pct"], mix)
    return best


@pytest.mark.parametrize("budget", [2.5, 3.0, 3.5, 4.25, 5.0, 6.0, 8.5, 12.0])
def test_fit_bits_stays_within_the_budget_and_is_near_the_best_mix(budget):
    mix = mixed.fit_bits(TABLE, budget)
    est = mixed.estimate(TABLE, mix)
    assert est["bits_per_weight"] <= budget
    best_cost, _ = _brute_force(TABLE, budget)
    assert est["estimated_ppl_increase_pct"] <= best_cost * 1.25 + 1e-6  # greedy on convex hulls: at most a step off


def test_no_mix_fits_below_the_smallest_format():
    assert mixed.fit_bits(TABLE, 2.0) is None


def test_the_ladder_grows_by_one_step_and_first_within_honours_the_correction():
    mixes = mixed.ladder(TABLE)
    sizes = [mixed.estimate(TABLE, m)["bits_per_weight"] for m in mixes]
    costs = [mixed.estimate(TABLE, m)["estimated_ppl_increase_pct"] for m in mixes]
    assert sizes == sorted(sizes) and costs == sorted(costs, reverse=True)
    assert all(sum(a[k] != b[k] for k in a) == 1 for a, b in zip(mixes, mixes[1:]))
    index = mixed.first_within([mixed.cost(TABLE, m) for m in mixes], 5.0)
    assert costs[index] <= 5.0 and (index == 0 or costs[index - 1] > 5.0)
    later = mixed.first_within([mixed.cost(TABLE, m) for m in mixes], 5.0, scale=2.0, after=index)  # the estimate measured 2× short
    assert later > index and math.expm1(2 * math.log1p(costs[later] / 100)) * 100 <= 5.0 + 1e-9


def _gated_compiles(measured: dict[int, float], bound: float):
    """compile_at for `pipeline._search_bound`: candidate i measures `measured[i]` percent, and misses past `bound`."""
    compiled = []

    def compile_at(index, record):
        compiled.append(index)
        metrics = {"ppl_increase_pct": measured[index], "float": {"ppl": 10.0}, "quantized": {"ppl": 10.0 * (1 + measured[index] / 100)}}
        if measured[index] > bound:
            raise errors.AccuracyGateError(metrics, bound)
        return index, record

    return compiled, compile_at


def test_a_bound_search_corrects_its_estimate_by_each_miss():
    costs = [0.3, 0.1, 0.04, 0.02, 0.0]  # log perplexity ratios: candidate 2 is estimated +4.1 %
    compiled, compile_at = _gated_compiles({2: 10.0, 3: 4.0}, 5.0)
    index, record = pipeline._search_bound(costs, 5.0, compile_at, lambda i: {"candidate": i})
    assert compiled == [2, 3]  # corrected by +10 % measured: 0.02 × log(1.1) / 0.04 estimates +4.9 %, within
    assert record["correction"] == pytest.approx(math.log1p(0.10) / 0.04, abs=1e-4)
    assert record["estimated_ppl_increase_pct"] == pytest.approx(100 * math.expm1(math.log1p(0.10) / 2), abs=1e-3)
    assert record["tries"] == [{"candidate": 2, "estimated_ppl_increase_pct": pytest.approx(4.081, abs=1e-3), "ppl_increase_pct": 10.0}]


def test_a_bound_search_in_order_measures_the_next_candidate_when_none_is_estimated_within():
    costs = [0.3, 0.2, 0.1]
    assert pipeline._search_bound(costs, 5.0, lambda i, r: pytest.fail("nothing is within"), lambda i: {}) is None
    compiled, compile_at = _gated_compiles({0: 6.0, 1: 4.0, 2: 2.0}, 5.0)
    index, _ = pipeline._search_bound(costs, 5.0, compile_at, lambda i: {}, in_order=True)
    assert compiled == [0, 1] and index == 1  # 0.2 × log(1.06) / 0.3 estimates +4 %
    # +20 % measured first: corrected, 1 and 2 are still estimated past the bound (+16 %, +13 %), so 1 is measured
    # next; its +6 % corrects the estimate of 2 to +4.8 %
    compiled, compile_at = _gated_compiles({0: 20.0, 1: 6.0, 2: 2.0}, 5.0)
    index, _ = pipeline._search_bound([0.3, 0.25, 0.2], 5.0, compile_at, lambda i: {}, in_order=True)
    assert compiled == [0, 1, 2] and index == 2


def test_a_bound_search_stops_after_its_tries_and_says_what_each_measured():
    costs = [0.045 * 0.85 ** i for i in range(10)]  # each correction (measured +5.5 %) moves one candidate on
    compiled, compile_at = _gated_compiles({i: 5.5 for i in range(10)}, 5.0)
    with pytest.raises(errors.AccuracyGateError, match=f"after {pipeline.MAX_SEARCH_TRIES} searched compiles") as e:
        pipeline._search_bound(costs, 5.0, compile_at, lambda i: {})
    assert len(compiled) == pipeline.MAX_SEARCH_TRIES and compiled == sorted(set(compiled))
    assert str(e.value).count("+5.50 %") == pipeline.MAX_SEARCH_TRIES + 1  # each try, and the last miss


def test_stored_bits_count_scales_and_zero_points():
    assert mixed.stored_bits(4, 128, 256, 10) == 4 * 2560 + 2 * 10 * 32
    assert mixed.stored_bits(4, 128, 256, 10, symmetric=False) == 4 * 2560 + 2 * 10 * 36
    assert mixed.stored_bits(8, 0, 256, 10) == 8 * 2560 + 10 * 32
    assert mixed.stored_bits(4, 128, 192, 10) == 4 * 256 * 10 + 2 * 10 * 32  # the short last group stored padded
    assert mixed.stored_bits(None, 0, 256, 10) == 32 * 2560
    layers = [{"name": "a", "shape": [256, 10], "bits": 4, "group_size": 128, "symmetric": True},
              {"name": "b", "shape": [256, 10], "format": "FLOAT"}]
    assert mixed.bits_per_weight(layers) == (4.25 + 32) / 2
    assert mixed.bits_per_weight([layers[1]]) is None


def test_layer_formats_are_recipe_data_checked_before_any_work():
    plan = recipe_mod.resolve("ort-int4", None, {"layers": ["blocks.0.q=int2g64", "blocks.1.down=float"]})
    assert plan.weight_scheme().layer_formats() == {"blocks.0.q": (2, 64), "blocks.1.down": (None, 0)}
    assert recipe_mod.resolve(None, recipe_mod.to_dict(plan)) == plan  # a manifest replays it
    assert "layers = [\"blocks.0.q=int2g64\", \"blocks.1.down=float\"]" in recipe_mod.to_toml(plan)
    with pytest.raises(errors.InputError, match="bits=3 is not supported: use 2, 4, 8"):
        recipe_mod.resolve("ort-int4", None, {"layers": ["blocks.0.q=int3"]})
    with pytest.raises(errors.InputError, match="unknown weight format 'nf4'"):
        recipe_mod.resolve("ort-int4", None, {"layers": ["blocks.0.q=nf4"]})
    with pytest.raises(errors.InputError, match="not name=format"):
        recipe_mod.resolve("ort-int4", None, {"layers": ["blocks.0.q"]})
    with pytest.raises(errors.InputError, match=r"lm_head's format is the \[lm_head\] section's"):
        recipe_mod.resolve("ort-int4", None, {"layers": ["lm_head=int8"]})
    with pytest.raises(errors.InputError, match="TensorRT has no 2-bit weights"):
        recipe_mod.resolve("trt-int4", None, {"layers": ["blocks.0.q=int2g64"]})
    assert parse_format("int8") == (8, 0)


def test_probe_kl_is_the_kl_of_the_model_with_that_linear_quantized(tiny_export, tmp_path):
    """The probe session feeds a linear's quantized weight in place of the float one (a tied lm_head gets its own):
    its KL is the KL of a model whose linear really is quantized, and zero for the float weight."""
    _, path = tiny_export("llama")
    model = artifact.load_onnx(path)
    linears = analysis.analyze(model).linears()
    windows = np.random.default_rng(0).integers(3, 250, size=(2, 32))
    picked = [lin for lin in linears if lin.name in ("blocks.1.down", "lm_head")]
    with mixed._ProbeSession(model, linears) as session:
        reference = session.log_probs(windows, {})
        for lin in picked:
            assert session.kl(windows, reference, lin, lin.float_weight()) < 1e-9
            qw = quantize_rtn(lin.float_weight(), 2, 32)
            probe = session.kl(windows, reference, lin, qw.dequantize())
            quantized = artifact.load_onnx(path)
            target = next(x for x in analysis.analyze(quantized).linears() if x.name == lin.name)
            attach_quantized_weight(quantized.graph, target, qw)
            quantized.opset_imports[""] = 25  # the INT2 DequantizeLinear's opset
            qpath = tmp_path / f"{lin.name}.onnx"
            ir.save(quantized, qpath, external_data=f"{lin.name}.onnx.data")
            decoder = Decoder(qpath)
            measured = 0.0
            for window, ref in zip(windows, reference):
                logits = decoder.session.run(["logits"], decoder.feeds(window[None], decoder.empty_cache(), 0))[0][0].astype(np.float64)
                log_q = logits - logits.max(-1, keepdims=True)
                log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
                measured += float(np.sum(np.exp(ref) * (ref - log_q)))
            measured /= windows.size
            assert probe > 1e-6  # a real change, well above float noise
            # float32 logits of two different graphs: a KL of ~2.5e-5 agrees to ~1e-3 (1.06e-3 on one CPU)
            assert probe == pytest.approx(measured, rel=5e-3)


def _files_digest(folder) -> str:
    h = hashlib.sha256()
    for name in ("model.onnx", "model.onnx.data"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def test_a_searched_compile_fits_its_budget_and_replays_from_its_manifest(tiny_export, tmp_path, monkeypatch):
    _, path = tiny_export("llama")
    monkeypatch.setattr(mixed, "PROBE_TOKENS", 32)
    out = tmp_path / "mixed"
    art = qcompile.compile(path, "ort-int4", out, eval_windows=None, bits_per_weight=5.0, algo="rtn", calib_samples=4,
                           calib_seqlen=64, embedding_bits=None)
    m = art.manifest
    assert m["metrics"]["bits_per_weight"] <= 5.0
    assert m["search"]["budget_bits_per_weight"] == 5.0 and m["search"]["estimated_ppl_increase_pct"] >= 0
    assert m["search"]["bits_per_weight"] == pytest.approx(m["metrics"]["bits_per_weight"], abs=1e-3)  # as estimated
    formats = {e["name"]: (e.get("bits"), e.get("group_size", 0)) for e in m["layers"]}
    chosen = dict(entry.split("=") for entry in m["recipe"]["weights"]["layers"])
    assert len(chosen) == len(formats) - 1  # every block linear; lm_head in its own section
    for name, fmt in chosen.items():
        bits, group = parse_format(fmt)
        assert formats[name] == ((bits, group) if bits is not None else (None, 0)), name
    assert len(set(chosen.values())) > 1  # a mix, not one format
    replay = qcompile.compile(path, None, tmp_path / "replay", out / "manifest.json", eval_windows=None)
    assert _files_digest(replay.path) == _files_digest(out)
    assert "search" not in replay.manifest


def test_a_float_inputs_search_within_its_bound_at_once_compiles_the_probed_model(tmp_path, monkeypatch):
    """trt-int8's search under a generous bound: the fully quantized model it probed is the one written (no
    second compile), the same files as the plain compile, with the search's record in the manifest."""
    folder = tmp_path / "src"  # 1024 positions: room for the 512-token evaluation windows
    folder.mkdir()
    path = export_model(tiny_hf_model("llama", max_position_embeddings=1024), folder)
    write_byte_tokenizer(folder)
    options = dict(eval_windows=1, calib_samples=4, calib_seqlen=64)
    quantized, real = [], pipeline._quantize
    monkeypatch.setattr(pipeline, "_quantize", lambda *a, **k: quantized.append(1) or real(*a, **k))
    searched = qcompile.compile(path, "trt-int8", tmp_path / "searched", search=True, max_ppl_increase=1000, **options)
    assert len(quantized) == 1
    plain = qcompile.compile(path, "trt-int8", tmp_path / "plain", **options)
    record = searched.manifest["search"]
    # the default's float inputs (both blocks' down projections), none added
    assert record["float_input_linears"] == 2 and record["tries"] == [] and record["max_ppl_increase"] == 1000
    assert searched.metrics["ppl_increase_pct"] == plain.metrics["ppl_increase_pct"]
    assert _files_digest(searched.path) == _files_digest(plain.path)


def test_search_options_are_checked_before_any_work(tiny_export, tmp_path):
    _, path = tiny_export("llama")
    cases = [
        (dict(search=True), "--search needs a budget"),
        (dict(bits_per_weight=0.5), "out of range"),
        (dict(bits_per_weight=4, activations="int8-dynamic"), "weight-only recipes"),
        (dict(bits_per_weight=4, target="trt-int8"), "weight-only recipes"),
        (dict(bits_per_weight=4, layers=["blocks.0.q=int8"]), "already holds a search.s choice"),
        (dict(bits_per_weight=4, formats=["int2g64"], target="trt-int4"), "TensorRT has no 2-bit weights"),
    ]
    for options, message in cases:
        options = {"target": "ort-int4", **options}
        with pytest.raises(errors.InputError, match=message):
            qcompile.compile(path, out_dir=tmp_path / "x", eval_windows=None, **options)
        assert not (tmp_path / "x").exists()


def test_cli_bits_per_weight_reports_the_mix(tiny_export, tmp_path, monkeypatch, capsys):
    _, path = tiny_export("llama")
    monkeypatch.setattr(mixed, "PROBE_TOKENS", 32)
    out = tmp_path / "cli"
    assert main(["model", str(path), "-o", str(out), "--no-eval", "--bits-per-weight", "6", "--algo", "rtn",
                 "--calib-samples", "4", "--calib-seqlen", "64", "--embeddings", "float"]) == 0
    text = capsys.readouterr().out
    assert "bits per weight" in text
    assert json.loads((out / "manifest.json").read_text())["metrics"]["bits_per_weight"] <= 6


def test_an_input_switched_off_in_the_probe_is_the_model_compiled_with_it_float(tiny_export, tmp_path):
    """trt-int8's static activation quantizers: the probe's gain for one kind of input (the KL that keeping those
    inputs float removes) is what compiling with them in activations.float_inputs removes, measured directly."""
    _, path = tiny_export("llama")
    full = qcompile.compile(path, "trt-int8", tmp_path / "full", eval_windows=None, calib_samples=4, calib_seqlen=64,
                            float_inputs=[])  # every input quantized, the down projections' too
    float_model = artifact.load_onnx(path)
    windows = np.random.default_rng(1).integers(3, 250, size=(2, 32))
    total, inputs = mixed.measure_inputs(artifact.load_onnx(full.path / "model.onnx"), float_model, windows)
    # one kind of input each, in both blocks: o, down; gate/up; q/k/v
    assert total > 0 and sorted(e.patterns for e in inputs) == [
        ["blocks.*.down"], ["blocks.*.gate", "blocks.*.up"], ["blocks.*.k", "blocks.*.q", "blocks.*.v"], ["blocks.*.o"]]
    assert sorted(len(e.linears) for e in inputs) == [2, 2, 4, 6]
    entry = max(inputs, key=lambda e: e.gain)
    part = qcompile.compile(path, "trt-int8", tmp_path / "part", eval_windows=None, calib_samples=4, calib_seqlen=64,
                            float_inputs=entry.patterns)
    assert part.manifest["recipe"]["activations"]["float_inputs"] == entry.patterns
    model = artifact.load_onnx(part.path / "model.onnx")
    for linear in analysis.analyze(model).linears():
        producer = linear.node.inputs[0].producer()
        quantized_input = producer is not None and producer.op_type == "DequantizeLinear"
        assert quantized_input == (linear.name not in entry.linears and linear.name != "lm_head"), linear.name
    # The compiled model's KL, measured the same way (the probe's Where keeps ONNX Runtime from fusing Q/DQ into its
    # int8 kernels, whose rounding differs a little: the search measures the reference Q/DQ numerics)
    part_total, _ = mixed.measure_inputs(model, float_model, windows)
    measured_gain = total - part_total
    assert measured_gain > 0.05 * total  # a real change
    assert entry.gain == pytest.approx(measured_gain, rel=0.5)  # one input's gain, scaled so that the gains add up
    assert sum(e.gain for e in inputs) < total  # to all but the int8 weights' own cost


def test_float_inputs_on_an_mlp_keep_the_structure(tiny_export, tmp_path):
    """A block whose gate and up keep float inputs while the next block's q is quantized: the analysis still
    finds every block's MLP (activation quantizers take no step in its search), so the compile goes through
    with exactly those inputs float."""
    _, path = tiny_export("llama")
    art = qcompile.compile(path, "trt-int8", tmp_path / "out", eval_windows=None, calib_samples=2,
                           float_inputs=["blocks.1.gate", "blocks.1.up"])
    model = ir.load(art.model_path)
    kept = {lin.name for lin in analysis.analyze(model, targets.get("trt-int8").forms).linears()
            if lin.node.inputs[0].producer() is None or lin.node.inputs[0].producer().op_type != "DequantizeLinear"}
    assert kept == {"blocks.1.gate", "blocks.1.up", "lm_head"}
