"""Spectrum of the simplex FIM I_Δ = diag(p) - p pᵀ through its secular equation (theory.md §2).

I_Δ is a rank-one downdate of diag(p), so with p sorted ascending, d_1 <= ... <= d_C, its
eigenvalues interlace: λ_1 = 0 (eigenvector 1) and d_{i-1} <= λ_i <= d_i. Because Σp = 1, the
nonzero eigenvalues are the roots of

    h(λ) = Σ_j p_j / (p_j - λ) = 0,

which is strictly increasing from -∞ to +∞ on every open interval (d_{i-1}, d_i), and the
eigenvector of a root is v ∝ p ⊘ (p - λ). This form needs no "1 -" and is scale-free, so roots
between tiny probabilities keep their relative accuracy.

Each root is found by a fixed number of safeguarded rational ("middle way") steps, stored as an
offset δ from its nearer pole so that p_j - λ keeps full relative accuracy; every step that
leaves the current bracket falls back to bisection. Deflation, decided from shapes and
``where`` masks only (so the solver traces under ``jax.jit``):

* tied probabilities (equal within 8 ulp) give the eigenvalue p itself, with Helmert vectors
  inside the tied group (orthogonal to 1 and to every secular eigenvector);
* probabilities below ε·max p are treated as 0 (this moves no eigenvalue by more than ε·max p);
  a zero probability adds a kernel direction.

Cost: O(C) per root per step, so O(C²·steps) for the whole spectrum against O(C³) for a dense
eigensolver, and O(C·steps) for the top pair alone.
"""

from __future__ import annotations

import math
from typing import Any

from ._compat import check_logits, device
from ._lib import log_softmax, matmul_vec, restore

Array = Any

__all__ = ["eigh", "eigvalsh", "interlacing_bounds", "lambda_max_bounds", "top_eigpair"]

# Elements (rows x roots x classes) handled at once: bounds the memory of the O(C²) temporaries.
_CHUNK_ELEMENTS = 1 << 20


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
    Cost O(C² · steps) per row, against O(C³) for dense ``eigh``; memory is bounded by chunking
    rows. Accuracy: eigenvalues to a few ulp of max p; eigenvectors to ε·max p / gap in angle.

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


def default_steps(dtype, *, xp) -> int:
    return 8 if dtype == xp.float64 else 5


