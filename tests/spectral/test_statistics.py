"""Every statistic of fisher_spectrum against dense float64 eigendecompositions, on numpy, torch, JAX."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from fisherlib.spectral import fisher_spectrum, lanczos_block, top_eigenpairs
from fisherlib.spectral._lanczos import tridiagonal
from tests.spectral._cases import FRAMEWORKS, case, reference, to_numpy

FW = [pytest.param(f, marks=pytest.mark.skipif(f != "numpy" and importlib.util.find_spec(f) is None,
                                                reason=f"{f} not installed")) for f in FRAMEWORKS]


def dense_stats():
    F = reference()
    ev = np.linalg.eigvalsh(F)[::-1]
    P = len(ev)
    return F, ev, {"m1": ev.sum() / P, "m2": np.sum(ev ** 2) / P, "trace": ev.sum(),
                   "lower": np.linalg.eigvalsh(reference("lower"))[-1],
                   "upper": np.linalg.eigvalsh(reference("upper"))[-1]}


@pytest.mark.slow
@pytest.mark.parametrize("framework", FW)
def test_exact_statistics(framework):
    model, params, batches, order = case(framework)
    F, ev, ref = dense_stats()
    # The JAX lower bound compiles the core's secular solver op by op (tens of seconds on a
    # loaded machine); the bounds are checked on numpy and torch.
    bounds = framework != "jax"
    s = fisher_spectrum(model, params, batches, k=3, method="exact", bounds=bounds)
    assert s.method == "exact" and s.n_params == F.shape[0] and s.n_inputs == 24
    np.testing.assert_allclose(s.eigenvalues, ev[:3], rtol=1e-10)
    assert np.all(s.residuals < 1e-10 * ev[0])
    for key in ("m1", "m2", "trace"):
        np.testing.assert_allclose(getattr(s, key), ref[key], rtol=1e-10)
        assert getattr(s, f"{key}_stderr") == 0.0
    if bounds:
        np.testing.assert_allclose([s.lambda_max_lower, s.lambda_max_upper], [ref["lower"], ref["upper"]],
                                   rtol=1e-10)
    assert ref["lower"] < ev[0] < ref["upper"] < ref["trace"]
    # Eigenvectors: unit, and the dense F maps them to λ y (layouts differ between frameworks).
    Y = to_numpy(s.eigenvectors)[:, np.argsort(order)]
    np.testing.assert_allclose(Y @ F, s.eigenvalues[:, None] * Y, atol=1e-9 * ev[0])
    # The exact density has all eigenvalues: its moments are m1, m2, and the zeros are counted.
    assert s.density.moment(1)[0] == pytest.approx(ref["m1"], rel=1e-10)
    assert s.density.mass_below(1e-9 * ev[0]) == pytest.approx(np.mean(ev < 1e-9 * ev[0]), abs=1e-12)
    assert s.lr_max == pytest.approx(2 / ev[0])
    tree = s.eigenvector(0)
    assert len(s._op.backend.leaves(tree)) == 4


@pytest.mark.slow
@pytest.mark.parametrize("framework", FW)
def test_estimated_statistics(framework):
    """Lanczos eigenpairs to their residuals; Hutchinson m1, m2 within 4 standard errors."""
    model, params, batches, _ = case(framework)
    F, ev, ref = dense_stats()
    bounds = framework != "jax"
    s = fisher_spectrum(model, params, batches, k=3, method="estimate", probes=24, slq_steps=12, seed=3,
                        bounds=bounds)
    assert s.method == "estimate"
    np.testing.assert_allclose(s.eigenvalues, ev[:3], rtol=1e-8)
    assert np.all(s.residuals < 1e-6 * ev[0])
    # An eigenvalue of F lies within each residual of its Ritz value.
    for lam, r in zip(s.eigenvalues, s.residuals):
        assert np.min(np.abs(ev - lam)) <= r + 1e-12 * ev[0]
    if bounds:
        np.testing.assert_allclose([s.lambda_max_lower, s.lambda_max_upper], [ref["lower"], ref["upper"]],
                                   rtol=1e-8)
    for key in ("m1", "m2"):
        est, se = getattr(s, key), getattr(s, f"{key}_stderr")
        assert 0 < se < 0.5 * est
        assert abs(est - ref[key]) < 4 * se, (key, est, ref[key], se)
    # The reported error bar of m1 is the known Hutchinson one: Var(ξᵀFξ) = 2(‖F‖² − Σ F_ii²).
    P = F.shape[0]
    se_theory = np.sqrt(2 * (np.sum(F ** 2) - np.sum(np.diag(F) ** 2)) / 24) / P
    assert 0.5 * se_theory < s.m1_stderr < 2 * se_theory
    assert s.trace == pytest.approx(s.m1 * P)


def test_estimates_detect_a_wrong_operator():
    """Not vacuous: the same checks fail for F_UB (whose m1 differs by several error bars)."""
    model, params, batches, _ = case("numpy")
    _, _, ref = dense_stats()
    up = np.linalg.eigvalsh(reference("upper"))
    s = fisher_spectrum(model, params, batches, method="estimate", probes=24, slq_steps=4, seed=3,
                        bounds=False)
    assert abs(s.m1 - ref["m1"]) < 4 * s.m1_stderr
    assert abs(up.mean() - s.m1) > 4 * s.m1_stderr  # F_UB's m1 is not within the error bars of F's


def test_slq_quadrature_matches_moments():
    """Each probe's Gauss quadrature reproduces vᵀ A^j v for j < 2m (dense A, with zero eigenvalues)."""
    rng = np.random.default_rng(0)
    G = rng.normal(size=(40, 12))
    A = G @ G.T  # rank 12 of 40
    V = rng.choice([-1.0, 1.0], size=(5, 40))
    m = 4
    alpha, beta, length = lanczos_block(lambda X: X @ A, V, m)
    assert np.all(length == m)
    for i in range(5):
        theta, S = np.linalg.eigh(tridiagonal(alpha[i], beta[i]))
        v = V[i] / np.linalg.norm(V[i])
        for j in range(1, 2 * m):
            want = v @ np.linalg.matrix_power(A, j) @ v
            assert np.sum(S[0] ** 2 * theta ** j) == pytest.approx(want, rel=1e-8)
    # A breakdown (Krylov space exhausted at step 2) stops that sequence cleanly.
    B = np.diag([3.0, 1.0, 0.0, 0.0])
    alpha, beta, length = lanczos_block(lambda X: X @ B, np.array([[1.0, 1.0, 0.0, 0.0]]), 4)
    assert length[0] == 2
    assert sorted(np.linalg.eigvalsh(tridiagonal(alpha[0, :2], beta[0, :2]))) == pytest.approx([1.0, 3.0])


