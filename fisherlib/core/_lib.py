"""Small private helpers shared by the core modules. Every helper takes ``xp`` explicitly."""

from __future__ import annotations

from typing import Any

from ._compat import device

Array = Any


def widen(a: Array, *, xp) -> Array:
    """Reduced precisions (float16, bfloat16) accumulate in float32; other dtypes, integer
    indices included, stay as they are."""
    if not xp.isdtype(a.dtype, "real floating") or a.dtype in (xp.float32, xp.float64):
        return a
    return xp.astype(a, xp.float32)


def restore(x: Array, dtype, *, xp) -> Array:
    """Cast a working-precision result back to the caller's dtype (a no-op when equal)."""
    return x if x.dtype == dtype else xp.astype(x, dtype)


def index_dtype(like: Array, *, xp):
    """The namespace's default integer dtype on ``like``'s device, for indices built by the core:
    int64 where it exists, int32 for JAX with ``jax_enable_x64`` off (asking JAX for int64
    there warns and truncates)."""
    return xp.__array_namespace_info__().default_dtypes(device=device(like))["integral"]


def log_softmax(z: Array, *, xp) -> Array:
    """Stable log-softmax over the last axis; -inf logits give -inf (probability exactly 0).

    The normaliser is log Σ exp(s) = log1p(Σ_{j ≠ argmax} exp(s_j)) with s = z - max z, so that
    log p_max, and hence 1 - p_max = -expm1(log p_max), keep full relative accuracy near a
    one-hot output (log(1 + r) would round r away once r < ε).
    """
    m = xp.max(z, axis=-1, keepdims=True)
    s = z - m
    top = xp.arange(z.shape[-1], device=device(z)) == xp.argmax(z, axis=-1, keepdims=True)
    rest = xp.sum(xp.where(top, xp.zeros_like(s), xp.exp(s)), axis=-1, keepdims=True)
    return s - xp.log1p(rest)


def log_sigmoid(z: Array, *, xp) -> Array:
    """Stable log σ(z) = -softplus(-z) = min(z, 0) - log1p(exp(-|z|))."""
    return xp.minimum(z, xp.zeros_like(z)) - xp.log1p(xp.exp(-xp.abs(z)))


def matmul_vec(a: Array, v: Array, *, xp) -> Array:
    """Batched matrix-vector product a @ v over the last axes: (..., m, n) x (..., n) -> (..., m)."""
    return xp.matmul(a, v[..., None])[..., 0]


def outer(u: Array, v: Array) -> Array:
    """Batched outer product (..., m) x (..., n) -> (..., m, n)."""
    return u[..., :, None] * v[..., None, :]


def with_diagonal(off: Array, diag: Array, *, xp) -> Array:
    """Matrix equal to ``off`` off the diagonal and to ``diag`` (..., n) on it."""
    n = diag.shape[-1]
    eye = xp.eye(n, dtype=xp.bool, device=device(diag))
    return xp.where(eye, diag[..., None, :], off)