def _spectrum(z, first: int | None, *, steps, vectors, xp):
    """Eigenpairs for slots ``first..C-1`` (all when None) of every row of logits ``z``.

    Returns eigenvalues (..., S) and, if ``vectors``, eigenvectors (..., S, C) as rows.
    """
    if steps is None:
        steps = default_steps(z.dtype, xp=xp)
    elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    batch, C = tuple(z.shape[:-1]), z.shape[-1]
    first = 0 if first is None else first
    S = C - first
    n = math.prod(batch)
    logp = xp.reshape(log_softmax(z, xp=xp), (n, C))
    perm = xp.argsort(logp, axis=-1)
    d = xp.exp(xp.take_along_axis(logp, perm, axis=-1))
    # Flush probabilities below ε·max p to 0 (moves no eigenvalue by more than ε·max p) so that
    # every root's offset from its pole stays well inside the floating range.
    d = xp.where(d < xp.finfo(d.dtype).eps * d[:, -1:], xp.zeros_like(d), d)
    d = _snap_ties(d, xp=xp)

    rows = max(1, _CHUNK_ELEMENTS // max(1, S * C))
    lams, vecs = [], []
    for start in range(0, n, rows):
        lam, vec = _solve_rows(d[start : min(start + rows, n), :], first, steps=steps, vectors=vectors, xp=xp)
        lams.append(lam)
        vecs.append(vec)
    lam = xp.concat(lams, axis=0) if len(lams) != 1 else lams[0]
    lam = xp.reshape(lam, (*batch, S))
    if not vectors:
        return lam, None
    vec = xp.concat(vecs, axis=0) if len(vecs) != 1 else vecs[0]
    # Back from sorted to original class order: component perm[j] holds sorted component j.
    inv = xp.broadcast_to(xp.argsort(perm, axis=-1)[:, None, :], vec.shape)
    vec = xp.take_along_axis(vec, inv, axis=-1)
    return lam, xp.reshape(vec, (*batch, S, C))


def _snap_ties(d, *, xp):
    """Give every tied group of ascending ``d`` (n, C) one value, the group's largest.

    Neighbours within 8 ulp are deflated as a tie. The solver's Helmert vectors are orthogonal
    to the secular eigenvectors only if the group's members are *exactly* equal (then
    v ∝ d ⊘ (d - λ) is constant on the group), so near ties are made exact here, once for all
    slots. This moves no probability by more than 8 ε · max p per tied neighbour. The value is
    propagated from each group's end by a doubling scan: ⌈log₂ C⌉ steps, decided by shape.
    """
    n, C = d.shape
    if C < 2:
        return d
    eps = xp.finfo(d.dtype).eps
    start = ~((d[:, 1:] - d[:, :-1]) <= 8 * eps * d[:, 1:])
    start = xp.concat([xp.ones_like(start[:, :1]), start], axis=1)
    group = xp.cumulative_sum(xp.astype(start, xp.int32), axis=1)
    j = xp.arange(C, device=device(d))
    s = 1
    while s < C:  # d[j] <- d[min(j + s, C - 1)] within a group; same shapes every pass
        ahead = xp.broadcast_to(xp.clip(j + s, max=C - 1)[None, :], (n, C))
        same = xp.take_along_axis(group, ahead, axis=1) == group
        d = xp.where(same, xp.take_along_axis(d, ahead, axis=1), d)
        s *= 2
    return d


def _solve_rows(d, first, *, steps, vectors, xp):
    """Solve slots first..C-1 for rows of ascending probabilities ``d`` (n, C)."""
    n, C = d.shape
    dev = device(d)
    dt = d.dtype
    eps = xp.finfo(dt).eps
    j = xp.arange(C, device=dev)
    slots = xp.arange(max(first, 1), C, device=dev)  # slot 0 (λ = 0) needs no solving
    lam_parts, vec_parts = [], []
    if first == 0:
        lam_parts.append(xp.zeros((n, 1), dtype=dt, device=dev))
        vec_parts.append(xp.full((n, 1, C), 1 / math.sqrt(C), dtype=dt, device=dev))
    if slots.shape[0] > 0:
        lam, vec = _solve_slots(d, slots, steps=steps, vectors=vectors, eps=eps, j=j, xp=xp)
        lam_parts.append(lam)
        vec_parts.append(vec)
    lam = xp.concat(lam_parts, axis=1) if len(lam_parts) > 1 else lam_parts[0]
    if not vectors:
        return lam, None
    return lam, (xp.concat(vec_parts, axis=1) if len(vec_parts) > 1 else vec_parts[0])


def _solve_slots(d, slots, *, steps, vectors, eps, j, xp):
    n, C = d.shape
    dt = d.dtype
    lo_d = xp.take(d, slots - 1, axis=1)  # (n, S)
    hi_d = xp.take(d, slots, axis=1)
    tie = (hi_d - lo_d) <= 8 * eps * hi_d
    zero_left = ~tie & (lo_d == 0)
    regular = ~tie & (lo_d > 0)
    # Non-regular slots solve a harmless dummy interval below every pole; their step is zeroed.
    lo = xp.where(regular, lo_d, xp.asarray(-2.0, dtype=dt))
    hi = xp.where(regular, hi_d, xp.asarray(-1.0, dtype=dt))
    d3 = d[:, None, :]
    near_lo, near_hi = d3 == lo[..., None], d3 == hi[..., None]  # (n, S, C)
    near = near_lo | near_hi
    zero3 = xp.zeros_like(near, dtype=dt)
    # Residues of the two poles that bound the interval (a tied group adds up). The near poles
    # are taken exactly from a = lo - λ and b = hi - λ; their differences are set to +inf so
    # that the O(C) sums below see only the far poles.
    res_lo = xp.sum(xp.where(near_lo, d3, zero3), axis=-1)
    res_hi = xp.sum(xp.where(near_hi, d3, zero3), axis=-1)
    inf3 = zero3 + xp.inf

    def evaluate(far_diff, a, b):
        """h(λ), the far poles' derivative R'(λ), and h's rounding-error bound."""
        inv = 1 / far_diff
        hfar = matmul_vec(inv, d, xp=xp)
        dfar = matmul_vec(inv * inv, d, xp=xp)
        err = matmul_vec(xp.abs(inv), d, xp=xp) + res_lo / xp.abs(a) + res_hi / xp.abs(b)
        return hfar, hfar + res_lo / a + res_hi / b, dfar, 2 * eps * err

    def step(hfar, h, dfar, err, a, b):
        """Root η in (a, b) of the model c + s/(a-η) + S/(b-η) that matches h and h' with the
        true poles (Li's middle way). Multiplied out, cη² - Bη + ab·h = 0, where
        B = (a+b)h - ab·h' is free of cancellation as h -> 0. Zero once |h| is below its
        rounding error, where its sign is noise."""
        dh = res_lo / (a * a) + res_hi / (b * b) + dfar
        c = hfar - 0.5 * (a + b) * dfar
        B = (a + b) * h - a * b * dh
        Cq = a * b * h
        root = xp.sqrt(xp.clip(B * B - 4 * c * Cq, min=0.0))
        q = 0.5 * (B + xp.where(B >= 0, root, -root))
        q = xp.where(q == 0, xp.ones_like(q), q)
        x2 = Cq / q
        x1 = q / xp.where(c == 0, xp.ones_like(c), c)
        eta = xp.where((x2 > a) & (x2 < b), x2, x1)
        return xp.where(regular & (xp.abs(h) > err), eta, xp.zeros_like(eta))

    def safeguard(delta, eta, a0, b0, blo, bhi):
        """Take δ + η if it stays in the bracket, else bisect."""
        new = delta + eta
        ok = (new > a0) & (new < b0) & (new >= blo) & (new <= bhi)
        return xp.where(ok, new, blo + 0.5 * (bhi - blo))

    def shrink(h, err, delta, blo, bhi):
        informative = xp.abs(h) > err
        return xp.where(informative & (h < 0), delta, blo), xp.where(informative & (h > 0), delta, bhi)

    mid = lo + 0.5 * (hi - lo)
    hfar, h, dfar, err = evaluate(xp.where(near, inf3, d3 - mid[..., None]), lo - mid, hi - mid)
    eta = step(hfar, h, dfar, err, lo - mid, hi - mid)
    below = h > 0  # root in (lo, mid): measure from lo, else from hi
    origin = xp.where(below, lo, hi)
    a0, b0 = lo - origin, hi - origin  # one of them is exactly 0
    blo = xp.where(below, a0, mid - origin)
    bhi = xp.where(below, mid - origin, b0)
    delta = safeguard(mid - origin, eta, a0, b0, blo, bhi)
    dk = xp.where(near, inf3, d3 - origin[..., None])
    for _ in range(steps):
        a, b = a0 - delta, b0 - delta
        hfar, h, dfar, err = evaluate(dk - delta[..., None], a, b)
        blo, bhi = shrink(h, err, delta, blo, bhi)
        delta = safeguard(delta, step(hfar, h, dfar, err, a, b), a0, b0, blo, bhi)

    zero = xp.zeros_like(lo_d)
    lam = xp.where(regular, origin + delta, xp.where(tie, hi_d, zero))
    if not vectors:
        return lam, None

    # Secular eigenvectors v ∝ d ⊘ (d - λ), scaled by their largest entry (at a near pole).
    a, b = a0 - delta, b0 - delta
    scale = xp.maximum(lo / xp.abs(a), hi / xp.abs(b))
    v = d3 / ((dk - delta[..., None]) * scale[..., None])
    v = xp.where(near_lo, (lo / (a * scale))[..., None], xp.where(near_hi, (hi / (b * scale))[..., None], v))
    v = v / xp.sqrt(xp.sum(v * v, axis=-1, keepdims=True))
    # Helmert vectors inside a tied group: 1 on the group's earlier members, -count at the slot.
    jj = j[None, None, :]
    ss = slots[None, :, None]
    start = xp.concat([xp.ones_like(tie[:, :1]), ~((d[:, 1:] - d[:, :-1]) <= 8 * eps * d[:, 1:])], axis=1)
    group = xp.cumulative_sum(xp.astype(start, xp.int32), axis=1)  # (n, C)
    gs = xp.take(group, slots, axis=1)
    before = (group[:, None, :] == gs[..., None]) & (jj < ss)
    count = xp.astype(xp.sum(xp.astype(before, xp.int32), axis=-1), dt)[..., None]
    count = xp.maximum(count, xp.ones_like(count))  # only tied slots use it; keep others finite
    one = xp.ones_like(v)
    helmert = xp.where(before, one, xp.where(jj == ss, -count * one, zero3)) / xp.sqrt(count * (count + 1))
    # The first slot past m zero probabilities: (C - m) on the zeros, -m on the rest.
    m = xp.astype(ss, dt)
    kernel = xp.where(jj < ss, (C - m) * one, -m * one) / xp.sqrt(m * (C - m) * C)
    v = xp.where(regular[..., None], v, xp.where(tie[..., None], helmert, kernel))
    return lam, v
