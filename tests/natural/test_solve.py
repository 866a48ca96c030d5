"""Each structured solve of fisherlib.natural against a dense float64 solve of the same damped matrix."""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib import natural
from tests._backends import to_numpy, to_xp

U, N = 4, 6  # units, fan-in


def _psd_blocks(rng, units=U, size=N + 1, rank=None):
    a = rng.normal(size=(units, size, rank or 2 * size))
    return a @ np.swapaxes(a, -1, -2) / a.shape[-1]


def _parts(F):
    """(diag of weights, diag of bias, bias-weight terms) of unit blocks (weights first, bias last)."""
    d = np.diagonal(F, axis1=-2, axis2=-1)
    return d[:, :-1], d[:, -1], F[:, :-1, -1]


def _arrowhead_dense(F, lam):
    dw, db, c = _parts(F)
    A = np.zeros_like(F)
    for u in range(F.shape[0]):
        A[u] = np.diag(np.r_[dw[u], db[u]]) + lam * np.eye(N + 1)
        A[u, :-1, -1] = A[u, -1, :-1] = c[u]
    return A


def _ako_dense(F, lam):
    """Amari–Karakida–Oizumi's unit block: F's damped diagonal and bias row, F_jk ≈ c_j c_k / D_b."""
    A = _arrowhead_dense(F, lam)
    c, Db = A[:, :-1, -1], A[:, -1, -1]
    off = c[:, :, None] * c[:, None, :] / Db[:, None, None]
    eye = np.eye(N, dtype=bool)
    A[:, :-1, :-1] = np.where(eye, A[:, :-1, :-1], off)
    return A


@pytest.mark.parametrize("lam", [1e-3, 0.5])
def test_diagonal(xp, lam):
    rng = np.random.default_rng(0)
    g, d = rng.normal(size=(3, 5)), rng.uniform(size=(3, 5))
    got = to_numpy(natural.diagonal(to_xp(g, xp), to_xp(d, xp), lam))
    np.testing.assert_allclose(got, np.linalg.solve(np.diag(d.ravel() + lam), g.ravel()).reshape(3, 5), rtol=1e-12)


