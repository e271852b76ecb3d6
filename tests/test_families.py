"""Every architecture family, from tiny random models (tests/families.py): the export matches transformers,
the ModelMap finds the structure, float-equivalent passes keep the logits, and every target compiles,
verifies and decodes. One export per family, shared through the session."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import qcompile
from qcompile import analysis, errors
from qcompile.passes import (FuseNormGains, InsertOnlineHadamard, InsertQueryKeyHadamard, RotateResidualStream,
                             RotateValueOutput)
from tests.conftest import prompt_and_step, run_logits
from tests.families import FAMILIES, write_folder

R = analysis.Role
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
NO_ROPE = ("gpt2", "smollm3")  # learned positions; SmolLM3's NoPE layers
PARTIAL_ROPE = ("phi", "stablelm", "gpt_neox")  # RoPE on part of each head
QK_NORM = ("qwen3", "gemma3", "olmo2", "qwen3_moe")  # norms on the queries and keys
# fused projections, GELU MLP + biases + Conv1D, sandwich norms + softcap, experts + a shared expert
FAST = ["phi3", "gpt2", "gemma2", "qwen2_moe"]
params = [pytest.param(f, marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES]


@pytest.fixture(scope="session")
def family_export(tmp_path_factory):
    """family → (hf model, its folder, the exported model.onnx: the folder's streaming export), each exported once
    per session, into the export cache, where compiles of the folder find it."""
    from qcompile.export import MODEL_FILE

    cache = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"family-{family}")
            model = write_folder(family, folder / "hf")
            cache[family] = (model, folder / "hf", qcompile.export(folder / "hf") / MODEL_FILE)
        return cache[family]

    return get


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize("family", params)
def test_export_matches_transformers_prompt_and_cached_steps(family_export, family):
    model, _, path = family_export(family)
    ids = np.random.default_rng(0).integers(3, 256, size=(1, 16))
    prompt, later, _ = prompt_and_step(path, ids)
    want = _hf_logits(model, ids)
    np.testing.assert_allclose(prompt, want[:, :prompt.shape[1]], atol=1e-4, rtol=0)
    np.testing.assert_allclose(later, want[:, prompt.shape[1]:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", params)
def test_model_map_has_every_role(family_export, family):
    hf, _, path = family_export(family)
    model_map = analysis.analyze(ir.load(path))
    config = hf.config
    assert len(model_map.blocks) == 2
    assert (model_map.embedding_scale is not None) == (family.startswith("gemma") or family == "granite")  # √hidden; a multiplier
    for block in model_map.blocks:
        attention = block.attention  # head counts, the constant score scale, RoPE and q/k norms, from the graph
        heads, kv_heads = attention.heads
        assert heads == config.num_attention_heads and heads % kv_heads == 0
        assert attention.scale is not None and 0 < attention.scale <= 1
        assert attention.softcap == getattr(config, "attn_logit_softcapping", None)
        if family not in NO_ROPE:  # RoPE, over whole heads or the first channels of each
            assert attention.rotary is not None and (attention.rotary.dims is not None) == (family in PARTIAL_ROPE)
        assert (attention.query_norm is not None) == (attention.key_norm is not None) == (family in QK_NORM)
        assert R.O in block.linears and (R.DOWN in block.linears or block.experts)
        assert (R.QKV in block.linears) != ({R.Q, R.K, R.V} <= set(block.linears))
        assert block.part(R.UP) is not None or R.GATE_UP in block.linears or block.experts
        assert (block.experts is not None) == (family in MOE)
        if block.experts:  # the router stays float, outside the linears; gate_up [E, 2I, H] then down [E, H, I]
            assert block.experts.router not in {lin.node for lin in model_map.linears()}
            (e, up, h), (e2, h2, i) = (t.shape for t in block.experts.tables)
            assert (e, h, h2, up) == (4, 64, 64, 2 * i) and e2 == e
            assert all(t.in_axis == 2 for t in block.experts.tables)
        qkv = block.linears.get(R.QKV)
        if qkv is not None and qkv.parts:  # contiguous q | k | v columns cover the projection
            spans = sorted(qkv.parts.values())
            assert spans[0][0] == 0 and spans[-1][1] == qkv.out_features
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def _rotations(model_map: analysis.ModelMap):
    """The float-equivalent rotation passes that apply to this structure: QuaRot's residual rotation needs
    RMSNorms, no post-norms and no experts; the value rotation needs v's columns."""
    if not _rotatable(model_map):
        return [RotateValueOutput, InsertOnlineHadamard, InsertQueryKeyHadamard]
    return [FuseNormGains, RotateResidualStream, RotateValueOutput, InsertOnlineHadamard, InsertQueryKeyHadamard]


def _rotatable(model_map: analysis.ModelMap) -> bool:
    return not any(b.branch_norms or b.experts for b in model_map.blocks) and all(
        n.kind == "rms" for n, _ in model_map.norm_readers())


@pytest.mark.parametrize("family", params)
def test_float_equivalent_passes_keep_logits(family_export, family, tmp_path):
    _, _, path = family_export(family)
    model = ir.load(path)
    applied = []
    for cls in _rotations(analysis.analyze(model)):
        try:
            cls()(model)
        except errors.UnsupportedModelError as e:  # a refusal names the structural reason, before any change
            assert cls is RotateValueOutput and "interleaves its value columns" in str(e)
            continue
        applied.append(cls.__name__)
    assert applied
    out = tmp_path / "model.onnx"
    ir.save(model, out, external_data="model.onnx.data")
    ids = np.random.default_rng(1).integers(3, 256, size=(2, 16))
    np.testing.assert_allclose(run_logits(out, ids), run_logits(path, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", params)
def test_folded_smoothing_scales_keep_logits(family_export, family, tmp_path):
    """SmoothQuant's fold through every scalable input the ModelMap offers (pre-norm gains and biases, a gated
    MLP's up columns, fused gate_up's included), with α = 0.5: the logits do not move."""
    from qcompile import calibration
    from qcompile.algorithms.smoothquant import fake_quantize
    from qcompile.passes import FoldSmoothQuantScales
    from qcompile.schemes import ActivationKind, ActivationScheme

    _, _, path = family_export(family)
    model = ir.load(path)
    taps = list(dict.fromkeys(lin.node.inputs[0] for lin in analysis.analyze(model).linears()))
    stats = calibration.collect(model, taps, np.random.default_rng(0).integers(3, 256, size=(2, 32)), hessian=False)
    scheme = ActivationScheme(ActivationKind.INT8_STATIC, True, 0.5, smooth_up_down=True)
    result = FoldSmoothQuantScales(scheme, stats, lambda w: fake_quantize(w, ActivationKind.INT8_DYNAMIC))(model)
    assert result.modified
    out = tmp_path / "model.onnx"
    ir.save(model, out, external_data="model.onnx.data")
    ids = np.random.default_rng(1).integers(3, 256, size=(2, 16))
    np.testing.assert_allclose(run_logits(out, ids), run_logits(path, ids), atol=1e-4, rtol=0)


def test_rotations_refuse_layernorm_and_post_norm_families_with_the_reason(family_export):
    with pytest.raises(errors.UnsupportedModelError, match="LayerNorm"):
        FuseNormGains()(ir.load(family_export("gpt2")[2]))
    with pytest.raises(errors.UnsupportedModelError, match="post-norm"):
        FuseNormGains()(ir.load(family_export("gemma2")[2]))


def test_rotations_refuse_experts_with_the_reason(family_export):
    with pytest.raises(errors.UnsupportedModelError, match="routes each token to experts"):
        FuseNormGains()(ir.load(family_export("qwen2_moe")[2]))


@pytest.mark.parametrize("family", [pytest.param("mixtral", marks=pytest.mark.slow), "qwen2_moe"])
def test_expert_tables_are_each_experts_rtn_and_the_router_stays_float(family_export, family, tmp_path):
    """QuantizeExperts stores every expert's own RTN integers (blocked along K) under one DequantizeLinear per table;
    the router's weight is untouched; at 8 bits the logits stay within the quantization's reach of float."""
    from qcompile.algorithms.rtn import quantize_rtn
    from qcompile.passes import QuantizeExperts
    from qcompile.passes._canonical import read_expert_table
    from qcompile.schemes import WeightScheme

    _, _, path = family_export(family)
    model = ir.load(path)
    before = analysis.analyze(model)
    floats = {t.name: t.float_table() for t in before.expert_tables()}
    router = before.blocks[0].experts.router.inputs[1].const_value.numpy().copy()
    result = QuantizeExperts(WeightScheme(bits=4, group_size=32))(model)
    assert [e["name"] for e in result.layers] == list(floats) and all(e["bits"] == 4 for e in result.layers)
    after = analysis.analyze(model)
    np.testing.assert_array_equal(after.blocks[0].experts.router.inputs[1].const_value.numpy(), router)
    for table in after.expert_tables():
        decoded = read_expert_table(table)
        w = floats[table.name]
        assert decoded.q.shape == w.shape and decoded.block_size == 32
        for e in range(w.shape[0]):  # expert e's [N, K] slice is RTN of its own [K, N] weight
            want = quantize_rtn(w[e].T, 4, 32, True)
            np.testing.assert_array_equal(decoded.q[e].T, want.q)
            np.testing.assert_array_equal(decoded.scale[e].T, want.scale)

    def logits_at(bits):
        quantized = ir.load(path)
        QuantizeExperts(WeightScheme(bits=bits, group_size=32))(quantized)
        out = tmp_path / f"int{bits}" / "model.onnx"
        out.parent.mkdir()
        ir.save(quantized, out, external_data="model.onnx.data")
        return run_logits(out, ids)

    ids = np.random.default_rng(1).integers(3, 256, size=(2, 16))
    float_logits = run_logits(path, ids)
    err8, err4 = (np.abs(logits_at(bits) - float_logits).max() for bits in (8, 4))
    assert 0 < err8 < err4 / 4 and err8 < 1e-2, (err8, err4)


def test_expert_gptq_uses_each_experts_own_rows(family_export):
    """Per-expert calibration splits the rows (token, chosen expert) by expert, and GPTQ with each expert's own
    Hessian leaves less output error on those rows than RTN: tr(ΔWᵀ·H_e·ΔW) summed over the experts."""
    from qcompile import calibration
    from qcompile.algorithms.awq import output_error
    from qcompile.passes import QuantizeExperts
    from qcompile.passes._canonical import read_expert_table
    from qcompile.schemes import Algorithm, WeightScheme

    _, _, path = family_export("qwen2_moe")
    windows = np.random.default_rng(0).integers(3, 256, size=(4, 64))
    model = ir.load(path)
    tables = analysis.analyze(model).expert_tables()
    floats = {t.name: t.float_table() for t in tables}
    request = calibration.Request([t.input for t in tables], hessian=True,
                                  experts={t.input.name: t.expert_index for t in tables})
    stats = calibration.run(model, [request], windows)[0]
    for t in tables:  # every row counted once: 2 chosen experts per token
        assert sum(stats[calibration.expert_key(t.input.name, e)].tokens for e in range(4)) == 2 * windows.size

    def dequantized(algorithm, scheme_windows):
        quantized = ir.load(path)
        result = QuantizeExperts(WeightScheme(bits=4, group_size=32, algorithm=algorithm), scheme_windows)(quantized)
        assert result.record["experts"].endswith(f"16 by {algorithm.value}")
        out = {}
        for t in analysis.analyze(quantized).expert_tables():
            d = read_expert_table(t)
            out[t.name] = d.q * np.repeat(d.scale, d.block_size, axis=2)
        return out

    errors_by = {}
    for algorithm, scheme_windows in ((Algorithm.GPTQ, windows), (Algorithm.RTN, None)):
        tables_hat = dequantized(algorithm, scheme_windows)
        errors_by[algorithm] = sum(
            output_error(w[e].T, tables_hat[t.name][e].T, stats[calibration.expert_key(t.input.name, e)].hessian)
            for t in tables for w in [floats[t.name]] for e in range(4))
    assert errors_by[Algorithm.GPTQ] < 0.8 * errors_by[Algorithm.RTN], errors_by


@pytest.mark.parametrize("family", [pytest.param("mixtral", marks=pytest.mark.slow), "qwen2_moe"])
def test_experts_run_grouped_per_expert_with_the_same_logits(family_export, family, tmp_path, monkeypatch):
    """What qcompile runs itself (calibration, evaluation, `run`) computes each expert's rows together instead
    of gathering each token's expert tables: no gather of a table is left, and the logits are the exported
    graph's for a prompt and a one-token step (where most experts get no row)."""
    import onnxruntime as ort

    from qcompile import experts, runtime

    _, _, path = family_export(family)
    grouped = experts.grouped_copy(path, tmp_path)
    assert grouped is not None and not experts.gathered_tables(ir.load(grouped))
    assert experts.group(ir.load(grouped)) == 0  # nothing left to group

    real, copies = experts.grouped_copy, []
    monkeypatch.setattr(experts, "grouped_copy", lambda *a: copies.append(real(*a)) or copies[-1])
    decoder = runtime.Decoder(path)
    assert len(copies) == 1 and copies[0] is not None  # the session runs the grouped copy
    raw = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(3, 250, size=(1, 19))
    feeds = decoder.feeds(ids, decoder.empty_cache(), 0)
    names = ["logits", *decoder.present_names]
    want, got = raw.run(names, feeds), decoder.session.run(names, feeds)
    assert np.abs(want[0] - got[0]).max() < 1e-5
    cache = dict(zip(decoder.past_names, got[1:]))
    feeds = decoder.feeds(np.array([[7]]), cache, ids.shape[1])
    assert np.abs(raw.run(["logits"], feeds)[0] - decoder.session.run(["logits"], feeds)[0]).max() < 1e-5

    # quantized tables (the canonical form trt-* targets keep): 8-bit ones are dequantized one expert at a time,
    # 4-bit ones whole (ORT's Gather has no 4-bit types)
    from qcompile.passes import QuantizeExperts
    from qcompile.schemes import WeightScheme

    for bits, per_expert in [(8, 4 * 4), (4, 0)]:
        model = ir.load(path)
        QuantizeExperts(WeightScheme(bits=bits, group_size=32))(model)
        ir.save(model, tmp_path / "quantized.onnx", external_data="quantized.onnx.data")
        assert experts.group(model) == 4
        assert sum(n.op_type == "DequantizeLinear" and n.inputs[0].producer() is not None for n in model.graph) == per_expert
        ir.save(model, tmp_path / "grouped.onnx", external_data="grouped.onnx.data")
        np.testing.assert_allclose(run_logits(tmp_path / "grouped.onnx", ids),
                                   run_logits(tmp_path / "quantized.onnx", ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", [pytest.param("mixtral", marks=pytest.mark.slow), "qwen2_moe"])
def test_experts_lower_to_one_qmoe_per_block_exactly(family_export, family, tmp_path, capsys):
    """ORT targets run a 4-bit MoE block as one QMoE: the same logits as the canonical form in ORT (fp32
    compute), the same integers read back, the routing ops gone. Mixtral renormalises its top-k weights
    (normalize_routing_weights=1); Qwen2-MoE does not (the softmax probabilities are QMoE's router_weights).
    4- and 8-bit tables with one scale per row lower too; 8-bit blocks and asymmetric tables do not fit, and stay
    canonical with the reason recorded."""
    from qcompile import fidelity, targets
    from qcompile.passes import QuantizeExperts
    from qcompile.schemes import WeightScheme
    from qcompile.targets.ort_experts import LowerExpertsToQMoE

    _, _, path = family_export(family)
    ids = np.random.default_rng(3).integers(3, 256, size=(1, 16))
    ort = targets.get("ort-int4")
    model = ir.load(path)
    QuantizeExperts(WeightScheme(bits=4, group_size=32))(model)
    digests = fidelity.digests(model, ort)
    ir.save(model, tmp_path / "canonical.onnx", external_data="canonical.onnx.data")
    result = LowerExpertsToQMoE(accuracy_level=0)(model)
    assert result.record == {"experts": "QMoE in 2 blocks"}
    ops = [n.op_type for n in model.graph]
    assert ops.count("QMoE") == 2 and "TopK" not in ops and "DequantizeLinear" not in ops  # tables packed in QMoE
    qmoe = next(n for n in model.graph if n.op_type == "QMoE")
    renormalised = family == "mixtral"
    assert qmoe.attributes.get_int("normalize_routing_weights") == renormalised
    assert (len(qmoe.inputs) > 14 and qmoe.inputs[14] is not None) != renormalised  # router_weights
    assert fidelity.digests(model, ort) == digests
    ir.save(model, tmp_path / "qmoe.onnx", external_data="qmoe.onnx.data")
    np.testing.assert_allclose(run_logits(tmp_path / "qmoe.onnx", ids), run_logits(tmp_path / "canonical.onnx", ids),
                               atol=1e-5, rtol=0)
    from qcompile.cli import main

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "qmoe.onnx")]) == 0
    assert "QMoE 4-bit" in capsys.readouterr().out

    # tables with one scale per row (ort-w8a8's 8-bit experts: one block spanning K; QMoE without block_size)
    for bits in (8, 4):
        model = ir.load(path)
        QuantizeExperts(WeightScheme(bits=bits, group_size=0))(model)
        digests = fidelity.digests(model, ort)
        ir.save(model, tmp_path / "canonical_rows.onnx", external_data="canonical_rows.onnx.data")
        assert LowerExpertsToQMoE(accuracy_level=0)(model).record == {"experts": "QMoE in 2 blocks"}
        qmoe = next(n for n in model.graph if n.op_type == "QMoE")
        assert qmoe.attributes.get_int("expert_weight_bits") == bits and qmoe.attributes.get("block_size") is None
        assert fidelity.digests(model, ort) == digests
        ir.save(model, tmp_path / "qmoe_rows.onnx", external_data="qmoe_rows.onnx.data")
        np.testing.assert_allclose(run_logits(tmp_path / "qmoe_rows.onnx", ids),
                                   run_logits(tmp_path / "canonical_rows.onnx", ids), atol=1e-5, rtol=0)

    for scheme, reason in [(WeightScheme(bits=8, group_size=32), "8-bit expert tables in blocks"),
                           (WeightScheme(bits=4, group_size=32, symmetric=False), "not 4- or 8-bit symmetric integers")]:
        model = ir.load(path)
        QuantizeExperts(scheme)(model)
        result = LowerExpertsToQMoE()(model)
        assert not result.modified and reason in result.record["experts"]


@pytest.mark.parametrize("family", params)
def test_every_target_compiles_verifies_and_decodes(family_export, family, tmp_path):
    _, folder, _ = family_export(family)
    small = dict(calib_samples=2, calib_seqlen=128)  # each target's own recipe, on less calibration text
    arts = qcompile.compile_many(folder, ["ort-int4", "trt-int4", "edge-int4"], tmp_path / "int4", eval_windows=None, **small)
    report = qcompile.verify_all([art.path for art in arts.values()])
    assert report["passed"], report
    for target in ("ort-w8a8", "trt-int8", "trt-fp8", "ort-w4a8"):
        arts[target] = qcompile.compile(folder, target, tmp_path / target, eval_windows=None, **small)
    rotations = next(p for p in arts["ort-w4a8"].manifest["passes"] if p["name"].startswith("FuseNormGains"))
    rotatable = _rotatable(analysis.analyze(ir.load(family_export(family)[2])))
    assert rotations["modified"] == rotatable and ("skipped" in rotations) != rotatable  # else: why, in the manifest
    from qcompile.package import genai_greedy

    golden = json.loads((arts["edge-int4"].path / "golden.json").read_text())  # onnxruntime-genai runs the package
    assert genai_greedy(arts["edge-int4"].path, golden["prompt_ids"], 8) == golden["greedy_ids"][:8]
    ids = np.random.default_rng(2).integers(3, 256, size=(1, 12))
    for target, art in arts.items():
        prompt, later, _ = prompt_and_step(art.model_path, ids)
        assert np.isfinite(prompt).all() and np.isfinite(later).all(), target
