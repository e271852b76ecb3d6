"""Hadamard matrices for QuaRot's rotations, in Kronecker-factored form.

A Hadamard matrix H_n has ±1 entries and H·Hᵀ = n·I, so H/√n is orthogonal. Orders used here are
n = K·2^m with H_n = H_K ⊗ H_{2^m}: H_{2^m} by Sylvester's doubling, H_K by Paley's constructions
(K = q+1 for a prime q ≡ 3 mod 4, e.g. 12; K = 2(q+1) for a prime q ≡ 1 mod 4, e.g. 36) or K = 1.

Row-vector convention (y = x·W): with x reshaped to X [K, 2^m] (index i = p·2^m + r),
x·(A ⊗ B) = vec(Aᵀ·X·B). The online op (`custom_ops.HADAMARD`) computes exactly that, so the matrices a
graph stores and the dense matrix folded offline (`kron(A, B)`) are the same transform.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(j − i) with χ the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if x in squares else -1 for x in range(1, q)])
    i = np.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def _paley1(q: int) -> np.ndarray:
    """Order q+1, q ≡ 3 mod 4: H = I + S with S the skew conference matrix [[0, 1ᵀ], [−1, Q]]."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2(q+1), q ≡ 1 mod 4: the symmetric conference matrix C with each 0 → [[1, −1], [−1, −1]] and
    each ±1 → ±[[1, 1], [1, −1]]."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero = np.array([[1, -1], [-1, -1]])
    one = np.array([[1, 1], [1, -1]])
    return np.kron(c, one) + np.kron(np.eye(q + 1, dtype=np.int64), zero)


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _small_hadamard(k: int) -> np.ndarray | None:
    """A ±1 Hadamard matrix of order k (k = 1, 2, or a Paley order), or None."""
    if k in (1, 2):
        return _sylvester(k)
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return _paley1(k - 1)
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return _paley2(k // 2 - 1)
    return None


@dataclasses.dataclass(frozen=True)
class KroneckerHadamard:
    """The orthogonal H = A ⊗ B (A = H_K/√K, B = H_{2^m}/√2^m): x·H = vec(Aᵀ·X·B), X = x as [K, 2^m]."""

    a: np.ndarray  # [K, K], float64
    b: np.ndarray  # [2^m, 2^m], float64

    @property
    def size(self) -> int:
        return self.a.shape[0] * self.b.shape[0]

    def dense(self) -> np.ndarray:
        return np.kron(self.a, self.b)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x·H over the last axis (the numpy reference of the online op)."""
        k, m = self.a.shape[0], self.b.shape[0]
        y = self.a.T @ x.reshape(-1, k, m) @ self.b
        return y.reshape(x.shape)


def kronecker_hadamard(n: int) -> KroneckerHadamard | None:
    """H_n = H_K ⊗ H_{2^m} with the largest power of two 2^m, normalised; None if no H_K is known."""
    m = n & -n  # the largest power of two dividing n
    while m >= 1:
        small = _small_hadamard(n // m)
        if small is not None:
            return KroneckerHadamard(small / np.sqrt(n // m), _sylvester(m) / np.sqrt(m))
        m //= 2
    return None


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """QuaRot's residual rotation: diag(random ±1)·H_n (orthogonal, float64); a Haar-random orthogonal
    matrix where no Hadamard of order n is known."""
    rng = np.random.default_rng(seed)
    h = kronecker_hadamard(n)
    if h is not None:
        return rng.choice([-1.0, 1.0], size=n)[:, None] * h.dense()
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]
