"""Spectrum of the simplex FIM I_Δ = diag(p) - p pᵀ through its secular equation (theory.md §2).

I_Δ is a rank-one downdate of diag(p), so with p sorted ascending, d_1 <= ... <= d_C, its
eigenvalues interlace: λ_1 = 0 (eigenvector 1) and d_{i-1} <= λ_i <= d_i. Because Σp = 1, the
nonzero eigenvalues are the roots of

    h(λ) = Σ_j p_j / (p_j - λ) = 0,

which is strictly increasing from -∞ to +∞ on every open interval (d_{i-1}, d_i), and the
eigenvector of a root is v ∝ p ⊘ (p - λ). This form needs no "1 -" and is scale-free, so roots
between tiny probabilities keep their relative accuracy.

Each root is found by at most a fixed number of safeguarded rational ("middle way") steps,
stored as an offset δ from its nearer pole so that p_j - λ keeps full relative accuracy; every
step that leaves the current bracket falls back to bisection. On eager arrays a block of roots
stops as soon as no root moves by more than 4 ulp (the steps converge quadratically, so the
remaining ones would change the result by rounding only); traced arrays take every step.
Deflation, decided from shapes and ``where`` masks only (so the solver traces under
``jax.jit``):

* tied probabilities (equal within 8 ulp) give the eigenvalue p itself, with Helmert vectors
  inside the tied group (orthogonal to 1 and to every secular eigenvector);
* probabilities below ε·max p are treated as 0 (this moves no eigenvalue by more than ε·max p);
  a zero probability adds a kernel direction.

The O(C²) work of a step is a few elementwise passes over (rows, roots, C) arrays, done in
blocks sized to stay in cache on a CPU (see ``_block_elements``); h and h' come from one array
u = √p ⊘ (p - λ) (h_far = u·√p, h'_far = u·u), so a step writes two such arrays.

Cost: O(C) per root per step, so O(C²·steps) for the whole spectrum against O(C³) for a dense
eigensolver, and O(C·steps) for the top pair alone.
"""

from __future__ import annotations

from typing import Any

from ._compat import check_logits
from ._lib import log_softmax, restore
from ._secular import _spectrum

Array = Any

__all__ = ["eigh", "eigvalsh", "interlacing_bounds", "lambda_max_bounds", "top_eigpair"]


def eigh(z: Array, *, steps: int | None = None) -> tuple[Array, Array]:
    """All eigenpairs of I_Δ(z) for every row of logits.

    Parameters
    ----------
    z : array (..., C)
        Logits.
    steps : int, optional
        Root-finder steps after the first; the default (8 for float64, 5 for float32) reaches
        working precision on all the cases in the test suite.

    Returns
    -------
    eigenvalues : array (..., C)
        Ascending, with λ_1 = 0 exactly.
    eigenvectors : array (..., C, C)
        Orthonormal; column i belongs to eigenvalue i (the ``numpy.linalg.eigh`` convention).

    Notes
    -----
    Cost O(C² · steps) per row, against O(C³) for dense ``eigh``; memory is bounded by working
    in blocks of rows and roots. Accuracy: eigenvalues to a few ulp of max p; eigenvectors to ε·max p / gap in angle.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherlib import simplex
    >>> lam, V = simplex.eigh(np.log(np.array([0.2, 0.3, 0.5])))
    >>> np.allclose(lam, np.linalg.eigvalsh(simplex.fim(np.log(np.array([0.2, 0.3, 0.5])))))
    True
    """
    xp, zw, dtype = check_logits(z)
    lam, vec = _spectrum(zw, None, steps=steps, vectors=True, xp=xp)
    return restore(lam, dtype, xp=xp), restore(xp.matrix_transpose(vec), dtype, xp=xp)


def eigvalsh(z: Array, *, steps: int | None = None) -> Array:
    """All eigenvalues of I_Δ(z), ascending, shape (..., C); see :func:`eigh`."""
    xp, zw, dtype = check_logits(z)
    lam, _ = _spectrum(zw, None, steps=steps, vectors=False, xp=xp)
    return restore(lam, dtype, xp=xp)


