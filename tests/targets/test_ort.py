import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompile import analysis, errors
from qcompile.algorithms.rtn import quantize_rtn
from qcompile.passes import QuantizeWeightsRTN
from qcompile.passes._canonical import attach_quantized_weight
from qcompile.schemes import WeightScheme
from qcompile.targets import get
from qcompile.targets.ort import LowerToMatMulNBits, decode_matmul_nbits, pack_matmul_nbits
from tests.conftest import run_logits, single_matmul_model

ort_target = get("ort-int4")

CASES = [(4, True, 128), (4, False, 128), (4, True, 32), (8, True, 64), (8, False, 16), (4, False, 64)]
PACKED = CASES + [(2, True, 64), (2, False, 32), (2, False, 128)]


@pytest.mark.parametrize("bits,symmetric,block", PACKED)
def test_pack_unpack_equals_canonical_dequantize(bits, symmetric, block):
    w = np.random.default_rng(0).normal(size=(200, 12)).astype(np.float32)  # K=200: short last block
    qw = quantize_rtn(w, bits, block, symmetric)
    b, scales, zp = pack_matmul_nbits(qw.q, qw.scale, qw.zero_point, bits, block)
    assert b.shape == (12, -(-200 // block), block * bits // 8) and b.dtype == np.uint8
    q, scale, zero_point = decode_matmul_nbits(b, scales, zp, 200, bits, block)  # the exact inverse of the packer
    np.testing.assert_array_equal(q, qw.q.astype(np.int16))
    np.testing.assert_array_equal(scale, qw.scale)
    assert (zero_point is None) == symmetric
    if not symmetric:
        np.testing.assert_array_equal(zero_point, qw.zero_point.astype(np.int16))


def _one_linear(k, n, bits, symmetric, block, seed=0):
    """x [M, K] @ DequantizeLinear(canonical RTN weight): the canonical form of one linear."""
    model = single_matmul_model(k, n)
    w = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
    node = next(iter(model.graph))
    lin = analysis.Linear("lin", analysis.Role.Q, 0, node, k, n)
    qw = quantize_rtn(w, bits, block, symmetric)
    attach_quantized_weight(model.graph, lin, qw)
    model.graph.inputs[0].shape = ir.Shape(["m", k])
    return model, qw


def _run(model: ir.Model, x: np.ndarray, tmp_path, name: str) -> np.ndarray:
    path = tmp_path / f"{name}.onnx"
    ir.save(model, path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the nodes as written
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("bits,symmetric,block", CASES)
def test_runtime_weights_are_bit_identical(bits, symmetric, block, tmp_path):
    """Both runtimes' own kernels, fed the identity, return the dequantized weight: bit for bit equal."""
    k, n = 192, 24
    canonical, qw = _one_linear(k, n, bits, symmetric, block)
    eye = np.eye(k, dtype=np.float32)
    ref = _run(canonical, eye, tmp_path, "canonical")
    np.testing.assert_array_equal(ref, qw.dequantize())
    result = LowerToMatMulNBits(accuracy_level=0)(canonical)
    assert result.modified
    assert [n.op_type for n in canonical.graph] == ["MatMulNBits"]
    np.testing.assert_array_equal(_run(canonical, eye, tmp_path, "nbits"), ref)


@pytest.mark.parametrize("symmetric,block", [(True, 64), (False, 32), (True, 16)])
def test_two_bit_weights_lower_to_matmul_nbits_bits_2_bit_identically(symmetric, block, tmp_path):
    """ONNX Runtime's 2-bit MatMulNBits kernel, fed the identity, returns the canonical dequantized weight (the
    canonical INT2 form itself is opset 25's, which ORT's opset-21 DequantizeLinear does not run)."""
    k, n = 192, 24
    canonical, qw = _one_linear(k, n, 2, symmetric, block)
    assert canonical.graph.initializers["lin.weight_q"].dtype == (ir.DataType.INT2 if symmetric else ir.DataType.UINT2)
    assert qw.q.min() >= (-2 if symmetric else 0) and qw.q.max() <= (1 if symmetric else 3)
    assert LowerToMatMulNBits(accuracy_level=0)(canonical).modified
    node = next(iter(canonical.graph))
    assert (node.op_type, node.attributes["bits"].as_int()) == ("MatMulNBits", 2)
    np.testing.assert_array_equal(_run(canonical, np.eye(k, dtype=np.float32), tmp_path, "nbits2"), qw.dequantize())


@pytest.mark.parametrize("axis,block,reason", [(1, 0, "axis 0"), (0, 48, "power of two")])
def test_rule_does_not_fire_on_other_layouts(axis, block, reason, tmp_path):
    model, _ = _one_linear(64, 8, 4, True, 32)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    dq.attributes["axis"] = ir.AttrInt64("axis", axis)
    dq.attributes["block_size"] = ir.AttrInt64("block_size", block)
    result = LowerToMatMulNBits()(model)
    assert not result.modified
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "MatMul"]


def test_lowered_model_matches_canonical(tiny_export, tmp_path):
    _, path = tiny_export("mistral")
    model = ir.load(path)
    QuantizeWeightsRTN(WeightScheme(bits=4, group_size=32, lm_head_bits=8))(model)
    ir.save(model, tmp_path / "canonical.onnx", external_data="canonical.onnx.data")
    LowerToMatMulNBits(accuracy_level=0)(model)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph) == 2 * 7 + 1
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph)
    ir.save(model, tmp_path / "lowered.onnx", external_data="lowered.onnx.data")
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 12))
    # ORT fuses the canonical DQ → MatMul itself; pin that fusion to fp32 compute like the lowered model
    ref = run_logits(tmp_path / "canonical.onnx", ids, **{"session.qdq_matmulnbits_accuracy_level": 0})
    got = run_logits(tmp_path / "lowered.onnx", ids)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)  # same weights; only accumulation order differs


