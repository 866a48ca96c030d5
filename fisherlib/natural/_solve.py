"""Damped solves (F + λI)⁻¹ g for the structured Fisher approximations (Array API only).

Every function takes arrays of one namespace and returns arrays of it; nothing here imports a
framework. Shapes: a *unit* is one output unit of a weight matrix (a row ``W[u]`` with fan-in
n, flattened, and its bias ``b[u]``); ``U`` units are solved together (batched).

=====================  ======================================  ===================================
function               matrix (per unit, damped by λ)           cost per unit
=====================  ======================================  ===================================
``diagonal``           diag(F) + λI                             O(n)
``arrowhead``          diag + bias row/column (quasi-diag.)     O(n), exact solve
``ollivier``           Ollivier's quasi-diagonal step           O(n), exact solve of its matrix
``woodbury``           AKO unit block: diagonal + rank one      O(n), Sherman–Morrison
``unit_blocks``        the full (n+1)² unit block               O(n³) batched solve
``dense``              a layer's dense block (or its pinv)      O(P³)
=====================  ======================================  ===================================
"""

from __future__ import annotations

from typing import Any

from ..core._compat import array_namespace, device

Array = Any

__all__ = ["arrowhead", "arrowhead_definite", "dense", "diagonal", "ollivier", "unit_blocks", "woodbury"]


def _check_damping(damping: float) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"damping: expected a number >= 0, got {damping!r}")
    return float(damping)


def diagonal(g: Array, diag: Array, damping: float) -> Array:
    """g / (F_ii + λ), elementwise.

    Notes
    -----
    Cost O(P). With λ = 0, entries of F that are 0 give inf: damp, or use :func:`dense` with
    ``pinv=True``.
    """
    return g / (diag + _check_damping(damping))


def arrowhead(gw: Array, gb: Array, dw: Array, db: Array, cross: Array, damping: float) -> Array:
    """Solve the damped quasi-diagonal (arrowhead) system of each unit exactly.

    Per unit, with weights' diagonal d_w (n), bias entry d_b, bias–weight terms c_j = F_{b w_j}
    and D_w = d_w + λ, D_b = d_b + λ, the matrix is

        M = [[D_b, cᵀ], [c, diag(D_w)]]     (the diagonal plus the bias row and column)

    and M (δ_b, δ_w) = (g_b, g_w) is solved by eliminating δ_w:

        δ_b = (g_b − Σ_j c_j g_j / D_j) / (D_b − Σ_j c_j² / D_j),   δ_w = (g_w − c δ_b) / D_w.

    Parameters
    ----------
    gw, dw, cross : arrays (U, n)
        Gradient, Fisher diagonal and bias–weight terms of the weights.
    gb, db : arrays (U,)
        Gradient and Fisher diagonal of the biases.
    damping : float
        λ >= 0.

    Returns
    -------
    (δ_w (U, n), δ_b (U,))

    Notes
    -----
    Cost O(n) per unit. The arrowhead part of a psd matrix need not be psd: its Schur
    complement D_b − Σ c_j²/D_j can be ≤ 0 when the unit's inputs are strongly correlated (it
    sums n terms that each may approach D_b). Then M is indefinite and the step may point
    uphill; :func:`ollivier` solves a matrix that is psd whenever F is.
    """
    lam = _check_damping(damping)
    xp = array_namespace(gw, gb, dw, db, cross)
    Dw, Db = dw + lam, db + lam
    schur = Db - xp.sum(cross * cross / Dw, axis=-1)
    delta_b = (gb - xp.sum(cross * gw / Dw, axis=-1)) / schur
    return (gw - cross * delta_b[..., None]) / Dw, delta_b


def arrowhead_definite(dw: Array, db: Array, cross: Array, damping: float) -> Array:
    """Per unit, whether the damped arrowhead matrix of :func:`arrowhead` is positive definite.

    With D_w > 0 it is exactly when the Schur complement D_b − Σ_j c_j² / D_j is > 0.
    """
    lam = _check_damping(damping)
    xp = array_namespace(dw, db, cross)
    Dw = dw + lam
    return (db + lam - xp.sum(cross * cross / Dw, axis=-1) > 0) & xp.all(Dw > 0, axis=-1)


