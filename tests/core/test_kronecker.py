"""fisherlib.core.kronecker against dense float64 NumPy, on every backend (the ``xp`` fixture).

The products are checked against ``np.kron`` in the row-major vec order of a (G, O, Ĩ)
tangent (vec(G M A) = (G ⊗ Aᵀ) vec(M) row-major), the factors against explicit loops.
"""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib.core import kronecker
from tests._backends import to_numpy, to_xp


def _psd(rng, G, d, rank=None):
    B = rng.normal(size=(G, d, rank or d))
    return B @ np.swapaxes(B, -1, -2)


def _dense(A, G):
    """(G·O·Ĩ)² block-diagonal matrix of A ⊗ G acting on row-major vec(M), M (groups, O, Ĩ)."""
    blocks = [np.kron(g, a if a.ndim == 2 else np.diag(a)) for a, g in zip(A, G)]
    n = sum(b.shape[0] for b in blocks)
    out, at = np.zeros((n, n)), 0
    for b in blocks:
        out[at:at + b.shape[0], at:at + b.shape[0]] = b
        at += b.shape[0]
    return out


@pytest.fixture
def factors():
    rng = np.random.default_rng(0)
    A, G = _psd(rng, 2, 4), _psd(rng, 2, 3, rank=2)  # G singular: the damping matters
    M = rng.normal(size=(2, 3, 4))
    return A, G, M


def test_kron_matvec_and_diagonal(xp, factors):
    A, G, M = factors
    out = to_numpy(kronecker.kron_matvec(to_xp(A, xp), to_xp(G, xp), to_xp(M, xp)))
    np.testing.assert_allclose(out.ravel(), _dense(A, G) @ M.ravel(), rtol=1e-12)
    d = to_numpy(kronecker.kron_diagonal(to_xp(A, xp), to_xp(G, xp)))
    np.testing.assert_allclose(d.ravel(), np.diag(_dense(A, G)), rtol=1e-12)


def test_diagonal_input_factor_products(xp):
    rng = np.random.default_rng(1)
    a, G, M = rng.uniform(0.5, 2, size=(1, 5)), _psd(rng, 1, 3), rng.normal(size=(1, 3, 5))
    out = to_numpy(kronecker.kron_matvec(to_xp(a, xp), to_xp(G, xp), to_xp(M, xp)))
    np.testing.assert_allclose(out.ravel(), _dense(a, G) @ M.ravel(), rtol=1e-12)
    eA, eG = kronecker.eigh(to_xp(a, xp)), kronecker.eigh(to_xp(G, xp))
    assert eA[1] is None
    x = to_numpy(kronecker.damped_solve(eA, eG, to_xp(M, xp), 0.1))
    np.testing.assert_allclose(x.ravel(), np.linalg.solve(_dense(a, G) + 0.1 * np.eye(15), M.ravel()), rtol=1e-10)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_damped_solve_is_the_dense_inverse(xp, factors, damping):
    A, G, M = factors
    eA, eG = kronecker.eigh(to_xp(A, xp)), kronecker.eigh(to_xp(G, xp))
    x = to_numpy(kronecker.damped_solve(eA, eG, to_xp(M, xp), damping))
    ref = np.linalg.solve(_dense(A, G) + damping * np.eye(24), M.ravel())
    np.testing.assert_allclose(x.ravel(), ref, rtol=1e-9, atol=1e-12)


def test_split_damping_is_the_inverse_of_damped_factors(xp, factors):
    """Martens & Grosse: (A + π√λ I) ⊗ (G + √λ/π I), π² = (tr A / dim A) / (tr G / dim G)."""
    A, G, M = factors
    lam = 0.3
    eA, eG = kronecker.eigh(to_xp(A, xp)), kronecker.eigh(to_xp(G, xp))
    x = to_numpy(kronecker.damped_solve(eA, eG, to_xp(M, xp), lam, split=True))
    pi = np.sqrt((np.trace(A, axis1=1, axis2=2) / 4) / (np.trace(G, axis1=1, axis2=2) / 3))
    Ad = np.stack([a + p * np.sqrt(lam) * np.eye(4) for a, p in zip(A, pi)])
    Gd = np.stack([g + np.sqrt(lam) / p * np.eye(3) for g, p in zip(G, pi)])
    ref = np.linalg.solve(_dense(Ad, Gd), M.ravel())
    np.testing.assert_allclose(x.ravel(), ref, rtol=1e-9)
    plain = np.linalg.solve(_dense(A, G) + lam * np.eye(24), M.ravel())
    assert not np.allclose(ref, plain)  # the split form is a different (stronger) damping


