import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import reference

from qcompile import analysis, custom_ops, errors
from qcompile.algorithms.hadamard import kronecker_hadamard
from qcompile.passes import (FuseNormGains, InsertOnlineHadamard, RotateResidualStream, RotateValueOutput,
                             SmoothRotateNormOutputs)
from tests.conftest import run_logits

R = analysis.Role
ROTATIONS = [FuseNormGains, RotateResidualStream, RotateValueOutput, InsertOnlineHadamard]


def _weights(model):
    return {lin.name: lin.float_weight().copy() for lin in analysis.analyze(model).linears()}


def _logits_after(model, tmp_path, path, ids):
    out = tmp_path / "model.onnx"
    ir.save(model, out, external_data="model.onnx.data")
    return run_logits(out, ids), run_logits(path, ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama: tied lm_head; qwen2: q/k/v biases
@pytest.mark.parametrize("upto", [1, 2, 3, 4])
def test_each_rotation_step_leaves_float_logits_unchanged(tiny_export, tmp_path, arch, upto):
    _, path = tiny_export(arch)
    model = ir.load(path)
    before = _weights(model)
    for cls in ROTATIONS[:upto]:
        assert cls()(model).modified
    after = _weights(model)
    changed = {n for n in before if np.abs(after[n] - before[n]).max() > 1e-3}
    expected = {
        1: {"q", "k", "v", "gate", "up", "lm_head"},  # γ folded into readers
        2: {"q", "k", "v", "o", "gate", "up", "down", "lm_head"},
        3: {"q", "k", "v", "o", "gate", "up", "down", "lm_head"},
        4: {"q", "k", "v", "o", "gate", "up", "down", "lm_head"},
    }[upto]
    assert {n.split(".")[-1] for n in changed} == expected
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 16))
    got, want = _logits_after(model, tmp_path, path, ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_fuse_norm_gains_unties_lm_head_and_sets_gains_to_one(tiny_export):
    _, path = tiny_export("llama")
    model = ir.load(path)
    table = analysis.analyze(model).embedding.inputs[0].const_value.numpy().copy()
    FuseNormGains()(model)
    model_map = analysis.analyze(model)
    assert not model_map.tied_lm_head
    norms = [n for b in model_map.blocks for n in (b.input_norm, b.post_attention_norm)] + [model_map.final_norm]
    assert all(np.all(n.gain.const_value.numpy() == 1) for n in norms)
    np.testing.assert_array_equal(model_map.embedding.inputs[0].const_value.numpy(), table)
    assert not [n for n in model.graph if n.op_type == "Transpose" and n.inputs[0].name == model_map.embedding.inputs[0].name]


def test_residual_rotation_needs_fused_gains(tiny_export):
    _, path = tiny_export("llama")
    with pytest.raises(errors.UnsupportedModelError, match="FuseNormGains first"):
        RotateResidualStream()(ir.load(path))


def test_residual_rotation_is_seeded(tiny_export):
    _, path = tiny_export("llama")
    weights = []
    for seed in (0, 0, 1):
        model = ir.load(path)
        FuseNormGains()(model)
        RotateResidualStream(seed)(model)
        weights.append(_weights(model)["blocks.0.q"])
    np.testing.assert_array_equal(weights[0], weights[1])
    assert np.abs(weights[0] - weights[2]).max() > 1e-3


def test_online_hadamard_op_matches_numpy_in_onnx_reference():
    """The qcompile.Hadamard function body computes KroneckerHadamard.apply, in onnx.reference (no ORT)."""
    h = kronecker_hadamard(96)  # 12 · 8: a Paley factor and a Sylvester factor
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3, 96]))
    left = ir.Value(name="left", const_value=ir.tensor(h.a.T.astype(np.float32), name="left"))
    right = ir.Value(name="right", const_value=ir.tensor(h.b.astype(np.float32), name="right"))
    node = custom_ops.hadamard_node(x, left, right, "y")
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[left, right], opset_imports={"": 21}, name="h")
    model = ir.Model(graph, ir_version=10)
    custom_ops.register(model, custom_ops.HADAMARD)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    data = np.random.default_rng(0).standard_normal((2, 3, 96)).astype(np.float32)
    (got,) = reference.ReferenceEvaluator(proto).run(None, {"x": data})
    np.testing.assert_allclose(got, h.apply(data.astype(np.float64)), atol=1e-5)