@pytest.mark.parametrize("lam", [1e-2, 1.0])
def test_arrowhead_is_the_exact_solve_of_the_quasi_diagonal_matrix(xp, lam):
    rng = np.random.default_rng(1)
    F = _psd_blocks(rng)
    # Scale the cross terms down so the arrowhead part is positive definite, as is typical.
    F[:, :-1, -1] *= 0.3
    F[:, -1, :-1] *= 0.3
    g = rng.normal(size=(U, N + 1))
    dw, db, c = _parts(F)
    dW, dB = natural.arrowhead(*(to_xp(a, xp) for a in (g[:, :-1], g[:, -1], dw, db, c)), lam)
    ref = np.linalg.solve(_arrowhead_dense(F, lam), g[..., None])[..., 0]
    np.testing.assert_allclose(to_numpy(dW), ref[:, :-1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_numpy(dB), ref[:, -1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lam", [1e-2, 1.0])
def test_ollivier_is_the_exact_inverse_of_the_ako_block(xp, lam):
    rng = np.random.default_rng(2)
    F = _psd_blocks(rng)
    g = rng.normal(size=(U, N + 1))
    dw, db, c = _parts(F)
    dW, dB = natural.ollivier(*(to_xp(a, xp) for a in (g[:, :-1], g[:, -1], dw, db, c)), lam)
    A = _ako_dense(F, lam)
    assert np.all(np.linalg.eigvalsh(A) > 0)  # psd whenever F is
    ref = np.linalg.solve(A, g[..., None])[..., 0]
    np.testing.assert_allclose(to_numpy(dW), ref[:, :-1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_numpy(dB), ref[:, -1], rtol=1e-9, atol=1e-12)
    # Ollivier's written form: δ_j = (g_j D_b − g_b c_j) / (D_j D_b − c_j²), δ_b = g_b/D_b − Σ c_j δ_j / D_b.
    Dw, Db = dw + lam, db + lam
    dj = (g[:, :-1] * Db[:, None] - g[:, -1:] * c) / (Dw * Db[:, None] - c ** 2)
    np.testing.assert_allclose(to_numpy(dW), dj, rtol=1e-9)
    np.testing.assert_allclose(to_numpy(dB), g[:, -1] / Db - np.sum(c * dj, axis=1) / Db, rtol=1e-9, atol=1e-12)


def _ako_block(rng, correlated: bool):
    """E[δ² x̃x̃ᵀ] with x̃ = (x, 1): independent x_j give F_jk = F_jb F_kb / F_bb (j ≠ k)."""
    mean, var = rng.normal(size=N), rng.uniform(0.5, 2, size=N)
    M = np.outer(np.r_[mean, 1], np.r_[mean, 1]) + np.diag(np.r_[var, 0])
    if correlated:
        L = rng.normal(size=(N, N))
        M[:-1, :-1] += L @ L.T
    return 0.7 * M[None]


@pytest.mark.parametrize("lam", [1e-3, 0.5])
def test_woodbury_against_the_dense_ako_matrix(xp, lam):
    rng = np.random.default_rng(3)
    F = _psd_blocks(rng)
    g = rng.normal(size=(U, N + 1))
    dw, db, c = _parts(F)
    dW, dB = natural.woodbury(*(to_xp(a, xp) for a in (g[:, :-1], g[:, -1], dw, db, c)), lam)
    # The matrix: F's diagonal and bias row, F_jk -> c_j c_k / F_bb, plus λI.
    A = _arrowhead_dense(F, 0.0)
    off = c[:, :, None] * c[:, None, :] / db[:, None, None]
    A[:, :-1, :-1] = np.where(np.eye(N, dtype=bool), A[:, :-1, :-1], off)
    ref = np.linalg.solve(A + lam * np.eye(N + 1), g[..., None])[..., 0]
    np.testing.assert_allclose(to_numpy(dW), ref[:, :-1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(to_numpy(dB), ref[:, -1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("lam", [1e-3, 0.5])
def test_woodbury_is_exact_for_the_full_block_when_inputs_are_uncorrelated(lam):
    """AKO's structure makes the O(n) step the full block's solve; a deliberately violated
    assumption (correlated inputs) must show as a difference."""
    rng = np.random.default_rng(3)
    g = rng.normal(size=(1, N + 1))
    for correlated in (False, True):
        F = _ako_block(rng, correlated)
        dw, db, c = _parts(F)
        full = np.linalg.solve(F[0] + lam * np.eye(N + 1), g[0])
        dW, dB = natural.woodbury(g[:, :-1], g[:, -1], dw, db, c, lam)
        err = np.linalg.norm(np.r_[dW[0], dB[0]] - full) / np.linalg.norm(full)
        assert (err < 1e-9) if not correlated else (err > 1e-2)
    # Ollivier's step is the same at λ = 0 (it damps the bias row instead).
    F = _ako_block(rng, False)
    dw, db, c = _parts(F)
    dW, dB = natural.ollivier(g[:, :-1], g[:, -1], dw, db, c, 0.0)
    np.testing.assert_allclose(np.r_[dW[0], dB[0]], np.linalg.solve(F[0], g[0]), rtol=1e-8)


def test_woodbury_dead_unit_gets_the_diagonal_step():
    g, dw = np.ones((1, 3)), np.full((1, 3), 2.0)
    dW, dB = natural.woodbury(g, np.ones(1), dw, np.zeros(1), np.zeros((1, 3)), 0.5)
    np.testing.assert_allclose(dW, 1 / 2.5)
    np.testing.assert_allclose(dB, 1 / 0.5)
    with pytest.raises(ValueError, match="damping > 0"):
        natural.woodbury(g, np.ones(1), dw, np.ones(1), np.zeros((1, 3)), 0.0)


@pytest.mark.parametrize("lam", [1e-3, 0.3])
def test_unit_blocks_and_dense(xp, lam):
    rng = np.random.default_rng(4)
    F = _psd_blocks(rng, rank=3)  # singular: rank 3 < 7
    g = rng.normal(size=(U, N + 1))
    got = to_numpy(natural.unit_blocks(to_xp(g, xp), to_xp(F, xp), lam))
    ref = np.linalg.solve(F + lam * np.eye(N + 1), g[..., None])[..., 0]
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)
    got = to_numpy(natural.dense(to_xp(g[0], xp), to_xp(F[0], xp), lam))
    np.testing.assert_allclose(got, ref[0], rtol=1e-8, atol=1e-10)


def test_dense_pinv_handles_a_singular_block_without_damping(xp):
    rng = np.random.default_rng(5)
    F = _psd_blocks(rng, units=1, size=5, rank=2)[0]
    g = rng.normal(size=5)
    got = to_numpy(natural.dense(to_xp(g, xp), to_xp(F, xp), 0.0, pinv=True, rtol=1e-10))
    np.testing.assert_allclose(got, np.linalg.pinv(F, rcond=1e-10) @ g, rtol=1e-7, atol=1e-9)
    # The step lies in F's range: F F⁺ g = projection of g.
    P = F @ np.linalg.pinv(F, rcond=1e-10)
    np.testing.assert_allclose(P @ got, got, atol=1e-8)


def test_bad_damping_is_named():
    with pytest.raises(ValueError, match="damping"):
        natural.diagonal(np.ones(2), np.ones(2), -1.0)
    with pytest.raises(ValueError, match="g: expected a trailing axis"):
        natural.dense(np.ones(3), np.eye(2), 0.1)


def test_arrowhead_definite_flags_an_indefinite_quasi_diagonal_matrix():
    """Inputs that are nearly constant make the bias row dominate: the arrowhead part of a psd
    block is then indefinite, which arrowhead_definite reports (checked with eigvalsh)."""
    rng = np.random.default_rng(6)
    x = np.c_[1 + 0.01 * rng.normal(size=(50, N)), np.ones(50)]  # x̃ = (x, 1)
    F = (x.T @ x / 50)[None]
    for lam, F_ in ((1e-3, F), (1e-3, _psd_blocks(rng, units=1) * np.r_[np.ones(N) * 3, 0.1][None, :, None])):
        dw, db, c = _parts(F_)
        ok = natural._solve.arrowhead_definite(dw, db, c, lam)
        assert bool(ok[0]) == bool(np.all(np.linalg.eigvalsh(_arrowhead_dense(F_, lam)) > 0))
    dw, db, c = _parts(F)
    assert not natural._solve.arrowhead_definite(dw, db, c, 1e-3)[0]
