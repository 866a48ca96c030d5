"""Lanczos on flat parameter vectors, written against the Array API.

Two forms. :func:`top_eigenpairs` runs one Krylov sequence with full reorthogonalisation and
keeps its basis, for the top-k eigenpairs with their residuals. :func:`lanczos_block` runs K
independent sequences side by side without reorthogonalisation, keeping three vectors each
(memory O(K·P)), for stochastic Lanczos quadrature. The K sequences share every operator
product, so one pass over the data serves all of them. Vectors live in the namespace of the
operator's parameters; only the small tridiagonal matrices go to NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..core._compat import array_namespace
from ..estimators._estimate import _to_numpy

Array = Any

__all__ = ["Eigenpairs", "lanczos_block", "top_eigenpairs"]


@dataclass
class Eigenpairs:
    """The top-k eigenpairs of a symmetric operator, with their residuals.

    Attributes
    ----------
    values : ndarray (k,)
        Ritz values θ_i, descending (float64).
    vectors : array (k, P)
        Unit Ritz vectors y_i, in the operator's namespace.
    residuals : ndarray (k,)
        ‖A y_i − θ_i y_i‖, computed with one more product (not the Lanczos estimate). A
        symmetric A has an eigenvalue within residuals[i] of values[i].
    steps : int
        Lanczos steps taken (products with A, besides the residual check).
    """

    values: np.ndarray
    vectors: Array
    residuals: np.ndarray
    steps: int


def top_eigenpairs(matmat: Callable[[Array], Array], v0: Array, k: int = 1, *, max_steps: int = 100,
                   tol: float = 1e-6, check_every: int = 5) -> Eigenpairs:
    r"""Top-k eigenpairs of a symmetric psd operator by Lanczos with full reorthogonalisation.

    Parameters
    ----------
    matmat : callable
        ``matmat(V)`` = A vᵢ for the rows of ``V`` (K, P).
    v0 : array (P,)
        Starting vector (any nonzero; random to avoid missing an eigenvector).
    k : int
        Number of eigenpairs.
    max_steps : int
        Most Lanczos steps; fewer when the Krylov space is exhausted (β = 0) or converged.
    tol : float
        Stop when the Lanczos residual estimates β_m |s_{m,i}| of the top k Ritz pairs fall
        below ``tol · θ_1``.
    check_every : int
        Steps between convergence checks (each an m×m eigendecomposition on the host).

    Returns
    -------
    Eigenpairs

    Notes
    -----
    A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ. Each new vector is orthogonalised against the whole basis
    twice (classical Gram–Schmidt, "twice is enough"), so no ghost copies of converged
    eigenvalues appear. **Cost**: m + 1 products (the last checks the residuals of all k pairs
    in one batched product), O(m² P) arithmetic and m·P memory for the basis.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    xp = array_namespace(v0)
    P = v0.shape[0]
    max_steps = min(int(max_steps), P)
    if max_steps < k:
        raise ValueError(f"max_steps: expected at least k = {k} steps (and P = {P} >= k), got {max_steps}")
    q = v0 / xp.linalg.vector_norm(v0)
    basis = _Basis(q)
    alpha: list[float] = []
    beta: list[float] = []
    scale = 0.0
    for m in range(1, max_steps + 1):
        w = matmat(q[None, :])[0, :]
        a = float(_to_numpy(xp.sum(q * w)))
        alpha.append(a)
        for _ in range(2):  # full reorthogonalisation, twice
            w = basis.orthogonalise(w)
        b = float(_to_numpy(xp.linalg.vector_norm(w)))
        scale = max(scale, abs(a) + b)
        done = b <= 1e-12 * max(scale, 1e-300) or m == max_steps
        if m >= k and (done or m % check_every == 0):
            theta, S = np.linalg.eigh(_tridiagonal(alpha, beta))
            est = b * np.abs(S[-1, ::-1][:k])
            if done or np.all(est <= tol * max(theta[-1], 1e-300)):
                break
        beta.append(b)
        q = w / b
        basis.append(q)
    theta, S = np.linalg.eigh(_tridiagonal(alpha, beta))
    theta, S = theta[::-1][:k].copy(), S[:, ::-1][:, :k].copy()
    Y = basis.combine(S)
    Y = Y / xp.linalg.vector_norm(Y, axis=1, keepdims=True)
    AY = matmat(Y)
    theta_t = xp.asarray(theta, dtype=Y.dtype, device=_device(Y))
    res = np.asarray(_to_numpy(xp.linalg.vector_norm(AY - theta_t[:, None] * Y, axis=1)), dtype=np.float64)
    return Eigenpairs(np.asarray(theta, dtype=np.float64), Y, res, len(alpha))


