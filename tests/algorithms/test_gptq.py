import numpy as np
import pytest

from qcompile.algorithms import gptq
from qcompile.algorithms.gptq import group_params, inverse_hessian_factor, quantize_gptq
from qcompile.algorithms.rtn import block_params, dequantize_values, quantize_rtn, quantize_values


def _layer(k=256, n=64, tokens=2048, seed=0):
    """Correlated inputs with a few outlier channels (as in LLMs) and a random weight."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, k)) @ rng.normal(size=(k, k)) / np.sqrt(k)
    x[:, rng.choice(k, 4, replace=False)] *= 8
    w = rng.normal(size=(k, n)).astype(np.float32) * 0.05
    return x.astype(np.float32), w


def _output_error(x, w, qw):
    return float(((x @ w - x @ qw.dequantize()) ** 2).sum())


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    x, _ = _layer(k=96, tokens=512)
    h = x.T.astype(np.float64) @ x
    h[:, 5] = h[5, :] = 0  # a dead channel
    upper, dead = inverse_hessian_factor(h, damp=0.01)
    damped = h.copy()
    damped[5, 5] = 1.0
    damped[np.diag_indices_from(damped)] += 0.01 * np.mean(np.diag(damped))
    assert dead.tolist() == [i == 5 for i in range(96)]
    assert np.array_equal(upper, np.triu(upper)) and (np.diag(upper) > 0).all()
    np.testing.assert_allclose(upper.T @ upper, np.linalg.inv(damped), rtol=0, atol=1e-9 * np.abs(np.linalg.inv(damped)).max())
    np.testing.assert_allclose(upper, np.linalg.cholesky(np.linalg.inv(damped)).T, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [32, 128])
def test_gptq_output_error_below_rtn(symmetric, act_order, group):
    x, w = _layer()
    h = x.T.astype(np.float64) @ x
    gptq = quantize_gptq(w, h, 4, group, symmetric, act_order=act_order)
    rtn = quantize_rtn(w, 4, group, symmetric)
    assert gptq.q.shape == rtn.q.shape and gptq.scale.shape == rtn.scale.shape
    assert _output_error(x, w, gptq) < 0.8 * _output_error(x, w, rtn)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_two_bit_groups_clip_their_range_and_lose_less(symmetric, act_order, monkeypatch):
    x, w = _layer()
    h = x.T.astype(np.float64) @ x
    clipped = quantize_gptq(w, h, 2, 64, symmetric, act_order=act_order)
    monkeypatch.setattr(gptq, "CLIP_RATIOS", np.array([1.0]))  # min-max ranges
    full = quantize_gptq(w, h, 2, 64, symmetric, act_order=act_order)
    assert _output_error(x, w, clipped) < 0.9 * _output_error(x, w, full)


def test_group_params_take_each_columns_least_error_ratio_up_to_four_bits():
    rows = np.random.default_rng(3).normal(size=(64, 8)).astype(np.float32)  # a group's tails: rare extremes
    for symmetric in (True, False):
        scale, zero = group_params(rows, 2, symmetric)

        def error(s, z, bits=2):
            return np.square(rows - dequantize_values(quantize_values(rows, s, z, bits), s, z)).sum(0)

        chosen = error(scale, zero)
        for ratio in gptq.CLIP_RATIOS:
            assert (chosen <= error(*block_params(rows, 2, symmetric, ratio)) + 1e-6).all()
        assert chosen.sum() < 0.9 * error(*block_params(rows, 2, symmetric)).sum()
        four = group_params(rows, 4, symmetric)
        assert error(*four, 4).sum() < error(*block_params(rows, 4, symmetric), 4).sum()  # clipped at 4 bits too
        eight = group_params(rows, 8, symmetric)
        np.testing.assert_array_equal(eight[0], block_params(rows, 8, symmetric)[0])  # min-max above


def test_lazy_block_updates_equal_eager_updates():
    x, w = _layer(k=192, n=16)
    h = x.T.astype(np.float64) @ x
    eager = quantize_gptq(w, h, 4, 32, True, block_size=32)
    lazy = quantize_gptq(w, h, 4, 32, True, block_size=128)
    assert (eager.q == lazy.q).mean() > 0.999  # identical up to float rounding at exact ties
    np.testing.assert_allclose(eager.scale, lazy.scale, rtol=1e-5)


def test_equals_the_textbook_row_by_row_algorithm():
    # each row quantized in turn, its error moved onto every later row at once: no lazy blocks, no BLAS
    x, w = _layer(k=160, n=24)
    h = x.T.astype(np.float64) @ x
    upper, _ = inverse_hessian_factor(h)
    work = w.astype(np.float64)
    codes = np.empty(w.shape, np.int8)
    for row in range(len(work)):
        if row % 32 == 0:
            scale, _ = group_params(work[row: row + 32].astype(np.float32), 4, True)
        codes[row] = quantize_values(work[row], scale, None, 4)
        err = (work[row] - dequantize_values(codes[row], scale, None)) / upper[row, row]
        work[row + 1:] -= np.outer(upper[row, row + 1:], err)
    got = quantize_gptq(w, h, 4, 32, True, block_size=64)
    assert (got.q == codes).mean() > 0.999  # identical up to float rounding at exact ties


def test_identity_hessian_is_rtn():
    """With uncorrelated unit inputs GPTQ has nothing to compensate: it reduces to RTN (at 8 bits, where both
    take min-max ranges)."""
    _, w = _layer(k=128, n=32)
    qw = quantize_gptq(w, np.eye(128), 8, 32, True, damp=0.0)
    np.testing.assert_array_equal(qw.q, quantize_rtn(w, 8, 32, True).q)


def test_dead_channels_and_short_last_group():
    x, w = _layer(k=200, n=8)
    x[:, 5] = 0.0
    h = x.T.astype(np.float64) @ x
    qw = quantize_gptq(w, h, 4, 64, False)
    assert qw.scale.shape == (4, 8) and np.isfinite(qw.dequantize()).all()
