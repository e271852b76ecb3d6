"""QuantizeKVCache (the reference: static per-channel fake quantization) and its lowering to
GroupQueryAttention's own int8 / packed-int4 cache."""

import numpy as np
import onnx_ir as ir
import pytest

from qcompile import analysis, calibration, custom_ops, errors
from qcompile.calibration import TapStats
from qcompile.passes import (Calibrate, FuseGroupQueryAttention, FuseNormGains, InsertOnlineHadamard,
                             InsertQueryKeyHadamard, QuantizeKVCache, RotateResidualStream, RotateValueOutput)
from qcompile.passes.quantize_kv_cache import _scales, key_transform
from qcompile.runtime import Decoder
from tests.conftest import prompt_and_step

R = analysis.Role
WINDOWS = np.random.default_rng(0).integers(0, 256, size=(4, 32))


def _quantized(path, bits, rotate=False, center=None) -> ir.Model:
    model = ir.load(path)
    if rotate:
        for p in [FuseNormGains(), RotateResidualStream(), RotateValueOutput(), InsertOnlineHadamard((R.DOWN, R.O)),
                  InsertQueryKeyHadamard()]:
            p(model)
    kv = QuantizeKVCache(bits, center_values=rotate if center is None else center)  # as the pipeline, unless told
    Calibrate(WINDOWS, [kv])(model)
    assert kv(model).modified
    return model


def _save(model, path):
    ir.save(model, path, external_data=f"{path.name}.data")
    return path


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_cache_holds_values_quantized_with_calibrated_per_channel_scales(tiny_export, tmp_path, bits):
    _, path = tiny_export("llama")
    model = _quantized(path, bits, center=True)
    nodes = [n for n in model.graph if n.op_type == "QuantizeDequantizeStatic"]
    assert len(nodes) == 2 * 2  # keys and values, 2 layers
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 12))
    decoder, reference = Decoder(path), Decoder(_save(model, tmp_path / "model.onnx"))
    float_logits, float_cache = decoder.forward(ids, decoder.empty_cache(), 0)
    logits, cache = reference.forward(ids, reference.empty_cache(), 0)
    qmax = 2 ** (bits - 1) - 1
    # layer 0's keys and values are computed before any quantized cache is read: exactly the float ones, quantized
    # with a scale per (head, channel) of c · max |x| over the calibration windows / qmax, c in 0.5..1; for the keys
    # (after RoPE), |x| of each rotate-half pair's channels is the pair's magnitude; 4-bit values are cached
    # centered on their first position's mean over the windows, x − μ
    _, full = decoder.forward(WINDOWS, decoder.empty_cache(len(WINDOWS)), 0)
    for name in (["past_key_values.0.key"] if bits == 8 else []) + ["past_key_values.0.value"]:  # 4-bit keys: transformed
        present = name.replace("past_key_values", "present")
        initializer = lambda suffix: model.graph.initializers[present + suffix].const_value.numpy()  # noqa: E731
        scale, mean = initializer(".kv_scale"), initializer(".mean") if bits == 4 else 0
        if bits == 4:
            np.testing.assert_allclose(mean, full[name][:, :, :1].mean(axis=0, keepdims=True), atol=1e-6)
        x = full[name] - mean
        magnitude = calibration.rope_envelope(x, 16, 16) if name.endswith("key") else np.abs(x)
        ratio = scale / (magnitude.max(axis=(0, 2), keepdims=True) / qmax)
        assert ratio.shape == (1, 2, 1, 16) and (ratio > 0.5 - 1e-6).all() and (ratio < 1 + 1e-6).all()
        want = np.clip(np.round((float_cache[name] - mean) / scale), -qmax - 1, qmax) * scale
        np.testing.assert_allclose(cache[name], want, atol=1e-5)
    error = np.abs(logits - float_logits).max()
    assert 0 < error < (0.5 if bits == 4 else 0.05), error


def test_key_scales_hold_at_every_position_of_the_context(tiny_export):
    """A RoPE pair's magnitude is the same at every position, so the 8-bit key scales (from it) are equal within each
    pair and cover the keys of a window fed at the end of the context, which calibration never ran there."""
    _, path = tiny_export("llama")
    model = ir.load(path)
    kv = QuantizeKVCache(8, context=2048)
    Calibrate(WINDOWS, [kv])(model)
    kv(model)
    scale = model.graph.initializers["present.0.key.kv_scale"].const_value.numpy()[0, :, 0]  # [heads, 16]
    np.testing.assert_array_equal(scale[:, :8], scale[:, 8:])
    decoder = Decoder(path)
    feeds = decoder.feeds(WINDOWS, decoder.empty_cache(len(WINDOWS)), 0)
    feeds["position_ids"] = feeds["position_ids"] + 2048 - WINDOWS.shape[1]
    keys = decoder.session.run(["present.0.key"], feeds)[0]  # [windows, heads, seq, 16]
    assert (np.abs(keys).max(axis=(0, 2)) <= 127 * scale * (1 + 1e-5)).all()


