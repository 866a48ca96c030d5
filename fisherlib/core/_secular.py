"""The secular-equation eigensolver behind :mod:`fisherlib.core.spectrum` (theory.md §2).

Roots of h(λ) = Σ_j p_j / (p_j - λ) between consecutive sorted probabilities, by safeguarded
middle-way steps on offsets from the nearer pole, with deflation of ties and zero
probabilities and cache-sized blocks; the method is described in the docstring of
:mod:`fisherlib.core.spectrum`. Array API only: it traces under ``jax.jit``.
"""

from __future__ import annotations

import math
from typing import Any

from ._compat import device, is_eager
from ._lib import log_softmax, matmul_vec

Array = Any

# Elements (rows x roots x classes) handled at once: bounds the memory of the O(C²) temporaries
# (see _block_elements). 2^17 float64 is 1 MiB, the size of a core's L2 cache here.
_CHUNK_ELEMENTS = 1 << 20
_CACHE_ELEMENTS = 1 << 17


def default_steps(dtype, *, xp) -> int:
    return 8 if dtype == xp.float64 else 5


def _block_elements(x) -> int:
    """Elements (rows x roots x classes) of one block of the O(C²) temporaries.

    On a CPU with eager arrays a block of 2^17 (1 MiB in float64) keeps the few arrays of a
    step in cache; a step is a handful of elementwise passes, memory-bound when they spill.
    Traced arrays (XLA fuses the passes) and accelerators (where fewer, larger launches win)
    take blocks of 2^20. Only the cost changes with the block, never the result's shape.
    """
    if is_eager(x) and "cpu" in str(device(x)).lower():
        return _CACHE_ELEMENTS
    return _CHUNK_ELEMENTS