def test_ekfac_products_and_logdet(xp, factors):
    A, G, M = factors
    rng = np.random.default_rng(2)
    QA, QG = np.linalg.eigh(A)[1], np.linalg.eigh(G)[1]
    S = rng.uniform(0.1, 2.0, size=(2, 3, 4))
    # the dense EK-FAC block: (Q_G ⊗ Q_A) diag(S) (Q_G ⊗ Q_A)ᵀ in row-major vec order
    Q = np.block([[np.kron(QG[g], QA[g]) if g == h else np.zeros((12, 12)) for h in range(2)] for g in range(2)])
    dense = Q @ np.diag(S.ravel()) @ Q.T
    args = [to_xp(a, xp) for a in (QA, QG, S, M)]
    np.testing.assert_allclose(to_numpy(kronecker.ekfac_matvec(*args)).ravel(), dense @ M.ravel(), rtol=1e-10)
    x = to_numpy(kronecker.ekfac_solve(*args, 0.2))
    np.testing.assert_allclose(x.ravel(), np.linalg.solve(dense + 0.2 * np.eye(24), M.ravel()), rtol=1e-9)
    ld = float(to_numpy(kronecker.logdet(to_xp(S, xp), 0.2)))
    np.testing.assert_allclose(ld, np.linalg.slogdet(dense + 0.2 * np.eye(24))[1], rtol=1e-10)


@pytest.mark.parametrize("setting", kronecker.SETTINGS)
def test_factors_from_inputs_and_cotangents(xp, setting):
    rng = np.random.default_rng(3)
    N, S, G, I, O, V = 3, 4, 2, 3, 5, 2
    x, g = rng.normal(size=(N, S, G, I)), rng.normal(size=(V, N, S, G, O))
    w = (rng.uniform(size=(N, S)) > 0.3).astype(float)
    xt = np.concatenate([x, np.ones((N, S, G, 1))], axis=-1)
    A, count = kronecker.input_factor(kronecker.with_bias(to_xp(x, xp)), setting=setting, weights=to_xp(w, xp))
    Gf = kronecker.gradient_factor(to_xp(g, xp), setting=setting)
    if setting == "expand":
        refA = np.einsum("ns,nsgi,nsgj->gij", w, xt, xt)
        refc = w.sum()
        refG = np.einsum("vnsgo,vnsgp->vgop", g, g)
    else:
        mean = np.einsum("ns,nsgi->ngi", w, xt) / w.sum(1)[:, None, None]
        refA, refc = np.einsum("ngi,ngj->gij", mean, mean), (w.sum(1) > 0).sum()
        gs = g.sum(2)
        refG = np.einsum("vngo,vngp->vgop", gs, gs)
    np.testing.assert_allclose(to_numpy(A), refA, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(count), [refc])
    np.testing.assert_allclose(to_numpy(Gf), refG, rtol=1e-12)
    summed = kronecker.gradient_factor(to_xp(g, xp), setting=setting, sum_probes=True)
    np.testing.assert_allclose(to_numpy(summed), refG.sum(0, keepdims=True), rtol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("S", [1, 9])
def test_factors_without_copying_the_inputs(xp, S, weighted):
    """bias=True (A's bias row and column from sums, when N·S > Ĩ) and positions > outputs
    (G summed per input) give the factors of the plain path; both paths run (S = 1 and 9)."""
    rng = np.random.default_rng(4)
    N, G, I, O, V = 3, 2, 3, 4, 2
    x, g = rng.normal(size=(N, S, G, I)), rng.normal(size=(V, N, S, G, O))
    w = (rng.uniform(size=(N, S)) > 0.3).astype(float) if weighted else None
    ww = np.ones((N, S)) if w is None else w
    xt = np.concatenate([x, np.ones((N, S, G, 1))], axis=-1)
    for setting in kronecker.SETTINGS:
        A, count = kronecker.input_factor(to_xp(x, xp), setting=setting, bias=True,
                                          weights=None if w is None else to_xp(w, xp))
        plain, plain_count = kronecker.input_factor(kronecker.with_bias(to_xp(x, xp)), setting=setting,
                                                    weights=None if w is None else to_xp(w, xp))
        np.testing.assert_allclose(to_numpy(A), to_numpy(plain), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(to_numpy(count), to_numpy(plain_count))
        if setting == "expand":
            np.testing.assert_allclose(to_numpy(A), np.einsum("ns,nsgi,nsgj->gij", ww, xt, xt), rtol=1e-12)
    Gf = kronecker.gradient_factor(to_xp(g, xp), setting="expand")
    np.testing.assert_allclose(to_numpy(Gf), np.einsum("vnsgo,vnsgp->vgop", g, g), rtol=1e-12)


def test_embedding_input_factor_counts_rows(xp):
    idx = np.array([[0, 2, 2, 1], [3, 3, 0, 2]])
    w = np.array([[1, 1, 0, 1], [1, 1, 1, 0]], dtype=float)
    xi = to_xp(idx, xp)
    counts, n = kronecker.embedding_input_factor(xi, 5, padding=3, weights=to_xp(w, xp), dtype=xp.float64)
    np.testing.assert_allclose(to_numpy(counts), [[2, 1, 1, 0, 0]])  # row 3 is padding: 0
    np.testing.assert_allclose(to_numpy(n), [6])


def test_bad_setting_names_the_argument(xp):
    with pytest.raises(ValueError, match="setting"):
        kronecker.gradient_factor(to_xp(np.zeros((1, 1, 1, 1, 2)), xp), setting="mean")
