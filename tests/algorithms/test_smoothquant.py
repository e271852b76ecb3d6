import ml_dtypes
import numpy as np

from qcompile.algorithms.rtn import quantize_fp8, quantize_rtn
from qcompile.algorithms.smoothquant import (fake_quantize, group_error, quantize_per_token, search_alpha,
                                              smoothing_scales, static_scale)
from qcompile.schemes import ActivationKind as A


def _outlier_layer(seed=0, k=64, n=32, rows=256):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    x[:, [3, 17]] *= 60.0  # two outlier channels, as in LLM activations
    return x, rng.normal(size=(k, n)).astype(np.float32) * 0.05


def test_scales_follow_the_formula_and_balance_ranges():
    a, w = np.array([100.0, 1.0, 0.0, 4.0]), np.array([0.01, 1.0, 1.0, 0.0])
    s = smoothing_scales(a, w, 0.5)
    np.testing.assert_allclose(s[:2], [np.sqrt(100 / 0.01), 1.0], rtol=1e-6)
    assert s[2] == s[3] == 1.0  # a dead activation or weight channel is left alone
    # α = 0.5 equalises each channel's activation and weight ranges
    np.testing.assert_allclose((a / s)[:2], (w * s)[:2], rtol=1e-6)


def test_fake_quantizers_match_their_definitions():
    x = np.array([[-3.0, 0.26, 1.0, 250.0]], np.float32)
    scale = static_scale(2.0, A.INT8_STATIC)
    assert scale == 2.0 / 127
    q = fake_quantize(x, A.INT8_STATIC, scale)
    np.testing.assert_allclose(q, np.array([[-128, 17, 64, 127]]) * np.float32(scale), rtol=1e-6)  # saturates both ends
    f = fake_quantize(x, A.FP8_STATIC, static_scale(250.0, A.FP8_STATIC))
    assert f[0, 3] == np.float32(250.0) and np.all(np.abs(f - x) <= np.abs(x) / 8)  # E4M3: 3 mantissa bits
    rows = np.array([[1.0, -0.5, 0.25], [100.0, 1.0, -2.0]], np.float32)
    d = quantize_per_token(rows, 127.0)
    np.testing.assert_allclose(d[0], np.rint(rows[0] * 127) / 127, rtol=1e-6)  # each row its own scale
    assert d[1, 0] == 100.0 and d[1, 1] == np.float32(np.rint(127 / 100) * 100 / 127)
    assert np.array_equal(fake_quantize(rows, A.INT8_DYNAMIC), d)


def test_smoothing_cuts_static_int8_error_on_outlier_channels():
    x, w = _outlier_layer()
    absmax = np.abs(x).max(axis=0)
    int8 = lambda m: quantize_rtn(m, 8, 0, True, positive=True).dequantize()  # noqa: E731
    plain = group_error(x, absmax, [w], np.ones(64, np.float32), A.INT8_STATIC, int8)
    alpha, s = search_alpha(x, absmax, [w], A.INT8_STATIC, int8)
    smoothed = group_error(x, absmax, [w], s, A.INT8_STATIC, int8)
    assert alpha > 0 and smoothed < plain / 4, (alpha, plain, smoothed)
    # the search's choice is the grid's best: no α on the grid does better
    wmax = np.abs(w).max(axis=1)
    for a in np.linspace(0, 1, 11):
        assert smoothed <= group_error(x, absmax, [w], smoothing_scales(absmax, wmax, a), A.INT8_STATIC, int8) + 1e-9


def test_fp8_weights_are_per_channel_e4m3():
    w = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    qw = quantize_fp8(w)
    assert qw.q.dtype == ml_dtypes.float8_e4m3fn and qw.scale.shape == (1, 6) and qw.group_size == 0
    np.testing.assert_allclose(np.abs(qw.q.astype(np.float32)).max(axis=0), 448.0)  # each column's max hits 448
    assert np.all(np.abs(qw.dequantize() - w) <= np.abs(w) / 16 + qw.scale * 2**-9)  # round to nearest E4M3
