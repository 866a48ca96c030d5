"""The multi-label sigmoid core space: I_C = diag(σ'(z)) with B = diag(√σ') (theory §1)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from array_api_compat import array_namespace, device
from hypothesis import given
from hypothesis import strategies as st

from fisherlib import hypercube
from tests._backends import JAX_NEW_SHAPE, skip_backend, to_numpy, to_xp
from tests.core._reference import eps, logits, make_logits, product_tol, ref_dsigmoid

# Every entry is one σ'(z) = exp(log σ(z) + log σ(-z)): a handful of roundings, each relative
# (the log-sigmoids are evaluated without cancellation), so 8 ε relative covers it.
REL = 8 * eps("float64")


def _close_rel(actual, expected, rel):
    actual = to_numpy(actual, np.float64)
    assert actual.shape == np.shape(expected)
    assert np.all(np.abs(actual - expected) <= rel * np.abs(expected)), np.abs(actual - expected).max()


@given(data=st.data())
def test_fim_probs_eigvalsh_trace(xp, data):
    z = data.draw(logits(xp))
    zx = to_xp(z, xp)
    d = ref_dsigmoid(z)
    _close_rel(hypercube.fim(zx), d, REL)
    with np.errstate(over="ignore"):
        sigma = 1 / (1 + np.exp(-z))
    _close_rel(hypercube.probs(zx), sigma, REL)
    _close_rel(hypercube.eigvalsh(zx), np.sort(d, axis=-1), REL)
    tr = to_numpy(hypercube.trace(zx))
    assert np.all(np.abs(tr - d.sum(-1)) <= product_tol(z.shape[-1]) * d.sum(-1))


@given(data=st.data())
def test_products(xp, data):
    """I v = σ' ⊙ v, B ξ = √σ' ⊙ ξ = Bᵀ ξ, and B(Bᵀ v) = I v."""
    z = data.draw(logits(xp))
    v = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).normal(size=(2, *z.shape))
    zx, vx = to_xp(z, xp), to_xp(v, xp)
    d = ref_dsigmoid(z)
    _close_rel(hypercube.matvec(zx, vx), d * v, REL)
    _close_rel(hypercube.factor_matvec(zx, vx), np.sqrt(d) * v, REL)
    _close_rel(hypercube.factor_rmatvec(zx, vx), np.sqrt(d) * v, REL)
    _close_rel(hypercube.factor_matvec(zx, hypercube.factor_rmatvec(zx, vx)), d * v, 2 * REL)


@pytest.mark.parametrize("C", [1, 3, 6])
def test_rademacher_expectation_exact(xp, C):
    """E[(Bξ)(Bξ)ᵀ] = diag(σ') over all 2^C sign vectors (exact, not statistical)."""
    if C != 3:
        skip_backend(xp, "jax", JAX_NEW_SHAPE)
    z = make_logits(np.random.default_rng(C), (C,), "random")
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=C)))
    g = to_numpy(hypercube.factor_matvec(to_xp(z, xp), to_xp(signs, xp)))
    second = g.T @ g / signs.shape[0]
    assert np.abs(second - np.diag(ref_dsigmoid(z))).max() <= product_tol(2**C)


def test_extreme_logits(xp):
    """±1e4 and -inf: σ' underflows to 0 without NaN; a label that is certainly absent is fine."""
    z = np.zeros((2, 3, 5))
    z[0, 0] = [1e4, -1e4, 0.0, -np.inf, 40.0]
    z[1, 2] = -np.inf  # a row of all -inf is valid here (every label absent): I_C = 0
    zx = to_xp(z, xp)
    out = to_numpy(hypercube.fim(zx))
    assert np.all(np.isfinite(out))
    row = out[0, 0]
    assert row[0] == 0 and row[1] == 0 and row[3] == 0
    assert row[2] == 0.25
    assert abs(row[4] - np.exp(-40.0)) <= REL * np.exp(-40.0)  # no cancellation in 1 - σ
    assert to_numpy(hypercube.probs(zx))[0, 0, 3] == 0
    assert np.all(out[1, 2] == 0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "f",
    [hypercube.probs, hypercube.fim, hypercube.eigvalsh, hypercube.trace, hypercube.matvec, hypercube.factor_matvec],
    ids=lambda f: f.__name__,
)
def test_namespace_dtype_device(xp, f, dtype):
    z = to_xp(make_logits(np.random.default_rng(0), (2, 3, 5), "random"), xp, dtype)
    args = (z, z) if f in (hypercube.matvec, hypercube.factor_matvec) else (z,)
    out = f(*args)
    assert array_namespace(out) is array_namespace(z)
    assert out.dtype == z.dtype
    assert device(out) == device(z)
    assert tuple(out.shape) == ((2, 3) if f is hypercube.trace else (2, 3, 5))


def test_float32_relative_accuracy(xp):
    z = make_logits(np.random.default_rng(1), (2, 3, 5), "random").astype(np.float32)
    out = to_numpy(hypercube.fim(to_xp(z, xp, "float32")), np.float64)
    d = ref_dsigmoid(z.astype(np.float64))
    assert np.all(np.abs(out - d) <= 8 * eps("float32") * d)
