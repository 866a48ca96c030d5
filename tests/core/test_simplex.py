"""The softmax core space: products and dense matrices against float64 formulas (theory §1)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from array_api_compat import array_namespace, device
from hypothesis import given
from hypothesis import strategies as st

from fisherlib import simplex
from tests._backends import JAX_NEW_SHAPE, skip_backend, to_numpy, to_xp
from tests.core._reference import (
    eps,
    logits,
    product_tol,
    ref_factor,
    ref_fim,
    ref_log_probs,
    ref_probs,
    seeded_logits,
)


_z = seeded_logits


def _close(actual, expected, tol, *, scale=1.0):
    actual = to_numpy(actual, np.float64)
    assert actual.shape == np.shape(expected)
    err = np.max(np.abs(actual - expected), initial=0.0)
    assert err <= tol * scale, f"max error {err:.3g} > {tol * scale:.3g}"


# ----------------------------------------------------------------------------- dense matrices


@given(data=st.data())
def test_fim_probs_log_probs(xp, data):
    z = data.draw(logits(xp))
    C = z.shape[-1]
    zx = to_xp(z, xp)
    tol = product_tol(C)
    _close(simplex.probs(zx), ref_probs(z), tol)
    _close(simplex.fim(zx), ref_fim(z), tol)
    logp = ref_log_probs(z)
    out = to_numpy(simplex.log_probs(zx))
    assert np.array_equal(np.isneginf(out), np.isneginf(logp))
    finite = np.isfinite(logp)
    # log p = s - log Σ exp(s) with s = z - max z: absolute error ε (|s| + log C) per entry.
    atol = product_tol(C) * (np.abs(logp[finite]) + np.log(C) + 1)
    assert np.all(np.abs(out[finite] - logp[finite]) <= atol)


@given(data=st.data())
def test_factor_dense(xp, data):
    z = data.draw(logits(xp))
    zx = to_xp(z, xp)
    C = z.shape[-1]
    B = simplex.factor(zx)
    _close(B, ref_factor(z), product_tol(C))
    # B Bᵀ = I_Δ exactly (uses Σp = 1).
    Bn = to_numpy(B)
    _close(Bn @ np.swapaxes(Bn, -1, -2), ref_fim(z), product_tol(C))


def test_fim_properties(xp):
    """Symmetric, rows sum to 0 (I 1 = 0), trace = 1 - ‖p‖², psd."""
    z = _z((2, 3, 5), "random")
    F = to_numpy(simplex.fim(to_xp(z, xp)))
    tol = product_tol(5)
    assert np.array_equal(F, np.swapaxes(F, -1, -2))
    assert np.abs(F.sum(axis=-1)).max() <= tol
    p = ref_probs(z)
    assert np.allclose(np.trace(F, axis1=-2, axis2=-1), 1 - (p * p).sum(-1), rtol=0, atol=tol)
    assert np.linalg.eigvalsh(F)[..., 0].min() >= -tol


# ----------------------------------------------------------------------------- products


@given(data=st.data())
def test_products_against_dense(xp, data):
    """matvec = F v, factor_matvec = B ξ, factor_rmatvec = Bᵀ u, with a probe axis in front."""
    z = data.draw(logits(xp))
    C = z.shape[-1]
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    K = 2
    v = rng.normal(size=(K, *z.shape))
    zx, vx = to_xp(z, xp), to_xp(v, xp)
    F, B = ref_fim(z), ref_factor(z)
    scale = np.abs(v).max()
    tol = product_tol(C)
    _close(simplex.matvec(zx, vx), np.einsum("...ij,k...j->k...i", F, v), tol, scale=scale)
    _close(simplex.factor_matvec(zx, vx), np.einsum("...ij,k...j->k...i", B, v), tol, scale=scale)
    _close(simplex.factor_rmatvec(zx, vx), np.einsum("...ji,k...j->k...i", B, v), tol, scale=scale)


@given(data=st.data())
def test_factor_identities(xp, data):
    """B(Bᵀv) = I v, and the trace equals Σ diag and Σ ‖B e_k‖²."""
    z = data.draw(logits(xp))
    C = z.shape[-1]
    v = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).normal(size=z.shape)
    zx, vx = to_xp(z, xp), to_xp(v, xp)
    tol = product_tol(C)
    scale = np.abs(v).max()
    round_trip = simplex.factor_matvec(zx, simplex.factor_rmatvec(zx, vx))
    _close(round_trip, to_numpy(simplex.matvec(zx, vx)), 2 * tol, scale=scale)
    tr = ref_fim(z).trace(axis1=-2, axis2=-1)
    _close(simplex.trace(zx), tr, tol)
    _close(xp.sum(simplex.factor(zx) ** 2, axis=(-2, -1)), tr, tol)


@pytest.mark.parametrize("C", [1, 2, 3, 5, 8])
def test_rademacher_expectation_exact(xp, C):
    """E[(Bξ)(Bξ)ᵀ] = I_Δ over ξ uniform on {±1}^C, as an exact average over all 2^C signs.

    Not statistical: the average of ξξᵀ over all sign vectors is exactly the identity, so the
    average of (Bξ)(Bξ)ᵀ is B Bᵀ = I_Δ up to rounding: 2^C + C terms per entry.
    """
    if C != 5:
        skip_backend(xp, "jax", JAX_NEW_SHAPE)
    z = _z((2, C), "random", seed=C)
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=C)))  # (2^C, C)
    xi = np.broadcast_to(signs[:, None, :], (signs.shape[0], 2, C))
    g = to_numpy(simplex.factor_matvec(to_xp(z, xp), to_xp(xi, xp)))  # (2^C, 2, C)
    second = np.einsum("kni,knj->nij", g, g) / signs.shape[0]
    tol = product_tol(2**C + C)
    assert np.abs(second - ref_fim(z)).max() <= tol
    # ... and the mean of Bξ is 0 (E ξ = 0).
    assert np.abs(g.mean(axis=0)).max() <= tol


# ----------------------------------------------------------------------------- special inputs


def test_special_logits(xp):
    """-inf (p = 0), ±1e4 and equal logits."""
    z = np.array(
        [
            [0.0, -np.inf, 1.0, -np.inf, 0.5],
            [1e4, -1e4, 1e4, 0.0, 1e4 - 1.0],
            [-1e4, -1e4 + 1.0, -1e4 + 2.0, -1e4, -1e4],
            [3.0, 3.0, 3.0, 3.0, 3.0],
            [-np.inf, -np.inf, -np.inf, -np.inf, 7.0],
            [1e4, 1e4, -np.inf, -1e4, 1e4],
        ]
    )
    zx = to_xp(z.reshape(2, 3, 5), xp)
    p = ref_probs(z)
    tol = product_tol(5)
    _close(xp.reshape(simplex.probs(zx), (6, 5)), p, tol)
    F = to_numpy(simplex.fim(zx)).reshape(6, 5, 5)
    _close(F, ref_fim(z), tol)
    # Rows/columns of a class of probability 0 are exactly 0; a vertex gives I_Δ = 0.
    assert np.all(F[0, 1] == 0) and np.all(F[0, :, 3] == 0)
    assert np.all(to_numpy(simplex.factor(zx)).reshape(6, 5, 5)[0, 1] == 0)
    assert np.all(F[4] == 0)
    logp = to_numpy(simplex.log_probs(zx)).reshape(6, 5)
    assert np.all(np.isfinite(logp[1:4]))
    assert np.allclose(F[3], np.eye(5) / 5 - 1 / 25, rtol=0, atol=tol)


def test_one_hot_limit_keeps_relative_accuracy(xp):
    """Near a vertex, p(1 - p) and the trace keep full relative accuracy (1 - p via expm1)."""
    z = _z((2, 3, 5))
    z[0, 0] = [0.0, -40.0, -45.0, -50.0, -60.0]  # 1 - p_1 ≈ 4e-18, far below ε
    p = ref_probs(z)[0, 0]
    rest = np.exp(-40.0) + np.exp(-45.0) + np.exp(-50.0) + np.exp(-60.0)
    one_minus_p1 = rest / (1 + rest)
    tr = to_numpy(simplex.trace(to_xp(z, xp)))[0, 0]
    exact = p[0] * one_minus_p1 + (p[1:] * (1 - p[1:])).sum()
    assert abs(tr - exact) <= 8 * eps("float64") * exact
    F = to_numpy(simplex.fim(to_xp(z, xp)))[0, 0]
    assert abs(F[0, 0] - p[0] * one_minus_p1) <= 8 * eps("float64") * p[0] * one_minus_p1


def test_c1_is_zero(xp):
    """C = 1: one class of probability 1, I_Δ = 0 (a valid input)."""
    skip_backend(xp, "jax", JAX_NEW_SHAPE)
    z = to_xp(np.array([[2.5], [-3.0]]), xp)
    assert np.all(to_numpy(simplex.fim(z)) == 0)
    assert np.all(to_numpy(simplex.trace(z)) == 0)
    assert np.all(to_numpy(simplex.matvec(z, to_xp(np.ones((2, 1)), xp))) == 0)
    assert np.all(to_numpy(simplex.factor_matvec(z, to_xp(np.ones((2, 1)), xp))) == 0)
    assert np.all(to_numpy(simplex.probs(z)) == 1)


# ----------------------------------------------------------------------------- dtype, namespace, device

VECTOR_FUNCTIONS = [simplex.matvec, simplex.factor_matvec, simplex.factor_rmatvec]
MATRIX_FUNCTIONS = [simplex.probs, simplex.log_probs, simplex.fim, simplex.factor, simplex.trace]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("f", MATRIX_FUNCTIONS + VECTOR_FUNCTIONS, ids=lambda f: f.__name__)
def test_namespace_dtype_device_shape(xp, f, dtype):
    z = _z((2, 3, 5))
    zx = to_xp(z, xp, dtype)
    args = (zx, to_xp(np.ones((2, 3, 5)), xp, dtype)) if f in VECTOR_FUNCTIONS else (zx,)
    out = f(*args)
    assert array_namespace(out) is array_namespace(zx)
    assert out.dtype == zx.dtype
    assert device(out) == device(zx)
    expected = {"fim": (2, 3, 5, 5), "factor": (2, 3, 5, 5), "trace": (2, 3)}.get(f.__name__, (2, 3, 5))
    assert tuple(out.shape) == expected


def test_float32_accuracy(xp):
    """float32 in, float32 out, accurate to the float32 product tolerance."""
    z = _z((2, 3, 5)).astype(np.float32)
    zx = to_xp(z, xp, "float32")
    v = np.random.default_rng(1).normal(size=(2, 3, 5)).astype(np.float32)
    vx = to_xp(v, xp, "float32")
    tol = product_tol(5, "float32")
    _close(simplex.fim(zx), ref_fim(z), tol)
    _close(simplex.matvec(zx, vx), np.einsum("...ij,...j->...i", ref_fim(z), v), tol, scale=np.abs(v).max())


def test_mixed_precision_promotes(xp):
    """float32 logits with a float64 vector: the result type of the two (float64)."""
    zx = to_xp(_z((2, 3, 5)), xp, "float32")
    vx = to_xp(np.ones((2, 3, 5)), xp, "float64")
    assert simplex.matvec(zx, vx).dtype == xp.float64
