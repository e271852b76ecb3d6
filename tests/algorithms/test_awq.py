import numpy as np
import pytest

from qcompile.algorithms.awq import output_error, search_clip, search_scales
from qcompile.algorithms.rtn import quantize_rtn


def _inputs(k=256, tokens=4096, seed=0):
    """Activations where a few channels are large (as in LLMs), and their Hessian and mean |x|."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, k)).astype(np.float32)
    x[:, rng.choice(k, 8, replace=False)] *= 20
    return x, (x.T.astype(np.float64) @ x), np.abs(x).mean(axis=0)


def test_output_error_is_the_layer_error():
    x, h, _ = _inputs(k=64, tokens=500)
    rng = np.random.default_rng(1)
    w, w_hat = rng.normal(size=(64, 8)), rng.normal(size=(64, 8))
    np.testing.assert_allclose(output_error(w, w_hat, h), ((x @ w - x @ w_hat) ** 2).sum(), rtol=1e-4)


def test_scale_search_protects_salient_channels():
    x, h, absmean = _inputs()
    rng = np.random.default_rng(2)
    weights = [rng.normal(size=(256, 64)).astype(np.float32) for _ in range(2)]
    s, alpha = search_scales(weights, [h, h], absmean, 4, 128, True)
    assert alpha > 0 and s.shape == (256,)
    rtn = sum(output_error(w, quantize_rtn(w, 4, 128, True).dequantize(), h) for w in weights)
    awq = sum(output_error(w, quantize_rtn(w * s[:, None], 4, 128, True).dequantize() / s[:, None], h) for w in weights)
    assert awq < 0.8 * rtn


def test_clip_search_never_worse_than_rtn():
    _, h, _ = _inputs(k=200)
    w = np.random.default_rng(3).standard_t(df=4, size=(200, 32)).astype(np.float32)  # heavy tails
    for symmetric in (True, False):
        clipped = search_clip(w, h, 4, 64, symmetric)
        assert output_error(w, clipped.dequantize(), h) < output_error(w, quantize_rtn(w, 4, 64, symmetric).dequantize(), h)


def test_output_error_of_a_slightly_indefinite_hessian():
    """A singular H (fewer tokens than channels) that float32 accumulation left slightly indefinite along its
    null space (smallest eigenvalue -2e-6 of the mean diagonal, beyond the first ridge): the factor's ridge
    grows until LAPACK accepts it, and the error stays tr(ΔWᵀ·H·ΔW)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 64))  # rank 40 < 64
    h = x.T @ x
    null = np.linalg.svd(x)[2][-1]  # x · null = 0
    h -= 2e-6 * np.trace(h) / 64 * np.outer(null, null)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w_hat = quantize_rtn(w, 4, 32).dequantize()
    d = (w - w_hat).astype(np.float64)
    assert output_error(w, w_hat, h) == pytest.approx(float(np.sum(d * (h @ d))), rel=1e-3)
