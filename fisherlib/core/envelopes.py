"""Löwner-order envelopes of the simplex FIM (theory.md §3, Lemma 2 and beyond).

    λ_C v_C v_Cᵀ  ⪯  Σ_{top k} λ_j v_j v_jᵀ  ⪯  I_Δ(z)  ⪯  {2 diag(p(1-p)), diag(p), λ_C I}

Each envelope comes in its cheapest exact form (a diagonal as a vector, a low-rank matrix as
eigenpairs, a scalar as one number per row) with ``matvec`` and ``to_dense``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._compat import array_namespace, check_logits, check_vector, device
from ._lib import log_softmax, matmul_vec, restore
from ._secular import _spectrum

Array = Any

__all__ = [
    "DiagonalEnvelope",
    "LowRankEnvelope",
    "ScalarEnvelope",
    "lower_envelope",
    "trimmed_norm",
    "upper_envelope",
]

UPPER_KINDS = ("diag", "diag2", "scalar")


@dataclass(frozen=True)
class DiagonalEnvelope:
    """diag(w) with ``diagonal`` w of shape (..., C)."""

    diagonal: Array

    def matvec(self, v: Array) -> Array:
        check_vector(v, "v", self.diagonal, "diagonal")
        return self.diagonal * v

    def trace(self) -> Array:
        return array_namespace(self.diagonal).sum(self.diagonal, axis=-1)

    def to_dense(self) -> Array:
        xp = array_namespace(self.diagonal)
        eye = xp.eye(self.diagonal.shape[-1], dtype=self.diagonal.dtype, device=device(self.diagonal))
        return eye * self.diagonal[..., None, :]


@dataclass(frozen=True)
class ScalarEnvelope:
    """s I with ``scale`` s of shape (...) and ``size`` C."""

    scale: Array
    size: int

    def matvec(self, v: Array) -> Array:
        return self.scale[..., None] * v

    def trace(self) -> Array:
        return self.scale * self.size

    def to_dense(self) -> Array:
        xp = array_namespace(self.scale)
        eye = xp.eye(self.size, dtype=self.scale.dtype, device=device(self.scale))
        return self.scale[..., None, None] * eye


@dataclass(frozen=True)
class LowRankEnvelope:
    """Σ_k λ_k v_k v_kᵀ with ``eigenvalues`` (..., k) and ``eigenvectors`` (..., C, k)."""

    eigenvalues: Array
    eigenvectors: Array

    def matvec(self, v: Array) -> Array:
        xp = array_namespace(self.eigenvalues)
        V = self.eigenvectors
        coef = matmul_vec(xp.matrix_transpose(V), v, xp=xp)
        return matmul_vec(V, self.eigenvalues * coef, xp=xp)

    def trace(self) -> Array:
        return array_namespace(self.eigenvalues).sum(self.eigenvalues, axis=-1)

    def to_dense(self) -> Array:
        xp = array_namespace(self.eigenvalues)
        V = self.eigenvectors
        return xp.matmul(V * self.eigenvalues[..., None, :], xp.matrix_transpose(V))


def upper_envelope(z: Array, kind: str = "diag"):
    """An upper envelope U ⪰ I_Δ(z).

    Parameters
    ----------
    z : array (..., C)
        Logits.
    kind : {"diag", "diag2", "scalar"}
        "diag": diag(p) (Lemma 2; the gap p pᵀ never vanishes: its norm is ‖p‖² >= 1/C).
        "diag2": 2 diag(p(1 - p)), much tighter near a vertex of the simplex and exact in the
        C = 2 direction. "scalar": λ_C I.

    Returns
    -------
    DiagonalEnvelope or ScalarEnvelope
    """
    if kind not in UPPER_KINDS:
        raise ValueError(f"kind: expected one of {UPPER_KINDS}, got {kind!r}")
    xp, zw, dtype = check_logits(z)
    logp = log_softmax(zw, xp=xp)
    p = xp.exp(logp)
    if kind == "diag":
        return DiagonalEnvelope(restore(p, dtype, xp=xp))
    if kind == "diag2":
        return DiagonalEnvelope(restore(2 * p * -xp.expm1(logp), dtype, xp=xp))
    lam, _ = _spectrum(zw, zw.shape[-1] - 1, steps=None, vectors=False, xp=xp)
    return ScalarEnvelope(restore(lam[..., 0], dtype, xp=xp), zw.shape[-1])


def lower_envelope(z: Array, rank: int = 1) -> LowRankEnvelope:
    """The top-``rank`` spectral truncation L_k = Σ_{j > C-k} λ_j v_j v_jᵀ ⪯ I_Δ(z).

    ``rank=1`` is Lemma 2's λ_C v_C v_Cᵀ; L_k grows with k and equals I_Δ at k = C - 1.
    Cost O(rank · C) per row (only the top roots of the secular equation are solved).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    xp, zw, dtype = check_logits(z)
    C = zw.shape[-1]
    if rank > C:
        raise ValueError(f"rank: expected at most C={C}, got {rank}")
    lam, vec = _spectrum(zw, C - rank, steps=None, vectors=True, xp=xp)
    return LowRankEnvelope(restore(lam, dtype, xp=xp), restore(xp.matrix_transpose(vec), dtype, xp=xp))


def trimmed_norm(z: Array) -> Array:
    """‖p without its largest entry‖₂, shape (...): Lemma 3's control of the lower envelope.

    ‖I_Δ - λ_C v_C v_Cᵀ‖_F <= trimmed_norm(z); it vanishes as p approaches a vertex.
    """
    xp, zw, dtype = check_logits(z)
    p = xp.exp(log_softmax(zw, xp=xp))
    C = p.shape[-1]
    top = xp.argmax(p, axis=-1, keepdims=True)
    idx = xp.arange(C, device=device(p))
    rest = xp.where(idx == top, xp.zeros_like(p), p)
    return restore(xp.sqrt(xp.sum(rest * rest, axis=-1)), dtype, xp=xp)
