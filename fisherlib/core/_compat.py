"""The core's one door to array-api-compat, and the checks every public core function shares.

Nothing here imports a framework: the namespace always comes from the arrays themselves.
"""

from __future__ import annotations

import sys
from typing import Any

from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_jax_array,
    is_lazy_array,
    is_writeable_array,
)

__all__ = [
    "array_namespace",
    "as_floating",
    "check_logits",
    "compute_dtype",
    "device",
    "is_eager",
    "is_lazy_array",
    "is_writeable_array",
    "namespace_of",
]

Array = Any


def namespace_of(**named: Array):
    """The one Array API namespace of the named arrays; a TypeError names them if they differ."""
    for name, x in named.items():
        if not is_array_api_obj(x):
            raise TypeError(f"{name}: expected an array, got {type(x).__module__}.{type(x).__name__}")
    try:
        return array_namespace(*named.values())
    except TypeError:
        kinds = ", ".join(f"{n} is {type(x).__module__}.{type(x).__name__}" for n, x in named.items())
        raise TypeError(
            f"{' and '.join(named)}: arrays from different namespaces ({kinds}); "
            "convert them to one framework first"
        ) from None


def _is_real_floating(xp, dtype) -> bool:
    try:
        if xp.isdtype(dtype, "real floating"):
            return True
        if xp.isdtype(dtype, "complex floating"):
            return False
    except (TypeError, ValueError):
        pass
    try:  # bfloat16 and friends: floating for finfo, not always for isdtype
        xp.finfo(dtype)
    except (TypeError, ValueError, AttributeError):  # array-api-compat's finfo(int64) raises AttributeError
        return False
    return not xp.isdtype(dtype, ("integral", "bool"))


def compute_dtype(xp, dtype):
    """Working dtype: float32 and float64 as they are; reduced precisions compute in float32."""
    if dtype in (xp.float32, xp.float64):
        return dtype
    return xp.float32


def as_floating(x: Array, name: str, xp) -> Array:
    """Check that ``x`` has a real floating dtype and return it unchanged."""
    if not _is_real_floating(xp, x.dtype):
        raise TypeError(f"{name}: expected a real floating dtype, got {x.dtype}")
    return x


def check_logits(z: Array, name: str = "z", *, softmax: bool = True):
    """Validate logits of shape (..., C) and return ``(xp, z_work, out_dtype)``.

    ``z_work`` is ``z`` in its working dtype (float32 for float16/bfloat16). Value checks
    (NaN, +inf, rows without a finite logit) run on eager arrays only, so that the core traces
    under ``jax.jit``.
    """
    xp = namespace_of(**{name: z})
    as_floating(z, name, xp)
    if z.ndim == 0:
        raise ValueError(f"{name}: expected shape (..., C) with a trailing class axis, got a 0-d array")
    if z.shape[-1] == 0:
        raise ValueError(f"{name}: the class axis (the last one) has size 0; need C >= 1")
    out_dtype = z.dtype
    work = compute_dtype(xp, out_dtype)
    if work != out_dtype:
        z = xp.astype(z, work)
    if is_eager(z):
        problem = logits_problem(z, xp, softmax=softmax)
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
    return xp, z, out_dtype


LOGITS_PROBLEMS = (None, "contains NaN", "contains +inf; only -inf (a class of probability 0) is allowed",
                   "a row has every logit equal to -inf, so no class has positive probability", "contains -inf")
"""What :func:`logits_problem` says, indexed by :func:`logits_problem_code`."""


def logits_problem_code(z: Array, xp, *, softmax: bool = True, finite: bool = False) -> Array:
    """:func:`logits_problem` as an index into :data:`LOGITS_PROBLEMS` (0: none), a 0-d integer
    array computed without reading values on the host: it traces (a compiled step's check)."""
    top = xp.max(z, axis=-1)
    code = xp.where(xp.any(xp.isnan(top)), 1, xp.where(xp.any(top == xp.inf), 2, 0))
    if softmax:
        code = xp.where((code == 0) & xp.any(top == -xp.inf), 3, code)
    if finite:
        code = xp.where((code == 0) & xp.any(xp.min(z, axis=-1) == -xp.inf), 4, code)
    return code


def logits_problem(z: Array, xp, *, softmax: bool = True, finite: bool = False) -> str | None:
    """What is wrong with the values of eager logits ``z`` (..., C), or None.

    One pass over ``z``: NaN propagates through ``max`` (Array API), so the row maxima show a
    NaN, a +inf and a row of -inf alike. ``finite`` also refuses -inf (a second pass, for
    ``min``).
    """
    top = xp.max(z, axis=-1)
    ok = xp.isfinite(top) if softmax else ~xp.isnan(top) & (top != xp.inf)
    if not bool(xp.all(ok)):  # one device sync for well-formed logits; which problem, only if any
        if bool(xp.any(xp.isnan(top))):
            return "contains NaN"
        if bool(xp.any(top == xp.inf)):
            return "contains +inf; only -inf (a class of probability 0) is allowed"
        return "a row has every logit equal to -inf, so no class has positive probability"
    if finite and bool(xp.any(xp.min(z, axis=-1) == -xp.inf)):
        return "contains -inf"
    return None


def is_eager(x: Array) -> bool:
    """Whether ``x``'s values can be read now: not lazy, or a concrete (untraced) JAX array.

    array-api-compat calls every JAX array lazy; only a tracer (inside ``jax.jit``, ``grad``,
    ``vmap``) really is, so concrete JAX arrays get the value checks like any eager array.
    ``jax`` is looked up in ``sys.modules``, never imported: a JAX array means it is loaded.
    """
    if not is_lazy_array(x):
        return True
    if is_jax_array(x):
        tracer = getattr(getattr(sys.modules.get("jax"), "core", None), "Tracer", None)
        return tracer is not None and not isinstance(x, tracer)
    return False


def check_vector(v: Array, name: str, z: Array, zname: str = "z"):
    """Validate a vector argument (..., C) against logits ``z``; return (v_work, result dtype)."""
    xp = namespace_of(**{zname: z, name: v})
    as_floating(v, name, xp)
    if v.ndim == 0 or v.shape[-1] != z.shape[-1]:
        shape = tuple(v.shape)
        raise ValueError(f"{name}: expected a trailing axis of size C={z.shape[-1]}, got shape {shape}")
    return v


def check_logits_and_vector(z: Array, v: Array, name: str, *, softmax: bool = True):
    """Validate logits and a vector argument; return (xp, z_work, result dtype, v_work).

    The result dtype promotes both inputs; the work happens in its working precision.
    """
    xp, zw, zdtype = check_logits(z, softmax=softmax)
    check_vector(v, name, z)
    dtype = xp.result_type(zdtype, v.dtype)
    work = compute_dtype(xp, dtype)
    return xp, xp.astype(zw, work, copy=False), dtype, xp.astype(v, work, copy=False)
