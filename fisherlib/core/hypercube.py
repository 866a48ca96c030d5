"""The multi-label core space: C independent Bernoulli labels through a sigmoid (the hypercube).

For logits z of shape (..., C), σ = sigmoid(z) and the Fisher information is diagonal,

    I_C(z) = diag(σ'(z)),   σ' = σ (1 - σ),              (theory.md §1)

with the symmetric factor B = diag(√σ'). ``fim`` returns the diagonal, shape (..., C). A logit
of -inf is a label that is certainly absent (σ' = 0); +inf and NaN are refused.
"""

from __future__ import annotations

from typing import Any

from ._compat import check_logits, check_logits_and_vector
from ._lib import log_sigmoid, restore

Array = Any

__all__ = ["eigvalsh", "factor_matvec", "factor_rmatvec", "fim", "matvec", "probs", "trace"]


def _log_dsigmoid(z, *, xp):
    """log σ'(z) = log σ(z) + log σ(-z)."""
    return log_sigmoid(z, xp=xp) + log_sigmoid(-z, xp=xp)


def probs(z: Array) -> Array:
    """σ(z), elementwise, shape (..., C)."""
    xp, zw, dtype = check_logits(z, softmax=False)
    return restore(xp.exp(log_sigmoid(zw, xp=xp)), dtype, xp=xp)


def fim(z: Array) -> Array:
    """The diagonal of I_C(z): σ'(z) = σ(z)σ(-z), shape (..., C)."""
    xp, zw, dtype = check_logits(z, softmax=False)
    return restore(xp.exp(_log_dsigmoid(zw, xp=xp)), dtype, xp=xp)


def matvec(z: Array, v: Array) -> Array:
    """I_C v = σ' ⊙ v."""
    xp, zw, dtype, vw = check_logits_and_vector(z, v, "v", softmax=False)
    return restore(xp.exp(_log_dsigmoid(zw, xp=xp)) * vw, dtype, xp=xp)


def factor_matvec(z: Array, xi: Array) -> Array:
    """B ξ = √σ' ⊙ ξ, so E[(Bξ)(Bξ)ᵀ] = I_C for unit-variance probes (theory.md §5.3)."""
    xp, zw, dtype, xw = check_logits_and_vector(z, xi, "xi", softmax=False)
    return restore(xp.exp(0.5 * _log_dsigmoid(zw, xp=xp)) * xw, dtype, xp=xp)


def factor_rmatvec(z: Array, u: Array) -> Array:
    """Bᵀ u = √σ' ⊙ u (B is symmetric)."""
    xp, zw, dtype, uw = check_logits_and_vector(z, u, "u", softmax=False)  # not factor_matvec: errors must name ``u``
    return restore(xp.exp(0.5 * _log_dsigmoid(zw, xp=xp)) * uw, dtype, xp=xp)


def eigvalsh(z: Array) -> Array:
    """Eigenvalues of I_C(z), ascending: the sorted σ'(z), shape (..., C)."""
    xp, zw, dtype = check_logits(z, softmax=False)
    return restore(xp.sort(xp.exp(_log_dsigmoid(zw, xp=xp)), axis=-1), dtype, xp=xp)


def trace(z: Array) -> Array:
    """tr I_C = Σ σ'(z), shape (...)."""
    xp, zw, dtype = check_logits(z, softmax=False)
    return restore(xp.sum(xp.exp(_log_dsigmoid(zw, xp=xp)), axis=-1), dtype, xp=xp)
