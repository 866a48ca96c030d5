"""Löwner-order envelopes of I_Δ (theory §3): lower ⪯ I_Δ ⪯ upper, checked with dense eigvalsh.

"A ⪯ B" is checked as λ_min(B - A) >= -eig_tol · max p (tests/core/_reference.py): a computed
envelope is exact for a matrix within the solver's backward error of I_Δ.
"""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace, device
from hypothesis import given
from hypothesis import strategies as st

from fisherlib import simplex
from fisherlib.core.envelopes import DiagonalEnvelope, LowRankEnvelope, ScalarEnvelope
from tests._backends import JAX_NEW_SHAPE, backend_of, skip_backend, to_numpy, to_xp
from tests.core._reference import (
    eig_tol,
    logits,
    lowner_min,
    max_p,
    product_tol,
    ref_fim,
    ref_probs,
    seeded_logits,
)


_z = seeded_logits


def _ranks(data, C, xp):
    """1, C - 1, C and one drawn in between; on JAX only 1 and C (each rank is a new shape
    to compile, seconds each; the rank logic is backend-independent)."""
    if backend_of(xp) == "jax":
        return sorted({1, C})
    return sorted({1, max(C - 1, 1), C, data.draw(st.integers(1, C))})


@given(data=st.data())
def test_lower_envelopes_are_below_and_increase(xp, data):
    """L_k ⪯ I_Δ for every k, L_k ⪯ L_{k'} for k < k', and L_{C-1} = L_C = I_Δ."""
    z = data.draw(logits(xp))
    C = z.shape[-1]
    F = ref_fim(z)
    tol = eig_tol(C) * max_p(z)[..., 0]
    previous = np.zeros_like(F)
    for k in _ranks(data, C, xp):
        env = simplex.lower_envelope(to_xp(z, xp), rank=k)
        assert isinstance(env, LowRankEnvelope)
        assert tuple(env.eigenvalues.shape) == (*z.shape[:-1], k)
        assert tuple(env.eigenvectors.shape) == (*z.shape, k)
        L = to_numpy(env.to_dense())
        assert np.all(lowner_min(F - L) >= -tol), f"L_{k} is not below I_Δ"
        assert np.all(lowner_min(L - previous) >= -tol), f"L_{k} is not above the smaller ranks"
        previous = L
        if k >= C - 1:
            assert np.all(np.abs(L - F).max(axis=(-2, -1)) <= tol), f"L_{k} differs from I_Δ"


@given(data=st.data(), kind=st.sampled_from(["diag", "diag2", "scalar"]))
def test_upper_envelopes_are_above(xp, data, kind):
    """diag(p), 2 diag(p(1-p)) and λ_C I are all ⪰ I_Δ."""
    z = data.draw(logits(xp))
    C = z.shape[-1]
    env = simplex.upper_envelope(to_xp(z, xp), kind=kind)
    U = to_numpy(env.to_dense())
    tol = eig_tol(C) * max_p(z)[..., 0]
    assert np.all(lowner_min(U - ref_fim(z)) >= -tol), f"{kind} is not above I_Δ"
    p = ref_probs(z)
    if kind == "diag":
        assert isinstance(env, DiagonalEnvelope)
        assert np.allclose(to_numpy(env.diagonal), p, rtol=0, atol=product_tol(C))
    elif kind == "diag2":
        assert isinstance(env, DiagonalEnvelope)
        assert np.allclose(to_numpy(env.diagonal), 2 * p * (1 - p), rtol=0, atol=product_tol(C))
    else:
        assert isinstance(env, ScalarEnvelope) and env.size == C
        lam = np.linalg.eigvalsh(ref_fim(z))[..., -1]
        assert np.all(np.abs(to_numpy(env.scale) - lam) <= tol)


@given(data=st.data())
def test_envelope_matvec_and_trace_match_dense(xp, data):
    z = data.draw(logits(xp))
    C = z.shape[-1]
    zx = to_xp(z, xp)
    v = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).normal(size=z.shape)
    vx = to_xp(v, xp)
    envs = [simplex.upper_envelope(zx, kind) for kind in ("diag", "diag2", "scalar")]
    envs += [simplex.lower_envelope(zx, rank=1), simplex.lower_envelope(zx, rank=C)]
    tol = product_tol(C) * np.abs(v).max()
    for env in envs:
        D = to_numpy(env.to_dense())
        out = env.matvec(vx)
        assert array_namespace(out) is array_namespace(zx)
        assert np.allclose(to_numpy(out), np.einsum("...ij,...j->...i", D, v), rtol=0, atol=tol)
        tr = to_numpy(env.trace())
        assert np.allclose(tr, np.trace(D, axis1=-2, axis2=-1), rtol=0, atol=product_tol(C))