def _spectrum(z, first: int | None, *, steps, vectors, xp, block=None, early_stop=None):
    """Eigenpairs for slots ``first..C-1`` (all when None) of every row of logits ``z``.

    Returns eigenvalues (..., S) and, if ``vectors``, eigenvectors (..., S, C) as rows.
    ``block`` (elements per block) and ``early_stop`` (only ever on eager arrays) override the
    defaults; the tests use them to compare blocked with unblocked and early with full runs.
    """
    if steps is None:
        steps = default_steps(z.dtype, xp=xp)
    elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    batch, C = tuple(z.shape[:-1]), z.shape[-1]
    first = 0 if first is None else first
    S = C - first
    n = math.prod(batch)
    if n == 0:  # no rows (an empty batch): nothing to solve, and no block to concatenate
        empty = xp.zeros((*batch, S), dtype=z.dtype, device=device(z))
        return empty, (xp.zeros((*batch, S, C), dtype=z.dtype, device=device(z)) if vectors else None)
    logp = xp.reshape(log_softmax(z, xp=xp), (n, C))
    perm = xp.argsort(logp, axis=-1)
    d = xp.exp(xp.take_along_axis(logp, perm, axis=-1))
    # Flush probabilities below ε·max p to 0 (moves no eigenvalue by more than ε·max p) so that
    # every root's offset from its pole stays well inside the floating range.
    d = xp.where(d < xp.finfo(d.dtype).eps * d[:, -1:], xp.zeros_like(d), d)
    d = _snap_ties(d, xp=xp)
    eager = is_eager(d)
    early_stop = eager if early_stop is None else bool(early_stop) and eager
    # Tied groups (two or more zeros count): their bounds in sorted order give the residues of
    # the bounding poles and the Helmert vectors. Eager arrays without ties skip all of it.
    starts = _group_starts(d, xp=xp)
    groups = _groups(d, starts, xp=xp) if not eager or not bool(xp.all(starts)) else None
    # Eigenvectors are formed directly in the caller's class order, from the snapped
    # probabilities put back in that order (rank[j]: the sorted position of class j).
    rank = xp.argsort(perm, axis=-1) if vectors else None
    p = xp.take_along_axis(d, rank, axis=-1) if vectors else None

    block = _block_elements(d) if block is None else max(1, block)
    rows = max(1, block // max(1, S * C))
    width = max(1, min(S, block // (rows * C)))  # slots per block; all of them when rows > 1
    bands = {}  # near-pole patterns of tie-free rows, shared by the blocks of every chunk
    lams, vecs = [], []
    for start in range(0, n, rows):
        rs = slice(start, min(start + rows, n))
        lam, vec = _solve_rows(
            d[rs, :],
            None if p is None else (p[rs, :], rank[rs, :]),
            None if groups is None else tuple(g[rs, :] for g in groups),
            first,
            width=width,
            steps=steps,
            early_stop=early_stop,
            bands=bands,
            xp=xp,
        )
        if rows == 1:
            lams += lam
            vecs += vec
        else:  # one block (two with slot 0) of at most `block` elements: cheap to join here
            lams.append(xp.concat(lam, axis=1) if len(lam) != 1 else lam[0])
            if vec:
                vecs.append(xp.concat(vec, axis=1) if len(vec) != 1 else vec[0])
    # Gather the blocks with one concatenation of the large result. With one row per chunk the
    # (1, S_i[, C]) blocks join along the slot axis into (1, n·S[, C]), i.e. (n, S[, C]).
    axis = 1 if rows == 1 else 0
    lam = xp.reshape(xp.concat(lams, axis=axis) if len(lams) != 1 else lams[0], (*batch, S))
    if not vectors:
        return lam, None
    vec = xp.concat(vecs, axis=axis) if len(vecs) != 1 else vecs[0]
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
    group = xp.cumulative_sum(xp.astype(_group_starts(d, xp=xp), xp.int32), axis=1)
    j = xp.arange(C, device=device(d))
    s = 1
    while s < C:  # d[j] <- d[min(j + s, C - 1)] within a group; same shapes every pass
        ahead = xp.broadcast_to(xp.minimum(j + s, C - 1)[None, :], (n, C))
        same = xp.take_along_axis(group, ahead, axis=1) == group
        d = xp.where(same, xp.take_along_axis(d, ahead, axis=1), d)
        s *= 2
    return d


def _group_starts(d, *, xp):
    """(n, C) bool: where a new tied group of ascending ``d`` starts (neighbours > 8 ulp apart)."""
    if d.shape[1] < 2:
        return xp.ones(d.shape, dtype=xp.bool, device=device(d))
    eps = xp.finfo(d.dtype).eps
    start = ~((d[:, 1:] - d[:, :-1]) <= 8 * eps * d[:, 1:])
    return xp.concat([xp.ones_like(start[:, :1]), start], axis=1)


def _groups(d, start, *, xp):
    """Group ids and each position's group's first and last index, (n, C) each.

    ``start`` is :func:`_group_starts` of ``d``. Doubling scans (a running max of start
    positions, a running min of end positions): ⌈log₂ C⌉ O(C) passes per row, decided by shape.
    """
    n, C = d.shape
    j = xp.arange(C, device=device(d))
    group = xp.cumulative_sum(xp.astype(start, xp.int32), axis=1)
    end = xp.concat([start[:, 1:], xp.ones_like(start[:, :1])], axis=1)
    jb = xp.broadcast_to(j[None, :], (n, C))
    lo = xp.where(start, jb, xp.zeros_like(jb))
    hi = xp.where(end, jb, xp.full_like(jb, C - 1))
    s = 1
    while s < C:
        back = xp.broadcast_to(xp.maximum(j - s, 0)[None, :], (n, C))
        ahead = xp.broadcast_to(xp.minimum(j + s, C - 1)[None, :], (n, C))
        lo = xp.maximum(lo, xp.take_along_axis(lo, back, axis=1))
        hi = xp.minimum(hi, xp.take_along_axis(hi, ahead, axis=1))
        s *= 2
    return group, lo, hi


def _solve_rows(d, pr, groups, first, *, width, steps, early_stop, bands, xp):
    """Solve slots first..C-1 for rows of ascending probabilities ``d`` (n, C).

    ``pr``, given when eigenvectors are wanted: the snapped probabilities in class order and
    each class's sorted position, (n, C) each. ``groups``: :func:`_groups` of ``d``, or None
    when the rows have no ties. The slots are solved in blocks of ``width``. Returns the blocks'
    eigenvalues (n, S_i) and eigenvectors (n, S_i, C) as two lists in slot order (the second
    empty without ``pr``).
    """
    n, C = d.shape
    dev = device(d)
    dt = d.dtype
    lams, vecs = [], []
    if first == 0:
        lams.append(xp.zeros((n, 1), dtype=dt, device=dev))
        if pr is not None:
            vecs.append(xp.full((n, 1, C), 1 / math.sqrt(C), dtype=dt, device=dev))
    sqd = xp.sqrt(d)
    for s0 in range(max(first, 1), C, width):  # slot 0 (λ = 0) needs no solving
        lam, vec = _solve_block(
            d, sqd, pr, groups, s0, min(s0 + width, C), steps=steps, early_stop=early_stop, bands=bands, xp=xp
        )
        lams.append(lam)
        if vec is not None:
            vecs.append(vec)
    return lams, vecs


def _rowdot(x, y, *, xp):
    """Σ_j x_j y_j over the last axis, without an (n, B, C) temporary where the namespace allows.

    The linalg extension's ``vecdot`` where there is one: array-api-compat's top-level torch
    ``vecdot`` is a batched (1 x C)(C x 1) matmul, several times slower than torch's own.
    """
    f = getattr(getattr(xp, "linalg", None), "vecdot", None) or xp.vecdot
    return f(x, y, axis=-1)


def _solve_block(d, sqd, pr, groups, s0, s1, *, steps, early_stop, bands, xp):
    """Roots and (if ``pr`` is given) eigenvectors of slots s0..s1-1, arrays (n, s1 - s0[, C]).

    Slot s solves h on (d[s-1], d[s]). Each pass over the (n, B, C) block is elementwise or a
    batched matrix-vector product, and a block is sized to stay in cache through a step:

    * u = √d ⊘ (d - λ) gives, by products with √d and with itself, the far part of h and of
      h' (Σ d_j/(d_j - λ) and Σ d_j/(d_j - λ)²) without squaring the block;
    * the rounding bound needs Σ |d_j/(d_j - λ)|: poles below d[s0-1] lie below every root of
      the block and poles from d[s1] on above, so it is a signed product there, and only the
      band d[s0-1..s1-1] takes an absolute value.
    """
    n, C = d.shape
    dt = d.dtype
    eps = xp.finfo(dt).eps
    dev = device(d)
    B = s1 - s0
    lo_d, hi_d = d[:, s0 - 1 : s1 - 1], d[:, s0:s1]  # (n, B)
    tie = (hi_d - lo_d) <= 8 * eps * hi_d
    regular = ~tie & (lo_d > 0)
    zero = xp.zeros_like(lo_d)
    # Non-regular slots solve a harmless dummy interval below every pole; their step is zeroed.
    lo = xp.where(regular, lo_d, xp.asarray(-2.0, dtype=dt))
    hi = xp.where(regular, hi_d, xp.asarray(-1.0, dtype=dt))
    d3 = d[:, None, :]
    # The near poles get +inf, so that the O(C) sums below see only the far poles; they enter
    # exactly through a = lo - λ and b = hi - λ, with their residues (a tied group of m members
    # adds m·d). No probability lies strictly between lo and hi.
    if groups is None:  # tie-free rows: the near poles are the slot's two neighbours
        res_lo, res_hi = xp.where(regular, lo_d, zero), xp.where(regular, hi_d, zero)
        near = bands.get((s0, s1))
        if near is None:
            j = xp.arange(C, device=dev)[None, :]
            s = xp.arange(s0, s1, device=dev)[:, None]
            near = bands[(s0, s1)] = ((j == s - 1) | (j == s))[None, ...]
    else:
        group, gfirst, glast = groups
        slots = xp.arange(s0, s1, device=dev)[None, :]
        res_lo = xp.where(regular, lo_d * xp.astype(slots - gfirst[:, s0 - 1 : s1 - 1], dt), zero)
        res_hi = xp.where(regular, hi_d * xp.astype(glast[:, s0:s1] - slots + 1, dt), zero)
        near = (d3 >= lo[..., None]) & (d3 <= hi[..., None])
    far = xp.where(near, xp.asarray(xp.inf, dtype=dt), d3)  # (n, B, C)
    sqd3 = sqd[:, None, :]
    band = (max(s0 - 1, 0), s1)
    whole = band == (0, C)
    if not whole:  # weights of Σ_j d_j |1/(d_j - λ)| = Σ_j √d_j |u_j| outside the band
        signed = xp.concat([-sqd[:, : band[0]], xp.zeros_like(sqd[:, band[0] : band[1]]), sqd[:, band[1] :]], axis=1)
        sqd_band = sqd[:, band[0] : band[1]]

    def evaluate(diff, a, b):
        """Far part of h, h, far part of h', h's rounding-error bound, the near terms."""
        u = sqd3 / diff
        hfar = matmul_vec(u, sqd, xp=xp)
        dfar = _rowdot(u, u, xp=xp)
        if whole:
            absum = matmul_vec(xp.abs(u), sqd, xp=xp)
        else:
            absum = matmul_vec(u, signed, xp=xp) + matmul_vec(xp.abs(u[..., band[0] : band[1]]), sqd_band, xp=xp)
        tlo, thi = res_lo / a, res_hi / b
        return hfar, hfar + tlo + thi, dfar, 2 * eps * (absum + xp.abs(tlo) + xp.abs(thi)), tlo, thi

    def step(hfar, h, dfar, err, tlo, thi, a, b):
        """Root η in (a, b) of the model c + s/(a-η) + S/(b-η) that matches h and h' with the
        true poles (Li's middle way). Multiplied out, cη² - Bη + ab·h = 0, where
        B = (a+b)h - ab·h' is free of cancellation as h -> 0. Zero once |h| is below its
        rounding error, where its sign is noise."""
        dh = tlo / a + thi / b + dfar
        c = hfar - 0.5 * (a + b) * dfar
        ab = a * b
        B = (a + b) * h - ab * dh
        Cq = ab * h
        root = xp.sqrt(xp.maximum(B * B - 4 * c * Cq, zero))
        q = 0.5 * (B + xp.where(B >= 0, root, -root))
        q = xp.where(q == 0, xp.ones_like(q), q)
        x2 = Cq / q
        x1 = q / xp.where(c == 0, xp.ones_like(c), c)
        eta = xp.where((x2 > a) & (x2 < b), x2, x1)
        return xp.where(regular & (xp.abs(h) > err), eta, zero)

    def safeguard(delta, eta, a0, b0, blo, bhi):
        """Take δ + η if it stays in the bracket, else bisect."""
        new = delta + eta
        ok = (new > a0) & (new < b0) & (new >= blo) & (new <= bhi)
        return xp.where(ok, new, blo + 0.5 * (bhi - blo))

    def shrink(h, err, delta, blo, bhi):
        informative = xp.abs(h) > err
        return xp.where(informative & (h < 0), delta, blo), xp.where(informative & (h > 0), delta, bhi)

    mid = lo + 0.5 * (hi - lo)
    ev = evaluate(far - mid[..., None], lo - mid, hi - mid)
    eta = step(*ev, lo - mid, hi - mid)
    below = ev[1] > 0  # root in (lo, mid): measure from lo, else from hi
    origin = xp.where(below, lo, hi)
    a0, b0 = lo - origin, hi - origin  # one of them is exactly 0
    blo = xp.where(below, a0, mid - origin)
    bhi = xp.where(below, mid - origin, b0)
    delta = safeguard(mid - origin, eta, a0, b0, blo, bhi)
    dk = far - origin[..., None]
    for _ in range(steps):
        a, b = a0 - delta, b0 - delta
        ev = evaluate(dk - delta[..., None], a, b)
        blo, bhi = shrink(ev[1], ev[3], delta, blo, bhi)
        new = safeguard(delta, step(*ev, a, b), a0, b0, blo, bhi)
        # Early stop (eager arrays; traced ones take every step). Near a root the steps
        # converge quadratically, so once no root moves by more than 4 ulp of its offset the
        # remaining steps would change it by rounding only (and once none moves at all, they
        # would repeat this step exactly).
        if early_stop and not bool(xp.any(regular & (xp.abs(new - delta) > 4 * eps * xp.abs(new)))):
            delta = new
            break
        delta = new

    lam = xp.where(regular, origin + delta, xp.where(tie, hi_d, zero))
    if pr is None:
        return lam, None

    # Secular eigenvectors v ∝ p ⊘ (p - λ) in class order, p - λ formed as (p - origin) - δ so
    # that the near poles get exactly a and b. No entry overflows: ties are snapped and tiny
    # probabilities flushed, so |p - λ| >= p·8ε/C at every pole, and the largest entry is
    # O(C/ε).
    p, rank = pr
    p3 = p[:, None, :]
    v = p3 / ((p3 - origin[..., None]) - delta[..., None])
    v = v * (1 / xp.sqrt(_rowdot(v, v, xp=xp)))[..., None]
    if early_stop and bool(xp.all(regular)):
        return lam, v
    # The first slot past m zero probabilities: (C - m) on the zeros, -m on the rest.
    rk = rank[:, None, :]  # sorted position of each class
    ss = xp.arange(s0, s1, device=dev)[None, :, None]
    one = xp.ones_like(v)
    m = xp.astype(ss, dt)
    special = xp.where(rk < ss, (C - m) * one, -m * one) / xp.sqrt(m * (C - m) * C)
    if groups is not None:
        # Helmert vectors inside a tied group: 1 on the group's earlier members, -count at the slot.
        group, gfirst, _ = groups
        before = (xp.take_along_axis(group, rank, axis=1)[:, None, :] == group[:, s0:s1, None]) & (rk < ss)
        count = xp.astype(xp.arange(s0, s1, device=dev)[None, :] - gfirst[:, s0:s1], dt)[..., None]
        count = xp.maximum(count, xp.ones_like(count))  # only tied slots use it; keep others finite
        helmert = xp.where(before, one, xp.where(rk == ss, -count * one, 0 * one)) / xp.sqrt(count * (count + 1))
        special = xp.where(tie[..., None], helmert, special)
    return lam, xp.where(regular[..., None], v, special)
