import numpy as np
import pytest

from qcompile.algorithms.hadamard import kronecker_hadamard, random_orthogonal


@pytest.mark.parametrize("n, k", [(64, 1), (12, 12), (36, 36), (576, 36), (1536, 12), (2048, 1), (5120, 20)])
def test_kronecker_hadamard_is_orthogonal_and_factored(n, k):
    h = kronecker_hadamard(n)
    assert h.size == n and h.a.shape == (k, k)
    dense = h.dense()
    np.testing.assert_allclose(dense @ dense.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(dense), 1 / np.sqrt(n), atol=1e-12)  # a Hadamard: equal-magnitude entries
    x = np.random.default_rng(0).standard_normal((3, 5, n))
    np.testing.assert_allclose(h.apply(x), x @ dense, atol=1e-10)  # the factored form is the same transform


def test_no_hadamard_for_orders_without_a_construction():
    assert kronecker_hadamard(7) is None
    assert kronecker_hadamard(6) is None  # no Hadamard of order 6 exists


@pytest.mark.parametrize("n", [64, 576, 7])
def test_random_orthogonal_is_seeded_and_orthogonal(n):
    q = random_orthogonal(n, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(q, random_orthogonal(n, seed=3))
    assert not np.array_equal(q, random_orthogonal(n, seed=4))
