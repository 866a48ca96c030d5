"""F's nonzero spectrum exactly, from the Gram matrix of its factor (small data).

F = Aᵀ A with the rows of A the pulled-back factor columns J_xᵀ B_x e_c (C per input, B Bᵀ =
I(z_x); for the bounds diag(√p) or √λ_j v_j). The R × R Gram matrix G = A Aᵀ = Bᵀ J Jᵀ B has the
same nonzero eigenvalues as the P × P matrix F, so tr F = tr G, ‖F‖_F = ‖G‖_F and
λ_max(F) = λ_max(G), and F's eigenvectors are Aᵀu/√λ for G's eigenpairs (λ, u).
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
    """F's eigenvalues from the Gram matrix: ``eigenvalues`` (descending, float64, the top
    min(R, P)), the factor ``A`` (R, P) in the parameters' namespace and G's eigenvectors ``U``."""

    eigenvalues: np.ndarray
    A: Array
    U: np.ndarray

    def eigenvectors(self, k: int, op: FisherOperator) -> Array:
        """F's top-k unit eigenvectors (k, P): Aᵀ u_i / √λ_i."""
        xp = op.xp
        lam = np.maximum(self.eigenvalues[:k], 1e-300)
        Uk = op.asarray(np.ascontiguousarray((self.U[:, :k] / np.sqrt(lam)).T))
        Y = xp.matmul(Uk, self.A)
        return Y / xp.linalg.vector_norm(Y, axis=1, keepdims=True)


def factor_rows(op: FisherOperator) -> Array:
    """A (R, P): the factor columns of every input pulled back, R = (C or rank) · inputs."""
    xp, be = op.xp, op.backend
    rows, n_total = [], 0
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
            rows.append(xp.reshape(op.flatten(g), (-1, op.n_params)))
        n_total += N
    A = xp.concat(rows, axis=0)
    op.n_inputs = n_total
    return A / (n_total ** 0.5) if op.reduction == "mean" else A


def gram_spectrum(op: FisherOperator, *, max_elements: int = MAX_ELEMENTS) -> GramSpectrum:
    r"""F's nonzero eigenvalues exactly, through the R × R Gram matrix Bᵀ J Jᵀ B.

    Parameters
    ----------
    op : FisherOperator
        Its logits must be (N, C); its backend needs per-example VJPs.
    max_elements : int
        Refuse (ValueError) when A, R × P, would hold more entries.

    Notes
    -----
    **Cost**: R = M·N per-example VJPs (M = C, or ``rank`` for F_LB), memory R·P for A, then an
    R × R eigendecomposition in float64 on the host, O(R³). Exact up to rounding: no bias, no
    variance.
    """
    M = op.rank if op.bound == "lower" else op._forward(0)[0].shape[-1]
    R = M * sum(n_of(inputs) for inputs, _ in op.batches)
    if R * op.n_params > max_elements:
        raise ValueError(f"max_elements: the exact spectrum needs a {R} x {op.n_params} factor "
                         f"({R * op.n_params:,} entries), more than max_elements = {max_elements:,}; "
                         "use the Lanczos / Hutchinson estimates instead")
    A = factor_rows(op)
    G = np.asarray(_to_numpy(op.xp.matmul(A, op.xp.matrix_transpose(A))), dtype=np.float64)
    w, U = np.linalg.eigh((G + G.T) / 2)
    keep = min(G.shape[0], op.n_params)
    return GramSpectrum(np.clip(w[::-1][:keep], 0.0, None), A, U[:, ::-1][:, :keep])

