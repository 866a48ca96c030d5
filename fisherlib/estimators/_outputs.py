"""What a batch's outputs count: positions, masks, ignored labels, one column per position.

Logits may carry positions between the inputs and the classes, (N, T, C) for token
classification or a language model (any number of position axes). Each position is one
output distribution, so the Fisher is token-level:

    F = Σ_n Σ_t m_nt J_ntᵀ I(z_nt) J_nt,

with m_nt = 1 for counted positions: those the mask keeps (the batch's ``"attention_mask"`` or
``mask=``) and, when the batch has per-position labels, whose label is not ``ignore_index``.
Masked positions enter through zero cotangents: one multiply per stack, here, never in the
adapters. Array API only; no framework is imported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..core._compat import array_namespace, device, is_eager, is_writeable_array

Array = Any

__all__ = ["by_position", "masked", "positions", "weights"]


def positions(shape: tuple[int, ...]) -> int:
    """The number of output distributions per input: the product of the position axes."""
    return math.prod(shape[1:-1])


def weights(inputs: Any, labels: Any, logits: Array, *, mask: str | Callable | None, ignore_index: int | None,
            likelihood: str, b: int, needed: bool = True) -> tuple[Array | None, Any]:
    """(m, labels): the 0/1 weight of every output, flattened (N·T,), or None when all count,
    and the labels flattened like the logits' rows, ignored ones set to class 0.

    ``needed``: the method uses the labels, so labels of the wrong shape are an error (else
    they are ignored). ``mask``: a key of dict inputs (a missing key, or a mask shaped like the inputs rather than
    the outputs of a sequence classifier's (N, C) logits, is not an output mask), a callable
    ``mask(inputs)``, or None.
    """
    xp = array_namespace(logits)
    shape = tuple(logits.shape)
    want = shape[:-1]
    m = None
    if callable(mask):
        m = _array(mask(inputs), logits, f"mask: batch {b}'s mask")
        if tuple(m.shape) != want:
            raise ValueError(f"mask: batch {b}'s mask has shape {tuple(m.shape)}; expected the logits' "
                             f"leading shape {want} (inputs and positions)")
    elif isinstance(mask, str):
        if isinstance(inputs, Mapping) and mask in inputs:
            m = _array(inputs[mask], logits, f"mask: batch {b}'s {mask!r}")
            if tuple(m.shape) != want:
                if len(shape) == 2:  # a sequence classifier: the mask is the inputs', not the outputs'
                    m = None
                else:
                    raise ValueError(
                        f"mask: batch {b}'s {mask!r} has shape {tuple(m.shape)}, but the logits "
                        f"{shape} have positions {want}; pass mask=None, or a callable mask(inputs) "
                        "giving the outputs' mask")
    elif mask is not None:
        raise TypeError(f"mask: expected the name of the mask's entry in dict batches, a callable "
                        f"mask(inputs), or None, got {type(mask).__name__}")
    if m is not None:
        m = xp.reshape(xp.astype(m != 0, logits.dtype), (-1,))
    if labels is None:
        return m, None
    try:
        y = _array(labels, logits, f"batches: batch {b} labels")
    except TypeError:
        if needed:
            raise
        return m, None
    ywant = want if likelihood == "softmax" else shape
    if tuple(y.shape) != ywant:
        if not needed:  # labels only a method that uses them must match; others ignore them
            return m, None
        raise ValueError(f"batches: batch {b} labels have shape {tuple(y.shape)}; expected {ywant} for "
                         f"logits of shape {shape} and likelihood={likelihood!r}")
    if likelihood == "softmax":
        y = xp.reshape(y, (-1,))
        if ignore_index is not None and (not is_eager(y) or bool(xp.any(y == ignore_index))):
            keep = y != ignore_index
            y = y * xp.astype(keep, y.dtype)  # ignored labels become class 0; their weight is 0
            keep = xp.astype(keep, logits.dtype)
            m = keep if m is None else m * keep
    else:
        y = xp.reshape(y, (-1, shape[-1]))
    return m, y


def masked(cts: Iterable[Array], m: Array, shape: tuple[int, ...]) -> Iterable[Array]:
    """Every cotangent stack (V, *shape) times the outputs' weights ``m`` (N·T,).

    A list holds stacks the estimator made for this batch (one random cotangent): they are
    multiplied in place where the namespace allows (JAX rebinds), so that a language model's
    masked cotangent is not a second N·T·V array beside the first.
    """
    xp = array_namespace(m)
    w = xp.reshape(m, (1, *shape[:-1], 1))
    if isinstance(cts, list):
        out = []
        for c in cts:
            if is_writeable_array(c):
                c *= xp.astype(w, c.dtype)
            else:
                c = c * xp.astype(w, c.dtype)
            out.append(c)
        return out
    return (c * xp.astype(w, c.dtype) for c in cts)


def by_position(cts: Iterable[Array], shape: tuple[int, ...], budget: int) -> Iterator[Array]:
    """One column per position: a stack (V, N, T, C) becomes (V·T, N, T, C), row (v, t) holding
    position t of row v and zeros elsewhere, yielded a few positions at a time (``budget``
    elements per stack).

    For the per-example products of a deterministic method (the empirical Fisher): squaring
    Σ_t J_ntᵀ u_nt would add every pair of positions' cross terms; one column per position
    keeps the token-level sum Σ_t (J_ntᵀ u_nt)(J_ntᵀ u_nt)ᵀ.
    """
    N, C, T = shape[0], shape[-1], positions(shape)
    for ct in cts:
        xp = array_namespace(ct)
        V = ct.shape[0]
        flat = xp.reshape(ct, (V, N, T, C))
        step = max(1, min(T, budget // max(1, V * N * T * C)))
        at = xp.arange(T, device=device(ct))
        for t0 in range(0, T, step):
            s = min(T, t0 + step) - t0
            pick = xp.astype(at[None, :] == xp.arange(t0, t0 + s, device=device(ct))[:, None], ct.dtype)
            out = flat[:, None, ...] * pick[None, :, None, :, None]  # (V, s, N, T, C)
            yield xp.reshape(out, (V * s, *shape))


def count(m: Array | None, shape: tuple[int, ...]) -> int | Array:
    """How many outputs were counted: Σ m, or all N·T of them (a traced Σ m under ``jax.jit``)."""
    if m is None:
        return math.prod(shape[:-1])
    xp = array_namespace(m)
    total = xp.sum(m)
    return int(round(float(total))) if is_eager(total) else total


def _array(x: Any, like: Array, what: str) -> Array:
    """``x`` as an array of ``like``'s namespace, on its device."""
    xp = array_namespace(like)
    try:
        if type(x) is type(like):
            return x
        return xp.asarray(np.asarray(x), device=device(like))
    except Exception as e:  # noqa: BLE001 - any conversion failure is a bad array
        raise TypeError(f"{what} could not be read as an array: {e}") from None