def test_top_eigenpairs_clustered_spectrum():
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.normal(size=(60, 60)))
    w = np.concatenate([[10.0, 9.999, 5.0], rng.uniform(0, 1, 57)])
    A = (Q * w) @ Q.T
    res = top_eigenpairs(lambda X: X @ A, rng.normal(size=60), 3, tol=1e-12)
    np.testing.assert_allclose(res.values, [10.0, 9.999, 5.0], rtol=1e-10)
    assert np.all(res.residuals < 1e-8)
    np.testing.assert_allclose(np.abs(res.vectors @ Q[:, :3]), np.eye(3), atol=1e-6)
    with pytest.raises(ValueError, match="k"):
        top_eigenpairs(lambda X: X @ A, rng.normal(size=60), 0)


def test_bad_arguments():
    model, params, batches, _ = case("numpy")
    with pytest.raises(ValueError, match="method"):
        fisher_spectrum(model, params, batches, method="dense")
    with pytest.raises(ValueError, match="k"):
        fisher_spectrum(model, params, batches, k=0)
    with pytest.raises(ValueError, match="max_elements"):
        fisher_spectrum(model, params, batches, method="exact", max_elements=100)
    with pytest.raises(ValueError, match="probes"):
        fisher_spectrum(model, params, batches, method="estimate", probes=0)


def test_summary_text_and_dict():
    model, params, batches, _ = case("numpy")
    s = fisher_spectrum(model, params, batches, k=2)
    text = str(s)
    assert "λ_1" in text and "2/λ_max" in text and "F_LB" in text
    d = s.as_dict()
    assert d["lambda_max"] == s.lambda_max and d["lr_max"] == pytest.approx(2 / s.lambda_max)
    assert "Hessian" in s.lr_caveat
