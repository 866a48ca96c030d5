"""Kronecker factors of a layer's Fisher block (K-FAC, EK-FAC), written against the Array API.

For a dense layer y = W x̃ (x̃ = [x; 1] when it has a bias, so W holds the bias as its last
column), the gradient of one output's log-likelihood term is g x̃ᵀ, with g the cotangent at y.
Over inputs n and the positions s that share the weight (sequence positions, convolution
patches) the layer's block of F = Σ_n Σ_v vec(Σ_s g_nsv x̃_nsᵀ) vec(·)ᵀ is approximated by

    F_W ≈ A ⊗ G,   A = (1/M) Σ x̃ x̃ᵀ,   G = Σ g gᵀ            (K-FAC),

where, following Eschenhagen et al. (2023), the sums run over

* **expand**: every (input, position) pair, M = N·S: each position is treated as an example
  of its own (the right setting when each position has its own output, as in a language
  model, and the one used by kfac-jax, curvlinops and nngeometry for convolutions);
* **reduce**: every input, with x̄_n = (1/S) Σ_s x̃_ns and ḡ_n = Σ_s g_ns, M = N: exact when
  the S positions of one input share one output (a sequence classifier's pooled head) and
  the inputs' activations do not vary over positions, and S times cheaper in A and G.

With one position (S = 1) both settings are the same. For a dense layer whose output is the
logits, F_W = Σ_n x̃_n x̃_nᵀ ⊗ I(z_n) exactly, so K-FAC is exact when every input has the same
output Fisher I(z_n) (one input, or zero weights as at a zero initialisation) and otherwise
replaces the I(z_n) by their mean: see docs/kfac.md for how far that is on trained models.

The product with a tangent M (O × Ĩ, the layer's weight and bias in *core layout*) is
(A ⊗ G) vec(M) = vec(G M A); the damped inverse goes through the factors' eigenbases
A = Q_A Λ_A Q_Aᵀ, G = Q_G Λ_G Q_Gᵀ:

    (A ⊗ G + λI)⁻¹ vec(M) = vec(Q_G [(Q_Gᵀ M Q_A) ⊘ (λ_G λ_Aᵀ + λ)] Q_Aᵀ),

and EK-FAC (George et al., 2018) keeps the eigenbasis but replaces λ_G λ_Aᵀ by the diagonal
s = Σ_n Σ_v (Q_Gᵀ ∇W_nv Q_A)² of the Fisher in that basis, re-fitted from per-example
gradients. Every function here takes arrays with a leading group axis: (G, O, O) and
(G, Ĩ, Ĩ) factors and (G, O, Ĩ) tangents (G > 1 for grouped convolutions). An embedding's
inputs are one-hot, so its A is diagonal: it is passed as (G, Ĩ) instead of (G, Ĩ, Ĩ).
"""

from __future__ import annotations

import math
from typing import Any

from ._compat import array_namespace, device
from ._lib import widen

Array = Any

__all__ = [
    "SETTINGS",
    "basis_solve",
    "damped_eigenvalues",
    "damped_solve",
    "eigh",
    "ekfac_matvec",
    "ekfac_solve",
    "embedding_input_factor",
    "gradient_factor",
    "input_factor",
    "kron_diagonal",
    "kron_matvec",
    "logdet",
    "refit_inputs",
    "rotate",
    "with_bias",
]

SETTINGS = ("expand", "reduce")


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"setting: expected one of {SETTINGS}, got {setting!r}")


# --------------------------------------------------------------------------- the factors


def with_bias(x: Array) -> Array:
    """x̃ = [x, 1] along the last axis: the bias as one more input that is always 1."""
    xp = array_namespace(x)
    ones = xp.ones((*x.shape[:-1], 1), dtype=x.dtype, device=device(x))
    return xp.concat([x, ones], axis=-1)