def test_registry_lists_ort_int4_with_its_defaults():
    from qcompile.recipe import resolve

    target, plan = get("ort-int4"), resolve("ort-int4")
    assert plan.weights.bits == 4 and plan.weights.group_size == 64 and plan.weights.symmetric and plan.lm_head.bits == 4
    assert [type(p).__name__ for p in target.lowering_passes(plan)] == ["FuseGroupQueryAttention", "LowerToMatMulNBits",
                                                                    "FuseNormalizations", "PackQKV", "PackGateUp",
                                                                    "LowerExpertsToQMoE"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_qkv_is_exact_and_reads_back_as_three_linears(tiny_export, tmp_path, symmetric):
    """q, k, v stacked into one MatMulNBits feeding GroupQueryAttention's packed input: the same logits and
    cache as the three separate kernels, and the same integers for each linear (fidelity digests)."""
    from qcompile import fidelity
    from qcompile.targets.ort import PackQKV
    from tests.conftest import prompt_and_step

    _, path = tiny_export("llama")
    model = ir.load(path)
    QuantizeWeightsRTN(WeightScheme(bits=4, group_size=32, symmetric=symmetric, lm_head_bits=8))(model)
    digests = fidelity.digests(model, ort_target)
    from qcompile.recipe import resolve

    for lower in get("ort-int4").lowering_passes(resolve("ort-int4"), 256)[:-3]:  # up to PackQKV
        lower(model)
    ir.save(model, tmp_path / "three.onnx", external_data="three.onnx.data")
    assert PackQKV()(model).modified
    ir.save(model, tmp_path / "packed.onnx", external_data="packed.onnx.data")
    attention = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2 and all(n.inputs[1] is None and n.inputs[2] is None for n in attention)
    assert [n.op_type for n in model.graph].count("MatMulNBits") == 2 * 5 + 1
    mm = analysis.analyze(model, ort_target.forms)
    q, k, v = (mm.blocks[0].linears[r] for r in (analysis.Role.Q, analysis.Role.K, analysis.Role.V))
    assert q.node is k.node is v.node and q.columns[0] == 0 and k.columns[0] == q.columns[1] == q.in_features
    assert fidelity.digests(model, ort_target) == digests
    ids = np.random.default_rng(5).integers(0, 256, size=(1, 12))
    (p1, s1, c1), (p0, s0, c0) = prompt_and_step(tmp_path / "packed.onnx", ids), prompt_and_step(tmp_path / "three.onnx", ids)
    np.testing.assert_allclose(p1, p0, atol=1e-6, rtol=0)
    np.testing.assert_allclose(s1, s0, atol=1e-6, rtol=0)
    for name in c0:
        np.testing.assert_allclose(c1[name], c0[name], atol=1e-6, rtol=0)
    norms = [n for n in model.graph if n.op_type.endswith("SimplifiedLayerNormalization")]
    assert norms and all(not out.name for n in norms for out in n.outputs[1:3])  # unread mean/inv-std dropped


def test_packed_gate_up_is_exact_and_reads_back_as_two_linears(tiny_export, tmp_path):
    """gate and up stacked into one MatMulNBits and split: the same logits as two kernels, one kernel fewer per
    block, read back as a fused gate_up with both column ranges and the same integers per linear."""
    from qcompile import fidelity
    from qcompile.recipe import resolve
    from qcompile.targets.ort import PackGateUp
    from tests.conftest import prompt_and_step

    _, path = tiny_export("llama")
    model = ir.load(path)
    QuantizeWeightsRTN(WeightScheme(bits=4, group_size=32, lm_head_bits=8))(model)
    digests = fidelity.digests(model, ort_target)
    for lower in get("ort-int4").lowering_passes(resolve("ort-int4"), 256)[:-2]:  # up to PackGateUp
        lower(model)
    ir.save(model, tmp_path / "two.onnx", external_data="two.onnx.data")
    kernels = [n.op_type for n in model.graph].count("MatMulNBits")
    assert PackGateUp()(model).modified
    ir.save(model, tmp_path / "packed.onnx", external_data="packed.onnx.data")
    assert [n.op_type for n in model.graph].count("MatMulNBits") == kernels - 2
    block = analysis.analyze(model, ort_target.forms).blocks[0]
    gate_up = block.linears[analysis.Role.GATE_UP]
    assert gate_up.parts == {analysis.Role.GATE: (0, 128), analysis.Role.UP: (128, 256)}
    assert fidelity.digests(model, ort_target) == digests
    ids = np.random.default_rng(5).integers(0, 256, size=(1, 12))
    (p1, s1, _), (p0, s0, _) = prompt_and_step(tmp_path / "packed.onnx", ids), prompt_and_step(tmp_path / "two.onnx", ids)
    np.testing.assert_allclose(p1, p0, atol=1e-6, rtol=0)
    np.testing.assert_allclose(s1, s0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_embedding_lowers_to_gather_block_quantized(tiny_export, tmp_path, bits):
    from qcompile.passes import QuantizeEmbedding

    _, path = tiny_export("mistral")  # untied: the float table goes away
    model = ir.load(path)
    table = analysis.analyze(model, ort_target.forms).embedding.inputs[0].const_value.numpy()
    QuantizeWeightsRTN(WeightScheme(bits=4, group_size=32, lm_head_bits=8))(model)
    QuantizeEmbedding(bits, 32)(model)  # hidden 64: two blocks per row
    canonical = ort_target.read_embedding(analysis.analyze(model, ort_target.forms).embedding)
    # each row is the RTN of that row, blocks along H
    np.testing.assert_array_equal(canonical.q, quantize_rtn(table.T, bits, 32, True).q.T)
    ir.save(model, tmp_path / "canonical.onnx", external_data="canonical.onnx.data")
    LowerToMatMulNBits(accuracy_level=0)(model)
    assert [n.op_type for n in model.graph].count("GatherBlockQuantized") == 1
    assert ort_target.read_embedding(analysis.analyze(model, ort_target.forms).embedding).digest() == canonical.digest()
    ir.save(model, tmp_path / "lowered.onnx", external_data="lowered.onnx.data")
    ids = np.random.default_rng(2).integers(0, 256, size=(2, 12))
    ref = run_logits(tmp_path / "canonical.onnx", ids, **{"session.qdq_matmulnbits_accuracy_level": 0})
    np.testing.assert_allclose(run_logits(tmp_path / "lowered.onnx", ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_tied_table_and_lm_head_of_one_width_are_stored_once(tiny_export, tmp_path, bits):
    from qcompile.passes import QuantizeEmbedding

    _, path = tiny_export("llama")  # tied
    model = ir.load(path)
    QuantizeWeightsRTN(WeightScheme(bits=4, group_size=32, lm_head_bits=bits, lm_head_group_size=32))(model)
    head = ort_target.read_weight(analysis.analyze(model, ort_target.forms).lm_head)
    QuantizeEmbedding(bits, 32, shared=True)(model)
    table = ort_target.read_embedding(analysis.analyze(model, ort_target.forms).embedding)
    np.testing.assert_array_equal(table.q, head.q.T)  # the lm_head's integers and scales, transposed
    np.testing.assert_array_equal(table.scale, head.scale.T)
    ir.save(model, tmp_path / "canonical.onnx", external_data="canonical.onnx.data")
    LowerToMatMulNBits(accuracy_level=0)(model)
    gather, lm_head = analysis.analyze(model, ort_target.forms).embedding, analysis.analyze(model, ort_target.forms).lm_head
    assert gather.op_type == "GatherBlockQuantized" and gather.inputs[0].producer().inputs[0] is lm_head.node.inputs[1]
    assert not any(v.name.startswith("embedding.weight") for v in model.graph.initializers.values())  # stored once
    assert ort_target.read_embedding(gather).digest() == table.digest()
    ir.save(model, tmp_path / "lowered.onnx", external_data="lowered.onnx.data")
    ids = np.random.default_rng(2).integers(0, 256, size=(2, 12))
    ref = run_logits(tmp_path / "canonical.onnx", ids, **{"session.qdq_matmulnbits_accuracy_level": 0})
    np.testing.assert_allclose(run_logits(tmp_path / "lowered.onnx", ids), ref, atol=1e-4, rtol=0)


def test_a_shared_table_needs_the_lm_head_in_its_format(tiny_export):
    from qcompile.passes import QuantizeEmbedding

    model = ir.load(tiny_export("llama")[1])
    QuantizeWeightsRTN(WeightScheme(bits=4, group_size=32, lm_head_bits=8))(model)
    with pytest.raises(errors.InputError, match="needs lm_head quantized to 4 bits"):
        QuantizeEmbedding(4, 32, shared=True)(model)

    model = ir.load(tiny_export("llama")[1])  # lm_head no longer computes with the table: refused, not shared
    QuantizeWeightsRTN(WeightScheme(bits=4, group_size=32, lm_head_bits=4, lm_head_group_size=32))(model)
    table = analysis.analyze(model, ort_target.forms).embedding.inputs[0]
    table.const_value = ir.tensor(3 * table.const_value.numpy(), name=table.name)
    with pytest.raises(errors.QcompileError, match="not the embedding table"):
        QuantizeEmbedding(4, 32, shared=True)(model)


def test_per_channel_int8_weights_lower_bit_identically(tmp_path):
    k, n = 200, 24
    canonical, qw = _one_linear(k, n, 8, True, 0)  # group 0: one scale per output channel, DQ axis=1
    dq = next(node for node in canonical.graph if node.op_type == "DequantizeLinear")
    assert dq.attributes.get_int("axis") == 1 and "block_size" not in dq.attributes and qw.scale.shape == (1, n)
    linear = lambda: analysis.Linear("lin", analysis.Role.Q, 0, list(canonical.graph)[-1], k, n)  # noqa: E731
    before = ort_target.read_weight(linear())
    eye = np.eye(k, dtype=np.float32)
    ref = _run(canonical, eye, tmp_path, "canonical")
    assert LowerToMatMulNBits(accuracy_level=0)(canonical).modified
    assert [node.op_type for node in canonical.graph] == ["MatMulNBits"]
    np.testing.assert_array_equal(_run(canonical, eye, tmp_path, "nbits"), ref)
    assert ort_target.read_weight(linear()).digest() == before.digest()  # repeated block scales decode as one


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_w8a8_per_token_quantizers_become_matmul_nbits_int8_activations(tiny_export, tmp_path, accuracy_level):
    from qcompile import fidelity
    from qcompile.passes import QuantizeActivations
    from qcompile.schemes import ActivationKind

    _, path = tiny_export("llama")
    model = ir.load(path)
    QuantizeWeightsRTN(WeightScheme(bits=8, group_size=0, lm_head_bits=8))(model)
    QuantizeActivations(ActivationKind.INT8_DYNAMIC)(model)
    digests = fidelity.digests(model, ort_target)
    ir.save(model, tmp_path / "canonical.onnx", external_data="canonical.onnx.data")
    LowerToMatMulNBits(accuracy_level)(model)
    per_token = [node for node in model.graph if node.op_type == "QuantizeDequantizePerToken"]
    assert sum(node.op_type == "MatMulNBits" for node in model.graph) == 2 * 7 + 1
    # accuracy_level 4 quantizes the activations itself (per token and block); level 0 keeps our quantizer
    assert len(per_token) == (0 if accuracy_level == 4 else 2 * 4 + 1)
    assert (("qcompile", "QuantizeDequantizePerToken", "") in model.functions) == (accuracy_level == 0)
    assert fidelity.digests(model, ort_target) == digests
    ir.save(model, tmp_path / "lowered.onnx", external_data="lowered.onnx.data")
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 12))
    ref = run_logits(tmp_path / "canonical.onnx", ids, **{"session.qdq_matmulnbits_accuracy_level": 0})
    got = run_logits(tmp_path / "lowered.onnx", ids)
    snr_db = 10 * np.log10((ref**2).sum() / ((got - ref) ** 2).sum())
    assert snr_db > (60 if accuracy_level == 0 else 30), snr_db


def test_ort_w4a8_rotates_then_lowers_with_the_online_hadamard(tiny_export, tmp_path):
    import json

    import qcompile

    _, path = tiny_export("qwen2")
    art = qcompile.compile(path, "ort-w4a8", tmp_path / "art", algo="rtn", eval_windows=None)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]][:3] == ["FuseNormGains+RotateResidualStream", "RotateValueOutput",
                                                "InsertOnlineHadamard"]
    assert manifest["recipe"]["rotation"]["seed"] == 0
    model = ir.load(art.path / "model.onnx")
    assert sum(n.op_type == "Hadamard" for n in model.graph) == 2
    assert sum(n.op_type == "MatMulNBits" for n in model.graph) == 2 * 6 + 1  # q, k, v, o, gate+up packed, down; lm_head
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 12))
    got, ref = run_logits(art.path / "model.onnx", ids), run_logits(path, ids)
    assert np.isfinite(got).all() and np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9  # still the same model


