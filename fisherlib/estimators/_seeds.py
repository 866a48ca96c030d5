"""Seeds of the probe draws: one 32-bit seed per (user seed, batch or step, stream)."""

from __future__ import annotations

import math
from typing import Any

from ..core._compat import array_namespace, device

Array = Any

_MASK = (1 << 64) - 1


def derive(*keys: int) -> int:
    """A 32-bit seed from non-negative integer ``keys`` by a SplitMix64 chain.

    Distinct keys give independent-looking seeds (SplitMix64's finaliser is a bijection with
    full avalanche), at a microsecond per call: NumPy's ``SeedSequence`` cost 50-80 µs, a
    visible share of a small training step that draws a probe every step.
    """
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & _MASK)) + 0x9E3779B97F4A7C15 & _MASK
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 31
    return h >> 32


_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def derive_array(*keys: Any) -> Array:
    """:func:`derive` where keys may be integer arrays (a traced step count inside ``jax.jit``):
    the same 32-bit seed, as a uint32 array of the keys' namespace, from SplitMix64 written in
    pairs of uint32 words (no uint64 needed: JAX's default configuration has none).

    Integer keys are taken modulo 2⁶⁴; array keys (all of one shape) are non-negative and below 2³²
    (cast to uint32); the result has their shape.
    """
    arrays = [k for k in keys if not isinstance(k, int)]
    if not arrays:
        raise TypeError("keys: derive_array needs at least one array key; use derive for integers")
    xp = array_namespace(*arrays)
    shape, dev = tuple(arrays[0].shape), device(arrays[0])
    flat = (max(1, math.prod(shape)),)  # words kept 1-d: NumPy's 0-d results are scalars, which warn on wrapping

    def const(c: int) -> tuple[Array, Array]:
        c &= _MASK
        return (xp.full(flat, c >> 32, dtype=xp.uint32, device=dev), xp.full(flat, c & 0xFFFFFFFF, dtype=xp.uint32, device=dev))

    h = const(_GOLDEN)
    for k in keys:
        if isinstance(k, int):
            kh, kl = const(k)
        else:
            kl = xp.reshape(xp.astype(k, xp.uint32), flat)
            kh = xp.zeros_like(kl)
        h = _add((h[0] ^ kh, h[1] ^ kl), const(_GOLDEN), xp)
        h = _mul(_xor_shift(h, 30), const(_M1), xp)
        h = _mul(_xor_shift(h, 27), const(_M2), xp)
        h = _xor_shift(h, 31)
    return xp.reshape(h[0], shape)


def _add(a, b, xp):
    lo = a[1] + b[1]  # uint32 sums wrap
    return a[0] + b[0] + xp.astype(lo < a[1], xp.uint32), lo


def _xor_shift(h, s: int):
    """h ^ (h >> s) for 0 < s < 32 on (high, low) words."""
    hi, lo = h
    return hi ^ (hi >> s), lo ^ ((lo >> s) | (hi << (32 - s)))


def _mul(a, c, xp):
    """a · c mod 2⁶⁴ on (high, low) words: the low words' full product from 16-bit halves."""
    a1, a0, c1, c0 = a[1] >> 16, a[1] & 0xFFFF, c[1] >> 16, c[1] & 0xFFFF
    p00, p01, p10, p11 = a0 * c0, a0 * c1, a1 * c0, a1 * c1  # each below 2³²
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
    lo = (p00 & 0xFFFF) | (mid << 16)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16) + a[0] * c[1] + a[1] * c[0]
    return hi, lo