def input_factor(x: Array, *, setting: str = "expand", weights: Array | None = None,
                 bias: bool = False) -> tuple[Array, Array]:
    """The input factor's sum Σ x̃ x̃ᵀ per group (G, I, I) and what it is divided by.

    Parameters
    ----------
    x : array (N, S, G, I)
        A dense layer's inputs, with the bias column already appended (:func:`with_bias`) or
        without it and ``bias=True``.
    setting : {"expand", "reduce"}
        Sum over every (input, position), or over inputs of their mean over positions.
    weights : array (N, S), optional
        1 for the positions that count (an output mask), 0 for the others.
    bias : bool
        Append the constant input 1 here. With more rows (N·S) than inputs (expand) the bias
        row and column of A come from the sums of x, and with reduce the 1 is appended after
        the mean over positions, so x is never copied: a convolution's patches are the largest
        array K-FAC touches (the same numbers up to rounding).

    Returns
    -------
    (A_sum, count)
        A = A_sum / count (I + 1 square with ``bias``); count is an array of shape (1,): N·S
        (expand) or N (reduce), or the counted positions (inputs) under ``weights``.
    """
    _check_setting(setting)
    xp = array_namespace(x)
    x = widen(x, xp=xp)
    N, S, G, I = x.shape
    if bias and setting == "expand" and N * S > I + 1:
        return _input_factor_with_bias(x, weights, xp=xp)
    if bias and setting == "expand":
        x = with_bias(x)
        I = I + 1
    if setting == "expand":
        if weights is not None:
            w = xp.astype(weights, x.dtype)
            x = x * xp.sqrt(w)[:, :, None, None]
            count = xp.sum(w)
        else:
            count = xp.asarray(float(N * S), dtype=x.dtype, device=device(x))
        rows = xp.reshape(xp.permute_dims(x, (2, 0, 1, 3)), (G, N * S, I))
    else:
        if weights is not None:
            w = xp.astype(weights, x.dtype)
            per = xp.sum(w, axis=1)  # counted positions of each input
            mean = xp.sum(x * w[:, :, None, None], axis=1) / xp.clip(per, min=1.0)[:, None, None]
            one = per / xp.clip(per, min=1.0)  # the constant input's mean: 1, or 0 without positions
            count = xp.sum(xp.astype(per > 0, x.dtype))
        else:
            mean = xp.mean(x, axis=1)
            one = xp.ones((N,), dtype=x.dtype, device=device(x))
            count = xp.asarray(float(N), dtype=x.dtype, device=device(x))
        if bias:  # appended after the mean over positions: N rows instead of N·S
            mean = xp.concat([mean, xp.broadcast_to(xp.reshape(one, (N, 1, 1)), (N, G, 1))], axis=-1)
        rows = xp.permute_dims(mean, (1, 0, 2))  # (G, N, I)
    A = xp.matmul(xp.matrix_transpose(rows), rows)
    return A, xp.reshape(count, (1,))


def _input_factor_with_bias(x: Array, weights: Array | None, *, xp) -> tuple[Array, Array]:
    """Expand's Σ x̃ x̃ᵀ with x̃ = [x; 1] from x alone: [[Σ x xᵀ, Σ x], [Σ xᵀ, Σ 1]] (weighted by ``weights``)."""
    N, S, G, I = x.shape
    ones = xp.ones((N, S), dtype=x.dtype, device=device(x))
    w = ones if weights is None else xp.astype(weights, x.dtype)
    root = xp.sqrt(w)
    if weights is not None:
        x = x * root[:, :, None, None]
    rows = xp.reshape(xp.permute_dims(x, (2, 0, 1, 3)), (G, N * S, I))
    col = xp.broadcast_to(xp.reshape(root, (1, N * S, 1)), (G, N * S, 1))
    xx = xp.matmul(xp.matrix_transpose(rows), rows)  # (G, I, I)
    xs = xp.matmul(xp.matrix_transpose(rows), col)  # (G, I, 1): Σ √w x = Σ w x over the unweighted x
    count = xp.sum(w)
    corner = xp.broadcast_to(xp.reshape(count, (1, 1, 1)), (G, 1, 1))
    A = xp.concat([xp.concat([xx, xs], axis=-1), xp.concat([xp.matrix_transpose(xs), corner], axis=-1)], axis=-2)
    return A, xp.reshape(count, (1,))


