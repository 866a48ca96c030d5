"""The softmax core space: the probability simplex with logits as coordinates.

For logits z of shape (..., C), p = softmax(z) and the Fisher information of the categorical
distribution in logit coordinates is

    I_Δ(z) = diag(p) - p pᵀ,                         (theory.md §1)

with the factor B = diag(√p) - p √pᵀ, so that B Bᵀ = I_Δ (uses Σp = 1). The products
``matvec`` (I v), ``factor_matvec`` (B ξ) and ``factor_rmatvec`` (Bᵀ u) never form a C x C
matrix; ``fim`` and ``factor`` do, for tests and for the exact estimator.

Every function takes logits from any Array API namespace and returns arrays of the same
namespace, device and floating dtype. float16 and bfloat16 compute in float32. A logit of -inf
is a class of probability exactly 0.
"""

from __future__ import annotations

from typing import Any

from ._compat import check_logits, check_logits_and_vector
from ._lib import log_softmax, outer, restore, with_diagonal
from .envelopes import lower_envelope, trimmed_norm, upper_envelope
from .spectrum import eigh, eigvalsh, interlacing_bounds, lambda_max_bounds, top_eigpair

Array = Any

__all__ = [
    "eigh",
    "eigvalsh",
    "factor",
    "factor_matvec",
    "factor_rmatvec",
    "fim",
    "interlacing_bounds",
    "lambda_max_bounds",
    "log_probs",
    "lower_envelope",
    "matvec",
    "probs",
    "top_eigpair",
    "trace",
    "trimmed_norm",
    "upper_envelope",
]


def log_probs(z: Array) -> Array:
    """log p = log_softmax(z), computed stably (logits of ±1e4 and -inf are fine).

    Parameters
    ----------
    z : array (..., C)
        Logits.

    Returns
    -------
    array (..., C)
    """
    xp, zw, dtype = check_logits(z)
    return restore(log_softmax(zw, xp=xp), dtype, xp=xp)


def probs(z: Array) -> Array:
    """p = softmax(z) over the last axis.

    Parameters
    ----------
    z : array (..., C)
        Logits.

    Returns
    -------
    array (..., C)
        Probabilities; exactly 0 where a logit is -inf.
    """
    xp, zw, dtype = check_logits(z)
    return restore(xp.exp(log_softmax(zw, xp=xp)), dtype, xp=xp)


def fim(z: Array) -> Array:
    """Dense Fisher information I_Δ = diag(p) - p pᵀ, shape (..., C, C).

    The diagonal p(1 - p) uses 1 - p = -expm1(log p), accurate near one-hot outputs. Prefer
    :func:`matvec` unless the matrix itself is needed.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherlib import simplex
    >>> simplex.fim(np.log(np.array([0.5, 0.5])))
    array([[ 0.25, -0.25],
           [-0.25,  0.25]])
    """
    xp, zw, dtype = check_logits(z)
    logp = log_softmax(zw, xp=xp)
    p = xp.exp(logp)
    return restore(with_diagonal(-outer(p, p), p * -xp.expm1(logp), xp=xp), dtype, xp=xp)


def factor(z: Array) -> Array:
    """Dense factor B = diag(√p) - p √pᵀ, shape (..., C, C), with B Bᵀ = I_Δ.

    Column k is B e_k: the cotangent whose vector-Jacobian product gives the k-th column of
    the Jacobian factor Jᵀ B, as the exact estimator needs.
    """
    xp, zw, dtype = check_logits(z)
    logp = log_softmax(zw, xp=xp)
    p, sp = xp.exp(logp), xp.exp(0.5 * logp)
    return restore(with_diagonal(-outer(p, sp), sp - p * sp, xp=xp), dtype, xp=xp)


def matvec(z: Array, v: Array) -> Array:
    """I_Δ v = p ⊙ v - p (pᵀ v), without forming the matrix.

    Parameters
    ----------
    z : array (..., C)
        Logits.
    v : array (..., C)
        Vectors; leading axes broadcast against those of ``z`` (a probe axis in front is fine).

    Returns
    -------
    array, the broadcast shape of ``z`` and ``v``
    """
    xp, zw, dtype, vw = check_logits_and_vector(z, v, "v")
    p = xp.exp(log_softmax(zw, xp=xp))
    pv = p * vw
    return restore(pv - p * xp.sum(pv, axis=-1, keepdims=True), dtype, xp=xp)


def factor_matvec(z: Array, xi: Array) -> Array:
    """B ξ = √p ⊙ ξ - p (√p · ξ), the Hutchinson cotangent (theory.md §5.1).

    With ξ Rademacher or standard normal, E[(Bξ)(Bξ)ᵀ] = I_Δ.

    Parameters
    ----------
    z : array (..., C)
        Logits.
    xi : array (..., C)
        Probes; leading axes broadcast against those of ``z``.
    """
    xp, zw, dtype, xw = check_logits_and_vector(z, xi, "xi")
    # p = e / Z and √p = √e / √Z from one exp, updated in place: five fresh arrays of z's size
    # instead of sixteen through log_softmax (on a CPU each costs more than its arithmetic). The
    # result is an absolute-accuracy difference, so log_softmax's care for 1 - p_max buys nothing.
    p = xp.exp(zw - xp.max(zw, axis=-1, keepdims=True))
    total = xp.sum(p, axis=-1, keepdims=True)
    sp = xp.sqrt(p)
    sp *= 1.0 / xp.sqrt(total)
    p *= 1.0 / total
    return restore(apply_factor(p, sp, xw, xp=xp), dtype, xp=xp)


def apply_factor(p: Array, sp: Array, xi: Array, *, xp) -> Array:
    """B ξ = √p ⊙ ξ − p (√p · ξ) from p and √p, both overwritten where the shapes allow.

    One probe (``xi`` shaped like p, or with one leading axis of 1) reuses the buffers of √p and
    p: no fresh array the size of the logits.
    """
    if tuple(xi.shape) == tuple(sp.shape) or (xi.ndim == sp.ndim + 1 and xi.shape[0] == 1
                                                and tuple(xi.shape[1:]) == tuple(sp.shape)):
        a = xp.reshape(sp, xi.shape)
        a *= xi
        p = xp.reshape(p, xi.shape)
        p *= xp.sum(a, axis=-1, keepdims=True)
        a -= p
        return a
    a = sp * xi  # once: it is both the first term and what the second one sums
    a -= p * xp.sum(a, axis=-1, keepdims=True)
    return a


def factor_rmatvec(z: Array, u: Array) -> Array:
    """Bᵀ u = √p ⊙ u - √p (p · u).

    Parameters
    ----------
    z : array (..., C)
        Logits.
    u : array (..., C)
        Vectors; leading axes broadcast against those of ``z``.
    """
    xp, zw, dtype, uw = check_logits_and_vector(z, u, "u")
    logp = log_softmax(zw, xp=xp)
    sp = xp.exp(0.5 * logp)
    return restore(sp * (uw - xp.sum(xp.exp(logp) * uw, axis=-1, keepdims=True)), dtype, xp=xp)


def trace(z: Array) -> Array:
    """tr I_Δ = 1 - ‖p‖² = Σ p_i (1 - p_i), accurate near one-hot outputs. Shape (...)."""
    xp, zw, dtype = check_logits(z)
    logp = log_softmax(zw, xp=xp)
    return restore(xp.sum(xp.exp(logp) * -xp.expm1(logp), axis=-1), dtype, xp=xp)
