"""``lambda_max_bounds`` against the formula its docstring documents (core/spectrum.py), not
only against λ_C: with a = p_(C), b = p_(C-1),

    lower = max{b, a(1 - a), (t + √(t² - 4ab(1 - a - b)))/2},  t = a(1 - a) + b(1 - b)
    upper = min{a, 1 - ‖p‖², a + b - ‖p‖²}

computed here in float64 NumPy from sorted probabilities (issue 11: the existing test checked
that the bounds hold, which a looser pair would also pass)."""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib import simplex
from tests._backends import to_numpy, to_xp


def documented(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    p = np.sort(e / e.sum(-1, keepdims=True), axis=-1)
    a = p[..., -1]
    b = p[..., -2] if p.shape[-1] > 1 else np.zeros_like(a)
    t = a * (1 - a) + b * (1 - b)
    block = (t + np.sqrt(np.maximum(t * t - 4 * a * b * (1 - a - b), 0))) / 2
    norm2 = (p * p).sum(-1)
    lower = np.maximum(np.maximum(b, a * (1 - a)), block)
    upper = np.minimum(np.minimum(a, 1 - norm2), a + b - norm2)
    return lower, upper


@pytest.mark.parametrize("C", [1, 2, 3, 10])
def test_lambda_max_bounds_follow_the_documented_formula(xp, C):
    rng = np.random.default_rng(C)
    z = np.concatenate([rng.normal(size=(20, C)) * s for s in (0.3, 2.0, 6.0)])
    z[0] = 0.0  # uniform
    lo, hi = (to_numpy(b) for b in simplex.lambda_max_bounds(to_xp(z, xp)))
    want_lo, want_hi = documented(z)
    np.testing.assert_allclose(lo, want_lo, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(hi, want_hi, rtol=1e-12, atol=1e-15)
    if C >= 3:  # each term matters somewhere: the bounds are not just one of the candidates
        e = np.exp(z - z.max(-1, keepdims=True))
        p = np.sort(e / e.sum(-1, keepdims=True), axis=-1)
        assert np.any(want_hi < p[:, -1] - 1e-9) and np.any(want_lo > p[:, -2] + 1e-9)