@given(data=st.data())
def test_trimmed_norm_controls_lower_envelope(xp, data):
    """‖I_Δ - λ_C v vᵀ‖_F <= ‖p without its largest entry‖₂ = trimmed_norm (Lemma 3, theory §3)."""
    z = data.draw(logits(xp))
    C = z.shape[-1]
    zx = to_xp(z, xp)
    trim = to_numpy(simplex.trimmed_norm(zx))
    p = np.sort(ref_probs(z), axis=-1)
    assert np.allclose(trim, np.linalg.norm(p[..., :-1], axis=-1), rtol=0, atol=product_tol(C))
    L1 = to_numpy(simplex.lower_envelope(zx, rank=1).to_dense())
    F = ref_fim(z)
    err = np.linalg.norm(F - L1, axis=(-2, -1))
    tol = np.sqrt(C) * eig_tol(C) * max_p(z)[..., 0]  # Frobenius of C x C entries
    assert np.all(err <= trim + tol)
    # tr I_Δ - λ_C = Σ_{i<C} λ_i <= 1 - p_(C) - p_(1)   (theory §3)
    lam = np.linalg.eigvalsh(F)
    if C > 1:
        assert np.all(lam[..., :-1].sum(-1) <= 1 - p[..., -1] - p[..., 0] + tol)


def test_upper_gap_is_p_p_transpose(xp):
    """diag(p) - I_Δ = p pᵀ: its norms equal ‖p‖² >= 1/C (the gap never vanishes)."""
    z = _z((2, 3, 5))
    zx = to_xp(z, xp)
    p = ref_probs(z)
    gap = to_numpy(simplex.upper_envelope(zx, "diag").to_dense()) - to_numpy(simplex.fim(zx))
    assert np.allclose(gap, p[..., :, None] * p[..., None, :], rtol=0, atol=product_tol(5))
    assert np.all(np.linalg.norm(gap, axis=(-2, -1)) >= 1 / 5 - product_tol(5))


def test_diag2_exact_in_c2_direction(xp):
    """At C = 2, 2 diag(p(1-p)) - I_Δ vanishes on (1, -1): the diag2 envelope is tight there."""
    skip_backend(xp, "jax", JAX_NEW_SHAPE)
    z = _z((2, 3, 5))[..., :2].copy()
    U = to_numpy(simplex.upper_envelope(to_xp(z, xp), "diag2").to_dense())
    d = np.array([1.0, -1.0])
    assert np.abs(d @ (U - ref_fim(z)) @ d).max() <= product_tol(2)


def test_lower_envelope_rank1_is_top_pair(xp):
    """L_1 = λ_C v_C v_Cᵀ with the pair of top_eigpair."""
    z = _z((2, 3, 5))
    zx = to_xp(z, xp)
    env = simplex.lower_envelope(zx)
    top, v = (to_numpy(a) for a in simplex.top_eigpair(zx))
    assert np.array_equal(to_numpy(env.eigenvalues)[..., 0], top)
    expected = top[..., None, None] * v[..., :, None] * v[..., None, :]
    assert np.allclose(to_numpy(env.to_dense()), expected, rtol=0, atol=product_tol(5))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_envelopes_keep_namespace_dtype_device(xp, dtype):
    z = to_xp(_z((2, 3, 5)), xp, dtype)
    arrays = [
        simplex.upper_envelope(z, "diag").diagonal,
        simplex.upper_envelope(z, "diag2").diagonal,
        simplex.upper_envelope(z, "scalar").scale,
        simplex.lower_envelope(z, rank=5).eigenvalues,
        simplex.lower_envelope(z, rank=5).eigenvectors,
        simplex.lower_envelope(z, rank=5).to_dense(),
        simplex.upper_envelope(z, "scalar").to_dense(),
        simplex.upper_envelope(z, "diag").to_dense(),
        simplex.trimmed_norm(z),
    ]
    for a in arrays:
        assert array_namespace(a) is array_namespace(z)
        assert a.dtype == z.dtype
        assert device(a) == device(z)


def test_c1_envelopes(xp):
    """C = 1: I_Δ = 0, and every envelope is 0 (diag(p) = [1] is still an upper envelope)."""
    skip_backend(xp, "jax", JAX_NEW_SHAPE)
    z = to_xp(np.array([[1.5], [-2.0]]), xp)
    assert np.all(to_numpy(simplex.lower_envelope(z).to_dense()) == 0)
    assert np.all(to_numpy(simplex.upper_envelope(z, "diag2").to_dense()) == 0)
    assert np.all(to_numpy(simplex.upper_envelope(z, "scalar").to_dense()) == 0)
    assert np.all(to_numpy(simplex.upper_envelope(z, "diag").diagonal) == 1)
    assert np.all(to_numpy(simplex.trimmed_norm(z)) == 0)
