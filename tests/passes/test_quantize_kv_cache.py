"""QuantizeKVCache (the reference: static per-channel fake quantization) and its lowering to
GroupQueryAttention's own int8 / packed-int4 cache."""

import numpy as np
import onnx_ir as ir
import pytest

from qcompile import analysis, errors
from qcompile.calibration import TapStats
from qcompile.passes import (Calibrate, FuseGroupQueryAttention, FuseNormGains, InsertOnlineHadamard,
                             InsertQueryKeyHadamard, QuantizeKVCache, RotateResidualStream, RotateValueOutput)
from qcompile.passes.quantize_kv_cache import _scales
from qcompile.runtime import Decoder
from tests.conftest import prompt_and_step

R = analysis.Role
WINDOWS = np.random.default_rng(0).integers(0, 256, size=(4, 32))


def _quantized(path, bits, rotate=False) -> ir.Model:
    model = ir.load(path)
    if rotate:
        for p in [FuseNormGains(), RotateResidualStream(), RotateValueOutput(), InsertOnlineHadamard((R.DOWN, R.O)),
                  InsertQueryKeyHadamard()]:
            p(model)
    kv = QuantizeKVCache(bits)
    Calibrate(WINDOWS, [kv])(model)
    assert kv(model).modified
    return model


def _save(model, path):
    ir.save(model, path, external_data=f"{path.name}.data")
    return path


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_cache_holds_values_quantized_with_calibrated_per_channel_scales(tiny_export, tmp_path, bits):
    _, path = tiny_export("llama")
    model = _quantized(path, bits)
    nodes = [n for n in model.graph if n.op_type == "QuantizeDequantizeStatic"]
    assert len(nodes) == 2 * 2  # keys and values, 2 layers
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 12))
    decoder, reference = Decoder(path), Decoder(_save(model, tmp_path / "model.onnx"))
    float_logits, float_cache = decoder.forward(ids, decoder.empty_cache(), 0)
    logits, cache = reference.forward(ids, reference.empty_cache(), 0)
    qmax = 2 ** (bits - 1) - 1
    # layer 0's keys and values are computed before any quantized cache is read: exactly the float ones, quantized
    # with a scale per (head, channel) of c · max |x| over the calibration windows / qmax, c in 0.5..1
    _, full = decoder.forward(WINDOWS, decoder.empty_cache(len(WINDOWS)), 0)
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        scale = model.graph.initializers[name.replace("past_key_values", "present") + ".kv_scale"].const_value.numpy()
        ratio = scale / (np.abs(full[name]).max(axis=(0, 2), keepdims=True) / qmax)
        assert ratio.shape == (1, 2, 1, 16) and (ratio > 0.5 - 1e-6).all() and (ratio < 1 + 1e-6).all()
        want = np.clip(np.round(float_cache[name] / scale), -qmax - 1, qmax) * scale
        np.testing.assert_allclose(cache[name], want, atol=1e-5)
    error = np.abs(logits - float_logits).max()
    assert 0 < error < (0.5 if bits == 4 else 0.05), error


@pytest.mark.parametrize("bits, dtype, width", [(8, np.int8, 1.0), (4, np.uint8, 0.5)])
@pytest.mark.parametrize("rotate", [False, True])
def test_ort_lowering_stores_the_cache_quantized_and_computes_the_reference(tiny_export, tmp_path, bits, dtype, width, rotate):
    """GroupQueryAttention's own cache: int8 (or uint8, two 4-bit values a byte) past/present tensors, the
    reference's logits for a prompt, a chunk and a step, and a quarter (an eighth) of the float cache's bytes."""
    _, path = tiny_export("llama")
    model = _quantized(path, bits, rotate)
    reference = _save(model, tmp_path / "reference.onnx")
    assert FuseGroupQueryAttention(max_positions=256)(model).modified
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert {n.attributes.get_int("kv_cache_bit_width") for n in gqa} == {bits}
    assert {n.attributes.get_int("do_rotary") for n in gqa} == {int(not rotate)}  # RoPE in GQA unless keys are rotated
    assert "QuantizeDequantizeStatic" not in [n.op_type for n in model.graph]
    lowered = _save(model, tmp_path / "lowered.onnx")
    ids = np.random.default_rng(4).integers(0, 256, size=(1, 14))
    (p1, s1, c1), (p0, s0, c0) = prompt_and_step(lowered, ids), prompt_and_step(reference, ids)
    np.testing.assert_allclose(p1, p0, atol=1e-4, rtol=0)
    np.testing.assert_allclose(s1, s0, atol=1e-4, rtol=0)
    for name in c0:
        assert c1[name].dtype == dtype and c1[name].shape[3] == c0[name].shape[3] * width
        assert c1[name].nbytes * (4 / width) == c0[name].nbytes  # a quarter (int8) or an eighth (int4) of fp32


def test_sequence_binds_a_quantized_cache_in_place_and_prefills_in_chunks(tiny_export, tmp_path):
    _, path = tiny_export("llama")
    model = _quantized(path, 8)
    FuseGroupQueryAttention(max_positions=256)(model)
    decoder = Decoder(_save(model, tmp_path / "lowered.onnx"))
    assert decoder.appends_in_place
    ids = np.random.default_rng(5).integers(0, 256, size=(1, 10))
    sequence = decoder.sequence(16)
    assert {b.dtype for b in sequence.buffers.values()} == {np.dtype(np.int8)}
    got = [sequence.prefill(ids[0, :8], chunk=3), sequence.step(ids[0, 8]), sequence.step(ids[0, 9])]  # chunks 3+3+2
    want, cache = decoder.forward(ids[:, :8], decoder.empty_cache(), 0)
    want = [want[0, -1]]
    for i in (8, 9):
        logits, cache = decoder.forward(ids[:, i:i + 1], cache, i)
        want.append(logits[0, -1])
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-5, rtol=0)


def test_kv_cache_quantization_needs_calibration(tiny_export):
    _, path = tiny_export("llama")
    with pytest.raises(errors.InputError, match="needs calibration"):
        QuantizeKVCache(8)(ir.load(path))


def test_keys_and_values_quantized_differently_are_left_unfused_with_the_reason(tiny_export):
    _, path = tiny_export("llama")
    model = _quantized(path, 8)
    value_quantizer = next(n for n in model.graph if n.op_type == "QuantizeDequantizeStatic" and "value" in n.name)
    value_quantizer.attributes["qmax"] = ir.AttrFloat32("qmax", 7.0)
    with pytest.raises(errors.UnsupportedModelError, match="not quantized alike"):
        FuseGroupQueryAttention(max_positions=256)(model)


def test_clip_search_lowers_the_error_of_heavy_tailed_channels():
    rows = np.random.default_rng(0).standard_normal((1024, 8)).astype(np.float32)
    rows[0] *= 20  # one outlier token
    stats = TapStats(np.abs(rows).max(axis=0), np.zeros(8), None, np.zeros(8), rows=[rows])
    top = np.abs(rows).max(axis=0) / 7
    scale = _scales(stats, 7)
    assert (scale < top).all()

    def error(s):
        return np.square(np.clip(np.rint(rows / s), -8, 7) * s - rows).sum()

    assert error(scale) < 0.5 * error(top)