def ollivier(gw: Array, gb: Array, dw: Array, db: Array, cross: Array, damping: float) -> Array:
    """Ollivier's quasi-diagonal step = the exact inverse of Amari–Karakida–Oizumi's unit block.

    With D_w = d_w + λ, D_b = d_b + λ and c the bias–weight terms (as in :func:`arrowhead`):

        δ_w,j = (g_j D_b − g_b c_j) / (D_j D_b − c_j²),     δ_b = g_b / D_b − Σ_j (c_j / D_b) δ_w,j

    (Ollivier 2015, §3.3, "quasi-diagonal reduction": each weight is solved jointly with the
    bias in a 2 × 2 system, then the bias corrected). This is the exact solution of
    A δ = g for the unit block

        A = diag(D_w − c²/D_b, 0) + a aᵀ / D_b,   a = (c, D_b),

    which has the damped block's diagonal and bias row/column and approximates each
    weight–weight entry F_jk by c_j c_k / F_bb: Amari, Karakida & Oizumi's (2019) form of the
    unit-wise Fisher of a random network, a diagonal plus a low-rank term through the bias, whose
    inverse is explicit (eliminate the bias; Woodbury). A is psd whenever every 2 × 2
    [[D_b, c_j], [c_j, D_j]] is, which holds for any psd F.

    Returns
    -------
    (δ_w (U, n), δ_b (U,))

    Notes
    -----
    Cost O(n) per unit. Exact for the full unit block when F_jk = F_jb F_kb / F_bb for j ≠ k
    (the unit's inputs uncorrelated given its back-propagated signal, AKO's wide random-network
    limit); otherwise it drops the weight–weight residual F_jk − c_j c_k / F_bb.

    References
    ----------
    Y. Ollivier, "Riemannian metrics for neural networks I: feedforward networks",
    Information and Inference 4 (2015). S. Amari, R. Karakida, M. Oizumi, "Fisher information and
    natural gradient learning in random deep networks", AISTATS 2019.
    """
    lam = _check_damping(damping)
    xp = array_namespace(gw, gb, dw, db, cross)
    Dw, Db = dw + lam, (db + lam)[..., None]
    delta_w = (gw * Db - gb[..., None] * cross) / (Dw * Db - cross * cross)
    delta_b = gb / Db[..., 0] - xp.sum(cross * delta_w, axis=-1) / Db[..., 0]
    return delta_w, delta_b


def woodbury(gw: Array, gb: Array, dw: Array, db: Array, cross: Array, damping: float) -> Array:
    """The unit-wise step in O(n): (F̃_u + λI)⁻¹ g with Amari–Karakida–Oizumi's unit block F̃_u.

    F̃_u has F_u's diagonal and bias row/column and weight–weight entries F_jk = c_j c_k / F_bb
    (c_j = F_{b w_j}): with a = (c, F_bb) it is diagonal + rank one,

        F̃_u + λI = D + a aᵀ / F_bb,   D = diag(d_w + λ − c²/F_bb, λ),

    inverted by Sherman–Morrison (Woodbury with rank one):
    x = D⁻¹g − D⁻¹a (aᵀD⁻¹g) / (F_bb + aᵀD⁻¹a).

    Returns
    -------
    (δ_w (U, n), δ_b (U,))

    Notes
    -----
    Cost O(n) per unit; needs λ > 0 (D's bias entry is λ). Exact for the full unit block when
    F_jk = F_jb F_kb / F_bb for j ≠ k (AKO's wide random-network limit: the unit's inputs are
    uncorrelated given its back-propagated signal), for every λ; otherwise an approximation.
    At λ → 0 it tends to :func:`ollivier`'s step, which damps the bias row instead.
    A unit with F_bb = 0 gets the diagonal step.
    """
    lam = _check_damping(damping)
    if lam <= 0:
        raise ValueError(f"damping: the Woodbury unit solve needs damping > 0, got {damping!r}")
    xp = array_namespace(gw, gb, dw, db, cross)
    live = db > 0
    f = xp.where(live, db, xp.ones_like(db))  # a dead unit (F_bb = 0) has a = 0: the diagonal step
    ab = xp.where(live, db, xp.zeros_like(db))
    c = xp.where(live[..., None], cross, xp.zeros_like(cross))
    Dw = dw + lam - c * c / f[..., None]
    # a = (c, a_b); D⁻¹g, D⁻¹a and the two inner products, all elementwise.
    ug = xp.sum(c * gw / Dw, axis=-1) + ab * gb / lam
    ua = xp.sum(c * c / Dw, axis=-1) + ab * ab / lam
    coef = ug / (f + ua)
    return gw / Dw - (c / Dw) * coef[..., None], gb / lam - (ab / lam) * coef


def unit_blocks(g: Array, blocks: Array, damping: float) -> Array:
    """(F_u + λI)⁻¹ g_u for every unit: batched dense solves of (U, S, S) blocks.

    ``g`` is (U, S) (a unit's weights, then its bias); cost O(S³) per unit, fine for S up to a
    few hundred. The blocks are symmetrised first (estimates carry rounding asymmetry).
    """
    return dense(g, blocks, damping)


def dense(g: Array, block: Array, damping: float, *, pinv: bool = False, rtol: float | None = None) -> Array:
    """(F + λI)⁻¹ g (or its pseudo-inverse) for a dense block F (..., S, S) and g (..., S).

    ``pinv=True`` uses the Moore–Penrose pseudo-inverse of F + λI (with ``rtol`` relative
    cut-off, the namespace's default otherwise), so that λ = 0 is allowed for a singular F:
    the step then lies in F's range (Sun's "pseudo-inverse" regularisation).
    """
    lam = _check_damping(damping)
    xp = array_namespace(g, block)
    S = block.shape[-1]
    if g.shape[-1] != S:
        raise ValueError(f"g: expected a trailing axis of size {S}, got shape {tuple(g.shape)}")
    a = (block + xp.matrix_transpose(block)) / 2 + lam * xp.eye(S, dtype=block.dtype, device=device(block))
    if pinv:
        inv = xp.linalg.pinv(a) if rtol is None else xp.linalg.pinv(a, rtol=rtol)
        return xp.matmul(inv, g[..., None])[..., 0]
    return xp.linalg.solve(a, g[..., None])[..., 0]