def top_eigpair(z: Array, *, k: int = 1, steps: int | None = None) -> tuple[Array, Array]:
    """The top eigenvalue λ_C and unit eigenvector v_C of I_Δ(z) (or the top ``k`` pairs).

    Cost O(k·C·steps) per row: only the roots in the top ``k`` interlacing intervals are solved.

    Returns
    -------
    eigenvalue : array (...) for k=1, else (..., k) ascending
    eigenvector : array (..., C) for k=1, else (..., C, k) with columns as eigenvectors
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    xp, zw, dtype = check_logits(z)
    C = zw.shape[-1]
    if k > C:
        raise ValueError(f"k: expected at most C={C} eigenpairs, got {k}")
    lam, vec = _spectrum(zw, C - k, steps=steps, vectors=True, xp=xp)
    lam, vec = restore(lam, dtype, xp=xp), restore(vec, dtype, xp=xp)
    if k == 1:
        return lam[..., 0], vec[..., 0, :]
    return lam, xp.matrix_transpose(vec)


def lambda_max_bounds(z: Array) -> tuple[Array, Array]:
    """Theorem-1 bounds on λ_C from the two largest probabilities a = p_(C), b = p_(C-1).

    lower = max{b, a(1 - a), λ_max of the 2x2 block of I_Δ on the two largest classes}
    upper = min{a, 1 - ‖p‖², a + b - ‖p‖²}

    The 2x2 block [[a(1-a), -ab], [-ab, b(1-b)]] has trace t = a(1-a) + b(1-b) and determinant
    ab(1 - a - b), so its top eigenvalue is (t + √(t² - 4ab(1-a-b)))/2; it is exact when only
    two classes carry mass (theory.md §2).

    Returns
    -------
    lower, upper : arrays (...)
    """
    xp, zw, dtype = check_logits(z)
    lp = xp.sort(log_softmax(zw, xp=xp), axis=-1)
    p = xp.exp(lp)
    q = -xp.expm1(lp)  # 1 - p, accurate near one-hot
    a, qa = p[..., -1], q[..., -1]
    zero = xp.zeros_like(a)
    b = p[..., -2] if p.shape[-1] > 1 else zero
    qb = q[..., -2] if p.shape[-1] > 1 else zero + 1
    rest = xp.clip(qa - b, min=0.0)  # 1 - a - b
    t = a * qa + b * qb
    block = 0.5 * (t + xp.sqrt(xp.clip(t * t - 4 * a * b * rest, min=0.0)))
    lower = xp.maximum(xp.maximum(b, a * qa), block)
    tr = xp.sum(p * q, axis=-1)
    others = xp.sum(p[..., :-2] ** 2, axis=-1) if p.shape[-1] > 2 else zero  # [:-2] is out of range at C=1
    upper = xp.minimum(xp.minimum(a, tr), t - others)
    return restore(lower, dtype, xp=xp), restore(upper, dtype, xp=xp)


def interlacing_bounds(z: Array) -> tuple[Array, Array]:
    """Cauchy interlacing: p_(i-1) <= λ_i <= p_(i) for i = 2..C, and λ_1 = 0.

    Returns
    -------
    lower, upper : arrays (..., C)
        ``lower[..., i]`` and ``upper[..., i]`` bracket the i-th smallest eigenvalue; the first
        entries are both 0, since λ_1 = 0 exactly.
    """
    xp, zw, dtype = check_logits(z)
    d = xp.exp(xp.sort(log_softmax(zw, xp=xp), axis=-1))
    zero = xp.zeros_like(d[..., :1])
    lower = xp.concat([zero, d[..., :-1]], axis=-1)
    upper = xp.concat([zero, d[..., 1:]], axis=-1)
    return restore(lower, dtype, xp=xp), restore(upper, dtype, xp=xp)


# --------------------------------------------------------------------------- the solver
