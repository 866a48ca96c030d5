"""Lanczos on flat parameter vectors, written against the Array API.

Two forms. :func:`top_eigenpairs` runs one Krylov sequence (of a vector, or of a block of
vectors: repeated eigenvalues) with full reorthogonalisation and keeps its basis, for the top-k
eigenpairs with their residuals. :func:`lanczos_block` runs K
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
    r"""Top-k eigenpairs of a symmetric psd operator by (block) Lanczos with full reorthogonalisation.

    Parameters
    ----------
    matmat : callable
        ``matmat(V)`` = A vᵢ for the rows of ``V`` (K, P).
    v0 : array (P,) or (b, P)
        Starting vector, or a block of b starting vectors (any of full rank; random to avoid
        missing an eigenvector). A block of b finds up to b copies of a repeated eigenvalue;
        a single vector finds one copy of each (see Notes).
    k : int
        Number of eigenpairs.
    max_steps : int
        Most Lanczos steps (products with a block of b vectors); fewer when the Krylov space is
        exhausted (the new block vanishes), when it spans all P dimensions, or when converged.
    tol : float
        Stop when the Lanczos residual estimates ‖R_m s_{m,i}‖ of the top k Ritz pairs fall
        below ``tol · θ_1``.
    check_every : int
        Steps between convergence checks (each an eigendecomposition of the projected matrix
        on the host).

    Returns
    -------
    Eigenpairs

    Notes
    -----
    A Q_m = Q_m T_m + Q_{m+1} R_m E_mᵀ, with Q_m the basis of the block Krylov space
    span{V, A V, …, A^{m−1} V} and T_m = Q_mᵀ A Q_m, whose eigenpairs (θ, s) give the Ritz pairs
    (θ, Q_m s). Each new block is orthogonalised against the whole basis twice (classical
    Gram–Schmidt, "twice is enough"), so no ghost copies of converged eigenvalues appear, then
    orthonormalised by a QR factorisation, W = Qᵀ_{m+1} R_m.

    **Repeated eigenvalues**: a Krylov space grown from ONE vector holds, of each eigenspace,
    only the direction of the start vector's component in it: an eigenvalue of multiplicity r
    is found once, and the next Ritz values are the eigenvalues below it. A block of b ≥ r
    random vectors finds all r copies, so ask for a block of b ≥ k vectors when the top k
    eigenvalues may repeat (:func:`fisher_spectrum` does, b = k).

    **Cost**: m + 1 products of b vectors (the last checks the residuals of all k pairs in one
    batched product), O(m² b² P) arithmetic and m·b·P memory for the basis.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    xp = array_namespace(v0)
    V = v0[None, :] if v0.ndim == 1 else v0
    if V.ndim != 2 or V.shape[0] < 1:
        raise ValueError(f"v0: expected shape (P,) or (b, P), got {tuple(v0.shape)}")
    b, P = V.shape
    if b > P:
        raise ValueError(f"v0: a block of {b} vectors in P = {P} dimensions; expected at most P")
    max_steps = min(int(max_steps), -(-P // b))
    if max_steps * b < k:
        raise ValueError(f"max_steps: expected at least k = {k} vectors in the basis (and P = {P} >= k), "
                         f"got {max_steps} steps of {b}")
    Q, _ = _qr(V)
    basis = _Basis(Q)
    # Directions of the new block below tiny·‖A‖ are rounding noise (the Krylov space is
    # exhausted along them): dropped, or they would enter the basis unorthogonal to it.
    tiny = max(1e-12, 64 * float(xp.finfo(V.dtype).eps))
    H = np.zeros((0, 0))  # T_m = Q_mᵀ A Q_m as it grows; plus the rows of the next block
    cols: list[int] = [0, Q.shape[0]]  # block j holds basis vectors cols[j]:cols[j + 1]
    scale = 0.0
    for m in range(1, max_steps + 1):
        lo, hi = cols[-2], cols[-1]
        W = matmat(Q)
        coef = np.zeros((hi, hi - lo))
        for _ in range(2):  # full reorthogonalisation, twice
            W, c = basis.project(W)
            coef += c[:hi]
        if not np.all(np.isfinite(coef)):
            raise ValueError("matmat: the operator's products hold inf or NaN (an input or a parameter "
                             "of the model holds inf or NaN, or its gradients overflowed)")
        scale = max(scale, float(np.abs(coef).max()))
        Qn, R = _orthonormal(W, basis, tiny * max(scale, 1e-300), room=P - hi)
        r = R.shape[0]
        H = _grow(H, hi + r)
        H[:hi, lo:hi] = coef
        H[hi:hi + r, lo:hi] = R
        done = r == 0 or m == max_steps
        if done or (hi >= k and m % check_every == 0):
            theta, S = np.linalg.eigh(_sym(H[:hi, :hi]))
            est = np.linalg.norm(H[hi:hi + r, lo:hi] @ S[lo:hi, ::-1][:, :k], axis=0)
            if done or (hi >= k and np.all(est <= tol * max(theta[-1], 1e-300))):
                break
        Q = Qn
        basis.append(Q)
        cols.append(hi + r)
    n = cols[-1]
    theta, S = np.linalg.eigh(_sym(H[:n, :n]))
    k = min(k, n)  # fewer when the Krylov space was exhausted first
    theta, S = theta[::-1][:k].copy(), S[:, ::-1][:, :k].copy()
    Y = basis.combine(S)
    Y = Y / xp.linalg.vector_norm(Y, axis=1, keepdims=True)
    AY = matmat(Y)
    theta_t = xp.asarray(theta, dtype=Y.dtype, device=_device(Y))
    res = np.asarray(_to_numpy(xp.linalg.vector_norm(AY - theta_t[:, None] * Y, axis=1)), dtype=np.float64)
    return Eigenpairs(np.asarray(theta, dtype=np.float64), Y, res, len(cols) - 1)


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
        if not (np.all(np.isfinite(a_np)) and np.all(np.isfinite(b_np))):
            raise ValueError("matmat: the operator's products hold inf or NaN (an input or a parameter "
                             "of the model holds inf or NaN, or its gradients overflowed)")
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

    def append(self, Q):
        """Add the rows of ``Q`` (r, P) (or one vector (P,)) to the basis."""
        xp = self.xp
        for i in range(Q.shape[0] if Q.ndim == 2 else 1):
            q = Q[i, :] if Q.ndim == 2 else Q
            r = self.n % self.ROWS
            if r == 0:
                self.blocks.append(xp.zeros((self.ROWS, q.shape[0]), dtype=q.dtype, device=self.dev))
            onehot = xp.asarray(np.eye(self.ROWS)[r], dtype=q.dtype, device=self.dev)
            self.blocks[-1] = self.blocks[-1] + onehot[:, None] * q[None, :]
            self.n += 1

    def project(self, W):
        """W minus its components along the basis, and those components C (n, r): W − Cᵀ Q."""
        xp = self.xp
        cs = []
        for blk in self.blocks:
            c = xp.matmul(blk, xp.matrix_transpose(W))  # (ROWS, r)
            W = W - xp.matmul(xp.matrix_transpose(c), blk)
            cs.append(c)
        C = np.asarray(_to_numpy(xp.concat(cs, axis=0)), dtype=np.float64)
        return W, C[:self.n]

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


def _qr(W):
    """W (r, P) = Rᵀ Q with orthonormal rows Q (r, P) in W's namespace and R (r, r) on the host."""
    xp = array_namespace(W)
    Qt, R = xp.linalg.qr(xp.matrix_transpose(W))
    return xp.matrix_transpose(Qt), np.asarray(_to_numpy(R), dtype=np.float64)


def _orthonormal(W, basis, floor: float, room: int):
    """The new block from W (r, P), already orthogonal to the basis: W ≈ Rᵀ Q with orthonormal
    rows Q (s, P), s ≤ r, keeping the directions whose singular value exceeds ``floor`` (at most
    ``room`` of them), orthogonalised once more against the basis."""
    xp = array_namespace(W)
    Qn, R = _qr(W)
    U, sv, Vt = np.linalg.svd(R)  # R = U Σ Vᵀ: W = Rᵀ Qn = (Σ Uᵀ)ᵀ (Uᵀ Qn)
    keep = int(min(np.sum(sv > floor), room))
    if keep == 0:
        return Qn[:0, :], np.zeros((0, W.shape[0]))
    rot = xp.asarray(np.ascontiguousarray(U[:, :keep].T), dtype=Qn.dtype, device=_device(Qn))
    Qk = xp.matmul(rot, Qn)
    Qk, _ = basis.project(Qk)
    Qk, R2 = _qr(Qk)  # R2 ≈ I
    return Qk, R2 @ (sv[:keep, None] * Vt[:keep, :])


def _sym(T: np.ndarray) -> np.ndarray:
    return (T + T.T) / 2


def _grow(H: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, n))
    out[:H.shape[0], :H.shape[1]] = H[:n, :n]
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