def embedding_input_factor(idx: Array, num: int, *, padding: int | None = None,
                           weights: Array | None = None, dtype: Any = None) -> tuple[Array, Array]:
    """An embedding's input factor: the one-hot inputs give a diagonal A, their counts (1, num).

    Always the expand setting: with reduce the mean of one-hot rows would give a dense
    num × num factor. The padding row (``padding``) gets 0, as its gradient always is.
    """
    xp = array_namespace(idx)
    N, S = idx.shape
    dtype = dtype or xp.float64
    w = xp.ones((N, S), dtype=dtype, device=device(idx)) if weights is None else xp.astype(weights, dtype)
    flat_idx, flat_w = xp.reshape(idx, (-1,)), xp.reshape(w, (-1,))
    table = xp.arange(num, dtype=idx.dtype, device=device(idx))
    counts = xp.zeros((num,), dtype=dtype, device=device(idx))
    step = max(1, (1 << 24) // max(1, num))
    for a in range(0, N * S, step):  # no scatter-add in the Array API: one-hot rows, in chunks
        b = min(a + step, N * S)
        onehot = xp.astype(table[:, None] == flat_idx[None, a:b], dtype)
        counts = counts + xp.matmul(onehot, flat_w[a:b])
    if padding is not None:
        counts = xp.where(table == padding, xp.zeros_like(counts), counts)
    return counts[None, :], xp.reshape(xp.sum(w), (1,))


def gradient_factor(g: Array, *, setting: str = "expand", sum_probes: bool = False) -> Array:
    """The gradient factor Σ g gᵀ per probe (or column) and group: (V, G, O, O), or (1, G, O, O).

    Parameters
    ----------
    g : array (V, N, S, G, O)
        Output cotangents of a layer for V logit cotangents (probes or exact columns).
    setting : {"expand", "reduce"}
        Σ over inputs and positions of g gᵀ, or over inputs of ḡ ḡᵀ with ḡ = Σ_s g.
    sum_probes : bool
        Add the V rows (exact columns, one empirical row) instead of keeping one per probe.
    """
    _check_setting(setting)
    xp = array_namespace(g)
    g = widen(g, xp=xp)
    V, N, S, G, O = g.shape
    if setting == "reduce":
        g = xp.sum(g, axis=2, keepdims=True)
        S = 1
    if S > O:
        # More positions than outputs (a convolution's): Σ_s g gᵀ per input, then Σ_n, which
        # reads g in the layout a convolution's cotangent has (positions last) instead of
        # copying it into (N·S, O) rows; the per-input terms hold N·O² < N·S·O numbers.
        per = xp.permute_dims(g, (0, 3, 1, 4, 2))  # (V, G, N, O, S)
        out = xp.sum(xp.matmul(per, xp.matrix_transpose(per)), axis=2)
    else:
        rows = xp.reshape(xp.permute_dims(g, (0, 3, 1, 2, 4)), (V, G, N * S, O))
        out = xp.matmul(xp.matrix_transpose(rows), rows)
    return xp.sum(out, axis=0, keepdims=True) if sum_probes else out


# --------------------------------------------------------------------------- products


def eigh(factor: Array) -> tuple[Array, Array | None]:
    """(eigenvalues clipped at 0, eigenvectors) of a stack of psd factors (G, d, d).

    A diagonal factor (G, d) is its own eigen-decomposition: (the factor, None).
    """
    xp = array_namespace(factor)
    if factor.ndim == 2:
        return xp.clip(factor, min=0.0), None
    lam, Q = xp.linalg.eigh(factor)
    return xp.clip(lam, min=0.0), Q


def rotate(M: Array, QG: Array | None, QA: Array | None, *, inverse: bool = False) -> Array:
    """Q_Gᵀ M Q_A (or, with ``inverse``, Q_G M Q_Aᵀ) for tangents M (..., G, O, I)."""
    xp = array_namespace(M)
    if QG is not None:
        M = xp.matmul(QG if inverse else xp.matrix_transpose(QG), M)
    if QA is not None:
        M = xp.matmul(M, xp.matrix_transpose(QA) if inverse else QA)
    return M


def kron_matvec(A: Array, G: Array, M: Array) -> Array:
    """(A ⊗ G) vec(M) = vec(G M A) for tangents M (..., G, O, I); A may be diagonal (G, I)."""
    xp = array_namespace(M)
    GM = xp.matmul(G, M)
    if A.ndim == 2:
        return GM * A[:, None, :]
    return xp.matmul(GM, A)


def kron_diagonal(A: Array, G: Array) -> Array:
    """The diagonal of A ⊗ G in core layout (G, O, I): diag(G) diag(A)ᵀ."""
    xp = array_namespace(G)
    dG = xp.linalg.diagonal(G)
    dA = A if A.ndim == 2 else xp.linalg.diagonal(A)
    return dG[:, :, None] * dA[:, None, :]


def _pi(lamA: Array, lamG: Array) -> Array:
    """Martens & Grosse's π per group: √((tr A / dim A) / (tr G / dim G)), 1 where either is 0."""
    xp = array_namespace(lamA)
    a, g = xp.mean(lamA, axis=-1), xp.mean(lamG, axis=-1)
    ok = (a > 0) & (g > 0)
    return xp.where(ok, xp.sqrt(xp.where(ok, a, 1.0) / xp.where(ok, g, 1.0)), xp.ones_like(a))


def damped_eigenvalues(lamA: Array, lamG: Array, damping: float, *, split: bool = False) -> Array:
    """The eigenvalues (G, O, Ĩ) of A ⊗ G + λI, or with ``split`` of Martens & Grosse's
    (A + π√λ I) ⊗ (G + √λ/π I), from the factors' eigenvalues (G, Ĩ) and (G, O).

    The split form is a Kronecker product again (what K-FAC optimizers invert); it is
    A ⊗ G + λI + π√λ A ⊗ I + √λ/π I ⊗ G, which damps more than λI alone.
    """
    if split:
        pi = _pi(lamA, lamG)[:, None]
        root = math.sqrt(damping)
        return (lamG + root / pi)[:, :, None] * (lamA + pi * root)[:, None, :]
    return lamG[:, :, None] * lamA[:, None, :] + damping


def basis_solve(QA: Array | None, QG: Array | None, eigenvalues: Array, M: Array) -> Array:
    """(Q_A ⊗ Q_G) diag(e)⁻¹ (Q_A ⊗ Q_G)ᵀ vec(M): divide by ``eigenvalues`` (G, O, Ĩ) in the eigenbasis."""
    return rotate(rotate(M, QG, QA) / eigenvalues, QG, QA, inverse=True)


def damped_solve(eigA: tuple[Array, Array | None], eigG: tuple[Array, Array], M: Array, damping: float, *,
                 split: bool = False) -> Array:
    """(A ⊗ G + λI)⁻¹ vec(M), or with ``split`` (A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹ (:func:`damped_eigenvalues`).

    ``eigA``, ``eigG``: the factors' :func:`eigh`.
    """
    (lamA, QA), (lamG, QG) = eigA, eigG
    return basis_solve(QA, QG, damped_eigenvalues(lamA, lamG, damping, split=split), M)


def ekfac_matvec(QA: Array | None, QG: Array, s: Array, M: Array) -> Array:
    """(Q_A ⊗ Q_G) diag(s) (Q_A ⊗ Q_G)ᵀ vec(M): EK-FAC's product, s in core layout (G, O, I)."""
    return rotate(rotate(M, QG, QA) * s, QG, QA, inverse=True)


def ekfac_solve(QA: Array | None, QG: Array, s: Array, M: Array, damping: float) -> Array:
    """(EK-FAC + λI)⁻¹ vec(M): divide by s + λ in the eigenbasis."""
    return basis_solve(QA, QG, s + damping, M)


def logdet(eigenvalues: Array, damping: float) -> Array:
    """Σ log(e + λ) over a block's eigenvalues ``eigenvalues`` (any shape)."""
    xp = array_namespace(eigenvalues)
    return xp.sum(xp.log(eigenvalues + damping))


def refit_inputs(x: Array, QA: Array | None) -> Array:
    """Inputs (N, S, G, I) in A's eigenbasis: x Q_A per group (unchanged for a diagonal A)."""
    xp = array_namespace(x)
    if QA is None:
        return x
    return xp.matmul(x[..., None, :], QA[None, None, ...])[..., 0, :]
