import numpy as np
import onnx_ir as ir
import pytest

from qcompile import analysis, errors, targets
from qcompile.passes import (FuseGroupQueryAttention, FuseNormGains, InsertOnlineHadamard, InsertQueryKeyHadamard,
                             RotateResidualStream, RotateValueOutput)
from tests.conftest import prompt_and_step

R = analysis.Role


def _fused_against_unfused(model, tmp_path, ids, max_positions=None):
    unfused, fused = tmp_path / "unfused.onnx", tmp_path / "fused.onnx"
    ir.save(model, unfused, external_data="unfused.onnx.data")
    assert FuseGroupQueryAttention(max_positions)(model).modified
    ir.save(model, fused, external_data="fused.onnx.data")
    return prompt_and_step(fused, ids), prompt_and_step(unfused, ids), model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("rope", [False, True])  # True: GQA applies RoPE itself from cos/sin caches
def test_fused_attention_leaves_prompt_and_cached_decode_unchanged(tiny_export, tmp_path, arch, rope):
    _, path = tiny_export(arch)
    ids = np.random.default_rng(3).integers(0, 256, size=(2, 14))
    (p1, s1, c1), (p0, s0, c0), model = _fused_against_unfused(ir.load(path), tmp_path, ids, 256 if rope else None)
    ops = [n.op_type for n in model.graph]
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == len(analysis.analyze(model, targets.get("ort-int4").forms).blocks) == 2
    assert {n.attributes.get_int("do_rotary") for n in gqa} == {int(rope)}
    assert "Softmax" not in ops and ("Neg" in ops) != rope
    np.testing.assert_allclose(p1, p0, atol=1e-4, rtol=0)
    np.testing.assert_allclose(s1, s0, atol=1e-4, rtol=0)
    assert c1.keys() == c0.keys()
    for name in c0:
        np.testing.assert_allclose(c1[name], c0[name], atol=1e-5, rtol=0)


def test_fused_attention_composes_with_quarot(tiny_export, tmp_path):
    """The fused op attends with what the graph computes upstream: rotated queries and keys (with a quantized
    cache: tests/passes/test_quantize_kv_cache.py)."""
    _, path = tiny_export("llama")
    model = ir.load(path)
    for p in [FuseNormGains(), RotateResidualStream(), RotateValueOutput(), InsertOnlineHadamard((R.DOWN, R.O)),
              InsertQueryKeyHadamard()]:
        assert p(model).modified
    ids = np.random.default_rng(4).integers(0, 256, size=(1, 12))
    (p1, s1, _), (p0, s0, _), model = _fused_against_unfused(model, tmp_path, ids, max_positions=256)
    assert [n.op_type for n in model.graph].count("Hadamard") == 2 * 4
    assert {n.attributes.get_int("do_rotary") for n in model.graph if n.op_type == "GroupQueryAttention"} == {0}
    np.testing.assert_allclose(p1, p0, atol=1e-4, rtol=0)
    np.testing.assert_allclose(s1, s0, atol=1e-4, rtol=0)


def test_fusing_twice_is_a_clear_error(tiny_export):
    _, path = tiny_export("llama")
    model = ir.load(path)
    FuseGroupQueryAttention()(model)
    with pytest.raises(errors.UnsupportedModelError, match="attention"):
        FuseGroupQueryAttention()(model)


def test_an_unmatched_attention_stays_unfused_when_not_strict(tiny_export):
    """A cache written through something other than Concat(past, new) cannot be fused from: the ORT targets
    leave it unfused and say why."""
    _, path = tiny_export("llama")
    model = ir.load(path)
    for index, present in enumerate(list(model.graph.outputs)):
        if present.name.startswith("present."):
            copy = ir.node("Identity", [present], name=f"{present.name}.copy")
            model.graph.append(copy)
            copy.outputs[0].name, present.name = present.name, f"{present.name}.concat"
            copy.outputs[0].shape, copy.outputs[0].type = present.shape, present.type
            model.graph.outputs[index] = copy.outputs[0]
    with pytest.raises(errors.UnsupportedModelError, match="KV-cache Concat"):
        FuseGroupQueryAttention(256)(model)
    result = FuseGroupQueryAttention(256, strict=False)(model)
    assert not result.modified
    assert "GroupQueryAttention" not in [n.op_type for n in model.graph]
    assert result.record["fused_attention"].startswith("2 blocks left unfused (block 0:")


@pytest.mark.parametrize("rotary_dims", [32, 8])  # 32: GQA's own partial RoPE; 8: not a multiple of 16, fed rotated
def test_partial_rope_fuses_into_gqa_where_its_cos_sin_fit(tmp_path, rotary_dims):
    """Phi-style RoPE on the first `rotary_dims` channels of 64: GQA applies it itself where its cos/sin caches
    can hold it (ORT: a multiple of 8 columns, half the rotated channels), else it is fed the rotated q and k;
    either way the prompt, a cached step and the cache equal the decomposed graph's."""
    import qcompile
    from tests.families import tiny_model, write_byte_tokenizer

    model = tiny_model("phi", hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                       partial_rotary_factor=rotary_dims / 64)
    model.save_pretrained(tmp_path / "hf")
    write_byte_tokenizer(tmp_path / "hf")
    exported = ir.load(qcompile.export(tmp_path / "hf") / "model.onnx")
    assert analysis.analyze(exported).blocks[0].attention.rotary.dims == rotary_dims
    ids = np.random.default_rng(3).integers(3, 256, size=(1, 14))
    (p1, s1, c1), (p0, s0, c0), fused = _fused_against_unfused(exported, tmp_path, ids, 256)
    assert {n.attributes.get_int("do_rotary") for n in fused.graph if n.op_type == "GroupQueryAttention"} == {rotary_dims == 32}
    np.testing.assert_allclose(p1, p0, atol=1e-4, rtol=0)
    np.testing.assert_allclose(s1, s0, atol=1e-4, rtol=0)
    for name in c0:
        np.testing.assert_allclose(c1[name], c0[name], atol=1e-5, rtol=0)
