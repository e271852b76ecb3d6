import numpy as np
import pytest

from qcompile.algorithms import rtn
from qcompile.algorithms.rtn import quantize_rtn


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_extreme_maps_to_lowest_code(bits):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 16)).astype(np.float32)
    qw = quantize_rtn(w, bits, 128, symmetric=True)
    half = 2 ** (bits - 1)
    assert qw.q.min() >= -half and qw.q.max() <= half - 1
    # The largest-magnitude value of every block is represented exactly, as -2^(b-1) * scale.
    blocks = w.reshape(2, 128, 16)
    extreme_idx = np.abs(blocks).argmax(axis=1)
    q_blocks = qw.q.reshape(2, 128, 16)
    assert np.all(np.take_along_axis(q_blocks, extreme_idx[:, None], axis=1) == -half)
    np.testing.assert_array_equal(np.take_along_axis(blocks, extreme_idx[:, None], axis=1)[:, 0],
                                  -half * qw.scale)


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_scales_are_positive_and_fit_the_block_exactly(bits):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 16)).astype(np.float32)
    qw = quantize_rtn(w, bits, 128, symmetric=True, positive=True)
    half = 2 ** (bits - 1)
    assert np.all(qw.scale > 0)  # TensorRT rejects non-positive scales
    assert qw.q.min() >= -half and qw.q.max() <= half - 1
    # The tighter end of each block is represented exactly: max at (2^(b-1)-1)·s or min at -2^(b-1)·s.
    blocks = w.reshape(2, 128, 16)
    top, bottom = blocks.max(axis=1), blocks.min(axis=1)
    exact = np.isclose(top, (half - 1) * qw.scale, rtol=1e-6) | np.isclose(bottom, -half * qw.scale, rtol=1e-6)
    assert exact.all()
    # and the other end fits without clipping
    assert np.all(top <= (half - 1) * qw.scale * (1 + 1e-6)) and np.all(bottom >= -half * qw.scale * (1 + 1e-6))


@pytest.mark.parametrize("symmetric,positive", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64)])
def test_error_is_within_half_a_step(bits, group, symmetric, positive):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(576, 24)).astype(np.float32)  # 576 is not a multiple of 128: a short last block
    qw = quantize_rtn(w, bits, group, symmetric, positive=positive)
    assert qw.scale.shape == (-(-576 // group), 24)
    step = np.abs(np.repeat(qw.scale, group, axis=0)[:576])
    err = np.abs(qw.dequantize() - w)
    # Rounding error is at most half a step, except with signed scales the side opposite the extreme
    # (clipped at 2^(b-1)-1 steps: at most one step).
    bound = step * (1.0 if symmetric and not positive else 0.5) + 1e-6
    assert np.all(err <= bound)
    # And RTN is a real approximation: SNR well above what the bit width allows at worst.
    snr_db = 10 * np.log10((w**2).sum() / ((qw.dequantize() - w) ** 2).sum())
    assert snr_db > (15 if bits == 4 else 35)


def test_asymmetric_zero_is_exact_and_codes_unsigned():
    w = np.abs(np.random.default_rng(2).normal(size=(64, 8))).astype(np.float32)
    w[3] = 0.0
    qw = quantize_rtn(w, 4, 32, symmetric=False)
    assert qw.q.dtype == np.uint8 and qw.q.max() <= 15 and qw.zero_point.max() <= 15
    np.testing.assert_array_equal(qw.dequantize()[3], 0.0)


def test_all_zero_block_has_nonzero_scale():
    qw = quantize_rtn(np.zeros((32, 4), np.float32), 4, 32, True)
    assert np.all(qw.scale != 0) and np.all(qw.dequantize() == 0)


def test_matches_onnxruntime_matmul_nbits_quantizer():
    """Same algorithm as ORT's MatMulNBitsQuantizer RTN: the same integers and scales."""
    pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from qcompile.targets.ort import decode_matmul_nbits, pack_matmul_nbits

    def unpack_matmul_nbits(b, scales, zero_points, k, bits, block):  # (q - zp) * scale, the runtime's formula
        q, scale, zp = decode_matmul_nbits(b, scales, zero_points, k, bits, block)
        w = q.astype(np.float32) - (0 if zp is None else np.repeat(zp, block, axis=0)[:k])
        return w * np.repeat(scale, block, axis=0)[:k]

    rng = np.random.default_rng(3)
    k, n = 576, 64
    w = rng.normal(size=(k, n)).astype(np.float32)
    for symmetric in (True, False):
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])],
            [onnx.numpy_helper.from_array(w, "w")],
        )
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
        quantizer = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
            block_size=128, is_symmetric=symmetric, bits=4))
        quantizer.process()
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
        ort_b = next(v for name, v in inits.items() if v.dtype == np.uint8 and v.ndim == 3)
        ort_scales = next(v for v in inits.values() if v.dtype == np.float32).reshape(n, -1)
        ort_zp = next((v for name, v in inits.items() if v.dtype == np.uint8 and v.ndim < 3), None)
        qw = quantize_rtn(w, 4, 128, symmetric)
        b, scales, zp = pack_matmul_nbits(qw.q, qw.scale, qw.zero_point, 4, 128)
        np.testing.assert_allclose(scales, ort_scales, rtol=1e-6)
        ours = unpack_matmul_nbits(b, scales, zp, k, 4, 128)
        theirs = unpack_matmul_nbits(ort_b, ort_scales, ort_zp.reshape(n, -1) if ort_zp is not None else None, k, 4, 128)
        # the same weights except at exact rounding ties, which random data essentially never hits
        assert (ours == theirs).mean() > 0.999


@pytest.mark.parametrize("symmetric, positive", [(True, False), (True, True), (False, False)])
def test_big_weights_quantized_in_column_slices_give_the_same_codes(monkeypatch, symmetric, positive):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 300)).astype(np.float32)
    clip = rng.uniform(0.8, 1.0, (2, 300)).astype(np.float32)
    whole = rtn.quantize_rtn(w, 4, 128, symmetric, clip, positive)
    monkeypatch.setattr(rtn, "CHUNK", 256 * 7)  # 43 slices of 7 columns
    sliced = rtn.quantize_rtn(w, 4, 128, symmetric, clip, positive)
    np.testing.assert_array_equal(sliced.q, whole.q)
    np.testing.assert_array_equal(sliced.scale, whole.scale)
    assert (sliced.zero_point is None) == symmetric
    if not symmetric:
        np.testing.assert_array_equal(sliced.zero_point, whole.zero_point)