def test_the_lowered_model_reads_as_the_canonical_one_through_the_targets_forms(tiny_export):
    """`analysis` knows ONNX's own ops; the ORT target's `forms` say what MatMulNBits, the fused norms,
    GroupQueryAttention (packed q/k/v) and GatherBlockQuantized stand for, so the lowered model has the
    canonical model's ModelMap (names, roles, shapes, norms)."""
    from qcompile.passes import QuantizeEmbedding
    from qcompile.recipe import resolve

    model = ir.load(tiny_export("llama")[1])
    QuantizeWeightsRTN(WeightScheme(bits=4, group_size=32, lm_head_bits=4, lm_head_group_size=32))(model)
    QuantizeEmbedding(4, 32, shared=True)(model)

    def described(mm):
        views = [view for lin in mm.linears() for view in lin.views()]
        return [(v.name, v.role, v.in_features, v.out_features, v.norm.kind if v.norm else None) for v in views], len(mm.blocks)

    canonical = described(analysis.analyze(model))
    for lower in get("ort-int4").lowering_passes(resolve("ort-int4"), 256):
        lower(model)
    ops = {n.op_type for n in model.graph}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization", "GatherBlockQuantized"} <= ops
    lowered = analysis.analyze(model, ort_target.forms)
    assert described(lowered) == canonical
    assert lowered.blocks[0].linears[analysis.Role.Q].format().startswith("MatMulNBits 4-bit block 32")
    assert lowered.embedding.op_type == "GatherBlockQuantized"
    with pytest.raises(errors.UnsupportedModelError):
        analysis.analyze(model)  # ONNX's own ops alone: MatMulNBits is no linear