def test_position_dependent_taps_see_shifted_windows_without_their_first_position():
    offsets = calibration.shifts(np.zeros((6, 32), np.int64), 1000)
    assert (offsets[::2] == 0).all() and (offsets[1::2] > 0).all() and (offsets <= 1000 - 32).all()
    np.testing.assert_array_equal(offsets, calibration.shifts(np.zeros((6, 32), np.int64), 1000))  # seeded
    assert not calibration.shifts(np.zeros((6, 32), np.int64), 32).any()  # a context no longer than a window
    x = np.random.default_rng(0).standard_normal((5, 2 * 8))
    magnitude = calibration.rope_envelope(x, 8, 4)  # two heads of 8 channels, the first 4 rotated: pairs (0, 2), (1, 3)
    np.testing.assert_allclose(magnitude[:, [0, 2, 8, 10]], np.hypot(x[:, [0, 0, 8, 8]], x[:, [2, 2, 10, 10]]))
    np.testing.assert_allclose(magnitude[:, [4, 5, 12]], np.abs(x[:, [4, 5, 12]]))


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
    # RoPE in GQA unless the keys are rotated or (4 bits) transformed after it
    assert {n.attributes.get_int("do_rotary") for n in gqa} == {int(not rotate and bits == 8)}
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


def _without_quantizers(model: ir.Model) -> ir.Model:
    """The model with every cache quantizer bypassed: what remains of the pass is its key transform."""
    for node in [n for n in model.graph if n.op_type == custom_ops.STATIC]:
        node.outputs[0].replace_all_uses_with(node.inputs[0])
        model.graph.remove(node, safe=True)
    return model


@pytest.mark.parametrize("rotate", [False, True])
def test_4bit_key_transform_and_value_center_leave_float_attention_unchanged(tiny_export, tmp_path, rotate):
    """k·A − μ cached, q·A⁻ᵀ read; v − ν cached, ν added back to the attention output: the same logits for a
    prompt, a chunk and a cached step (float, no quantizer)."""
    _, path = tiny_export("llama")
    model = _quantized(path, 4, rotate, center=True)
    names = [n.name for n in model.graph]
    assert sum(n.endswith(".transform") for n in names) == sum(n.endswith(".uncenter") for n in names) == 2
    assert sum(n.endswith(".center") for n in names) == 2 * 2  # keys and values
    assert model.graph.initializers["present.1.value.mean"].const_value.numpy().any()
    transformed = _save(_without_quantizers(model), tmp_path / "transformed.onnx")
    ids = np.random.default_rng(6).integers(0, 256, size=(1, 14))
    (p1, s1, _), (p0, s0, _) = prompt_and_step(transformed, ids), prompt_and_step(path, ids)
    np.testing.assert_allclose(p1, p0, atol=1e-4, rtol=0)
    np.testing.assert_allclose(s1, s0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["key", "value"])
def test_4bit_cache_holds_the_first_position_exactly(tiny_export, kind):
    """Calibrated on windows that all start with one token, the key and the value cached at position 0 of a prompt
    starting with it lie on the grid (the attention sink's), while later ones carry rounding error. Layer 0: later
    layers' first keys and values read the quantized values of the layers before, which calibration (on the float
    model) does not see."""
    _, path = tiny_export("llama")
    model = ir.load(path)
    windows = WINDOWS.copy()
    windows[:, 0] = 7
    kv = QuantizeKVCache(4, center_values=True)
    Calibrate(windows, [kv])(model)
    kv(model)
    quantizer = next(n for n in model.graph if n.op_type == custom_ops.STATIC and n.name.startswith(f"present.0.{kind}"))
    ids = np.concatenate([[7], np.random.default_rng(7).integers(0, 256, size=11)])[None]
    with calibration.tapped_session(model, [quantizer.inputs[0], quantizer.outputs[0]]) as decoder:
        before, after = next(calibration._runs(decoder, [quantizer.inputs[0].name, quantizer.outputs[0].name], ids, None)).values()
    error = np.abs(after - before)[0]  # [kv_heads, positions, head_dim]
    assert error[:, 0].max() < 1e-5 < error[:, 1:].mean()


def test_key_transform_equalises_and_lowers_the_score_error_proxy():
    """diag(Aᵀ·S_k·A) and diag(A⁻¹·S_q·A⁻ᵀ) are both flat at Σ√m / d, below the Hadamard's Σ_c Q_c·K_c."""
    rng = np.random.default_rng(0)
    d = 16
    keys = rng.standard_normal((4096, d)) @ (rng.standard_normal((d, d)) * np.logspace(0, 1.5, d)) + 3.0
    queries = rng.standard_normal((4096, d)) @ (rng.standard_normal((d, d)) * np.logspace(1, 0, d))
    a = key_transform(queries, keys, centered=True)
    s_k, s_q = np.cov(keys, rowvar=False, bias=True), queries.T @ queries / len(queries)
    k_diag, q_diag = np.diag(a.T @ s_k @ a), np.diag(np.linalg.inv(a) @ s_q @ np.linalg.inv(a).T)
    np.testing.assert_allclose(k_diag, k_diag.mean(), rtol=0.02)
    np.testing.assert_allclose(q_diag, k_diag.mean(), rtol=0.02)
    hadamard = np.diag(s_k).mean() * np.diag(s_q).mean() * d  # a Hadamard flattens both diagonals to their means
    assert (k_diag * q_diag).sum() < 0.5 * hadamard