def lanczos_block(matmat: Callable[[Array], Array], V0: Array, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""K independent Lanczos sequences side by side, without reorthogonalisation.

    Parameters
    ----------
    matmat : callable
        ``matmat(V)`` = A vᵢ for the rows of ``V`` (K, P).
    V0 : array (K, P)
        Starting vectors (normalised here).
    steps : int
        Steps m; a sequence whose β vanishes stops there (its Krylov space is exhausted).

    Returns
    -------
    alpha : ndarray (K, m)
    beta : ndarray (K, m)
        β_j after step j; beta[:, -1] closes the tridiagonal and is not part of T_m.
    length : ndarray (K,) of int
        Steps each sequence took before a breakdown (its T is the leading length × length block).

    Notes
    -----
    Memory: three (K, P) arrays. Without reorthogonalisation, rounding makes copies of
    converged Ritz values appear; the Gauss quadrature built from T_m (stochastic Lanczos
    quadrature) is known to stay accurate all the same (Golub & Meurant; Ubaru, Chen & Saad
    2017): it matches the moments vᵀ A^j v for j < 2m.
    """
    xp = array_namespace(V0)
    K = V0.shape[0]
    Q = V0 / xp.linalg.vector_norm(V0, axis=1, keepdims=True)
    Q_prev = xp.zeros_like(Q)
    b_prev = xp.zeros((K,), dtype=Q.dtype, device=_device(Q))
    alive = np.ones(K, dtype=bool)
    length = np.zeros(K, dtype=np.int64)
    alphas, betas = np.zeros((K, steps)), np.zeros((K, steps))
    scale = np.zeros(K)
    for j in range(steps):
        W = matmat(Q)
        a = xp.sum(Q * W, axis=1)
        W = W - a[:, None] * Q - b_prev[:, None] * Q_prev
        b = xp.linalg.vector_norm(W, axis=1)
        a_np = np.asarray(_to_numpy(a), dtype=np.float64)
        b_np = np.asarray(_to_numpy(b), dtype=np.float64)
        alphas[alive, j], betas[alive, j] = a_np[alive], b_np[alive]
        length[alive] += 1
        scale = np.maximum(scale, np.abs(a_np) + b_np)
        alive &= b_np > 1e-12 * np.maximum(scale, 1e-300)
        if not alive.any():
            break
        keep = xp.asarray(alive, device=_device(Q))
        safe = xp.where(keep, b, xp.ones_like(b))
        Q_prev, Q = Q, xp.where(keep[:, None], W / safe[:, None], xp.zeros_like(W))
        b_prev = xp.where(keep, b, xp.zeros_like(b))
    return alphas[:, :int(length.max())], betas[:, :int(length.max())], length


class _Basis:
    """The Lanczos vectors as rows of fixed-size blocks: array shapes repeat, so a lazy
    framework (JAX) compiles each operation once instead of once per step."""

    ROWS = 16

    def __init__(self, q):
        self.xp = array_namespace(q)
        self.dev = _device(q)
        self.blocks: list = []
        self.n = 0
        self.append(q)

    def append(self, q):
        xp, r = self.xp, self.n % self.ROWS
        if r == 0:
            self.blocks.append(xp.zeros((self.ROWS, q.shape[0]), dtype=q.dtype, device=self.dev))
        onehot = xp.asarray(np.eye(self.ROWS)[r], dtype=q.dtype, device=self.dev)
        self.blocks[-1] = self.blocks[-1] + onehot[:, None] * q[None, :]
        self.n += 1

    def orthogonalise(self, w):
        xp = self.xp
        for blk in self.blocks:
            w = w - xp.matmul(xp.matmul(blk, w), blk)
        return w

    def combine(self, S: np.ndarray):
        """Sᵀ Q for S (m, k), m <= the number of vectors: the rows Σ_j S_ji q_j."""
        xp = self.xp
        m, k = S.shape
        pad = np.zeros((len(self.blocks) * self.ROWS, k))
        pad[:m] = S
        out = None
        for i, blk in enumerate(self.blocks):
            c = xp.asarray(np.ascontiguousarray(pad[i * self.ROWS:(i + 1) * self.ROWS].T), dtype=blk.dtype,
                           device=self.dev)
            out = xp.matmul(c, blk) if out is None else out + xp.matmul(c, blk)
        return out


def _tridiagonal(alpha, beta) -> np.ndarray:
    m = len(alpha)
    T = np.diag(np.asarray(alpha, dtype=np.float64))
    if m > 1:
        off = np.asarray(beta[:m - 1], dtype=np.float64)
        T += np.diag(off, 1) + np.diag(off, -1)
    return T


def tridiagonal(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """T_m from the diagonal ``alpha`` (m,) and the off-diagonal ``beta`` (at least m − 1)."""
    return _tridiagonal(alpha, beta)


def _device(x):
    from ..core._compat import device

    return device(x)