def test_online_hadamard_shares_its_matrices(tiny_export):
    _, path = tiny_export("llama")
    model = ir.load(path)
    InsertOnlineHadamard()(model)
    ops = [n for n in model.graph if n.op_type == custom_ops.HADAMARD]
    assert len(ops) == len(analysis.analyze(model).blocks)
    assert len({n.inputs[1] for n in ops}) == 1
    assert all(analysis.analyze(model).blocks[i].linears[R.DOWN].node.inputs[0] is n.outputs[0] for i, n in enumerate(ops))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_attention_hadamards_leave_prompt_and_cached_decode_unchanged(tiny_export, tmp_path, arch):
    """Full QuaRot (o_proj's input and post-RoPE queries/keys rotated online too): the logits of a prompt
    and of a decode step that reads the (rotated) cache equal the float model's."""
    from qcompile.passes import InsertQueryKeyHadamard
    from qcompile.runtime import Decoder

    _, path = tiny_export(arch)
    model = ir.load(path)
    for p in [FuseNormGains(), RotateResidualStream(), RotateValueOutput(),
              InsertOnlineHadamard((R.DOWN, R.O)), InsertQueryKeyHadamard()]:
        assert p(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("Hadamard") == 2 * 2 + 2 * 2  # per block: down, o, query, key
    out = tmp_path / "model.onnx"
    ir.save(model, out, external_data="model.onnx.data")
    ids = np.random.default_rng(2).integers(0, 256, size=(1, 12))
    results = []
    for file in (out, path):
        decoder = Decoder(file)
        prompt, cache = decoder.forward(ids[:, :11], decoder.empty_cache(), 0)
        step, _ = decoder.forward(ids[:, 11:], cache, 11)
        results.append((prompt, step, cache))
    (p1, s1, c1), (p0, s0, c0) = results
    np.testing.assert_allclose(p1, p0, atol=1e-4, rtol=0)
    np.testing.assert_allclose(s1, s0, atol=1e-4, rtol=0)
    key = next(n for n in c0 if n.endswith(".key"))
    assert np.abs(c1[key] - c0[key]).max() > 1e-2  # the cache really holds rotated keys


def test_query_key_hadamard_needs_a_kv_cache_concat(tiny_export):
    from qcompile.passes import InsertQueryKeyHadamard

    _, path = tiny_export("llama")
    model = ir.load(path)
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    model.graph.outputs.clear()
    model.graph.outputs.append(logits)  # no present.* outputs: attention without a cache
    with pytest.raises(errors.UnsupportedModelError, match="KV-cache Concat"):
        InsertQueryKeyHadamard()(model)


def test_value_rotation_and_o_hadamard_together_mix_every_channel(tiny_export):
    """o_proj's input is rotated by M = diag(H_g…)·H_online. A Sylvester per-head H shared by all heads
    cancels against the Sylvester factor of H_online (M = H_4 ⊗ I here: each channel reaches 4 of 64);
    the per-KV-head signs make M dense, as a random rotation is (row Σ m⁴·n: 1 flat, 3 Gaussian, 16 here
    without the signs)."""
    _, path = tiny_export("llama")
    model = ir.load(path)
    o = analysis.analyze(model).blocks[0].linears[R.O]
    before = o.float_weight().astype(np.float64)
    RotateValueOutput()(model)
    InsertOnlineHadamard((R.DOWN, R.O))(model)
    after = analysis.analyze(model).blocks[0].linears[R.O].float_weight().astype(np.float64)
    m = (after @ np.linalg.inv(before)).T  # after = Mᵀ·before
    np.testing.assert_allclose(m @ m.T, np.eye(len(m)), atol=1e-5)
    assert (np.abs(m) > 1e-6).mean() > 0.5
    assert ((m**4).sum(axis=1) * len(m)).mean() < 4.0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_smoothed_norm_rotation_leaves_float_logits_unchanged(tiny_export, tmp_path, arch):
    """Gain s and an online Hadamard after each block norm, Hᵀ·diag(γ/s) in its readers; down_proj's input
    scaled by t through up_proj's columns before its Hadamard: same logits, and the rest of QuaRot's online
    rotations compose with them."""
    from qcompile.passes._fold import set_tensor

    _, path = tiny_export(arch)
    model = ir.load(path)
    rng = np.random.default_rng(0)
    for norm, _ in analysis.analyze(model).norm_readers():  # uneven gains, so that γ/s is not trivial
        set_tensor(norm.gain, rng.uniform(0.2, 3.0, norm.gain.const_value.shape))
    reference = tmp_path / "reference.onnx"
    ir.save(model, reference, external_data="reference.onnx.data")
    down_before = [b.linears[R.DOWN].float_weight() for b in analysis.analyze(model).blocks]
    assert SmoothRotateNormOutputs(rng.integers(0, 256, size=(2, 16)), down_inputs=True)(model).modified
    mm = analysis.analyze(model)  # the norms are still found, through the Hadamard
    for block in mm.blocks:
        for norm in (block.input_norm, block.post_attention_norm):
            gain = norm.gain.const_value.numpy()
            assert not np.allclose(np.abs(gain), 1.0)  # s, with its random signs
            assert {u.node.op_type for u in norm.output.uses()} == {"Hadamard"}
    for block, before in zip(mm.blocks, down_before):  # down's rows divided by t (and up's columns multiplied)
        t = before / block.linears[R.DOWN].float_weight()
        np.testing.assert_allclose(t, np.broadcast_to(t[:, :1], t.shape), rtol=1e-5)
        assert t.min() < 0.9 and t.max() > 1.1
    assert RotateValueOutput()(model).modified and InsertOnlineHadamard((R.DOWN, R.O))(model).modified
    assert [n.op_type for n in model.graph].count("Hadamard") == 4 * len(mm.blocks)
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 16))
    got, want = _logits_after(model, tmp_path, reference, ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
