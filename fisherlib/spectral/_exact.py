"""F's nonzero spectrum exactly, from the smaller of F (P × P) and its Gram matrix (R × R).

F = Aᵀ A with the rows of A the pulled-back factor columns J_xᵀ B_x e_c (C per input, B Bᵀ =
I(z_x); for the bounds diag(√p) or √λ_j v_j). The R × R Gram matrix G = A Aᵀ = Bᵀ J Jᵀ B has the
same nonzero eigenvalues as the P × P matrix F, so tr F = tr G, ‖F‖_F = ‖G‖_F and
λ_max(F) = λ_max(G), and F's eigenvectors are Aᵀu/√λ for G's eigenpairs (λ, u). Whichever of
P and R is smaller is decomposed: F itself, summed from chunks of rows (A is never held), when
P ≤ R; G otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core import cotangents
from ..estimators import _fisher
from ..estimators._batches import n_of, slice_tree
from ..estimators._estimate import _to_numpy
from ._operator import FisherOperator

Array = Any

__all__ = ["GramSpectrum", "gram_spectrum"]

# Entries of A (rows x parameters) held at most; per-example chunks of 2^24 entries.
MAX_ELEMENTS = 1 << 25
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class GramSpectrum:
    """F's eigenvalues from the smaller side: ``eigenvalues`` (descending, float64, the top
    min(R, P)) and ``side``: "gram" (R < P: the factor ``A`` (R, P) in the parameters'
    namespace and G's eigenvectors ``U``) or "primal" (P ≤ R: ``U`` holds F's eigenvectors,
    ``A`` is None)."""

    eigenvalues: np.ndarray
    A: Array
    U: np.ndarray
    side: str = "gram"

    def eigenvectors(self, k: int, op: FisherOperator) -> Array:
        """F's top-k unit eigenvectors (k, P): Aᵀ u_i / √λ_i, or F's own."""
        xp = op.xp
        if self.side == "primal":
            return op.asarray(np.ascontiguousarray(self.U[:, :k].T))
        lam = np.maximum(self.eigenvalues[:k], 1e-300)
        Uk = op.asarray(np.ascontiguousarray((self.U[:, :k] / np.sqrt(lam)).T))
        Y = xp.matmul(Uk, self.A)
        return Y / xp.linalg.vector_norm(Y, axis=1, keepdims=True)


def n_rows(op: FisherOperator) -> int:
    """R: the rows of A, (C, or ``rank`` for F_LB) × inputs."""
    M = op.rank if op.bound == "lower" else op._forward(0)[0].shape[-1]
    return M * sum(n_of(inputs) for inputs, _ in op.batches)


def row_chunks(op: FisherOperator):
    """The rows of A in chunks (r, P): the factor columns of every input pulled back."""
    xp, be = op.xp, op.backend
    n_total = sum(n_of(inputs) for inputs, _ in op.batches)
    scale = 1.0 / n_total ** 0.5 if op.reduction == "mean" else None
    for b, (inputs, _) in enumerate(op.batches):
        logits, _ = op._forward(b)
        z, C = _fisher._check_logits(logits, b, op.likelihood)
        if logits.ndim != 2:
            raise ValueError(f"batches: the exact spectrum needs logits (N, C), got {tuple(logits.shape)}")
        cols = cotangents.exact_columns(z, op.likelihood, op.bound, op.rank)  # (M, N, C)
        M, N = cols.shape[0], cols.shape[1]
        chunk = max(1, _CHUNK_ELEMENTS // max(1, M * op.n_params))
        for i in range(0, N, chunk):
            g = be.per_example_vjp(op.model, op.params, slice_tree(inputs, i, i + chunk), cols[:, i:i + chunk, :])
            rows = xp.reshape(op.flatten(g), (-1, op.n_params))
            yield rows if scale is None else rows * scale
    op.n_inputs = n_total


def factor_rows(op: FisherOperator) -> Array:
    """A (R, P): the factor columns of every input pulled back, R = (C or rank) · inputs."""
    return op.xp.concat(list(row_chunks(op)), axis=0)


def gram_spectrum(op: FisherOperator, *, max_elements: int = MAX_ELEMENTS) -> GramSpectrum:
    r"""F's nonzero eigenvalues exactly, through F (P ≤ R) or its Gram matrix Bᵀ J Jᵀ B (R < P).

    Parameters
    ----------
    op : FisherOperator
        Its logits must be (N, C); its backend needs per-example VJPs.
    max_elements : int
        Refuse (ValueError) when the matrix held, min(R, P) × P (F itself, or the factor A),
        would have more entries.

    Notes
    -----
    **Cost**: R = M·N per-example VJP rows (M = C, or ``rank`` for F_LB), 2·R·P·n flops to form
    the n × n matrix, n = min(R, P), and its eigendecomposition in float64 on the host, about
    10·n³ flops; memory n·P. Exact up to rounding: no bias, no variance. Decomposing the smaller
    side matters: for a CNN with P = 1,898 on 1,297 inputs (R = 12,970) the Gram matrix's
    eigendecomposition is ~300 times the work of F's.
    """
    R, P = n_rows(op), op.n_params
    if min(R, P) * P > max_elements:
        raise ValueError(f"max_elements: the exact spectrum holds a {min(R, P)} x {P} matrix "
                         f"({min(R, P) * P:,} entries; R = {R} factor rows, P = {P} parameters), more "
                         f"than max_elements = {max_elements:,}; use the Lanczos / Hutchinson estimates "
                         "instead (method=\"estimate\")")
    xp = op.xp
    if P <= R:  # F = Σ_chunks A_cᵀ A_c, P × P
        F = None
        for rows in row_chunks(op):
            part = xp.matmul(xp.matrix_transpose(rows), rows)
            F = part if F is None else F + part
        F = _finite(np.asarray(_to_numpy(F), dtype=np.float64))
        w, V = np.linalg.eigh((F + F.T) / 2)
        return GramSpectrum(np.clip(w[::-1], 0.0, None), None, V[:, ::-1], side="primal")
    A = factor_rows(op)
    G = _finite(np.asarray(_to_numpy(xp.matmul(A, xp.matrix_transpose(A))), dtype=np.float64))
    w, U = np.linalg.eigh((G + G.T) / 2)
    return GramSpectrum(np.clip(w[::-1], 0.0, None), A, U[:, ::-1])


def _finite(M: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(M)):
        raise ValueError("batches: the Fisher has non-finite entries (inf or NaN): an input or a parameter "
                         "holds inf or NaN, or the model's gradients overflowed")
    return M
