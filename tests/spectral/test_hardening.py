"""Repeated eigenvalues, one-probe error bars, non-finite inputs, the smaller exact side, λ_max alone
and the "auto" choice of fisher_spectrum (issue 23)."""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib import backends
from fisherlib.models import MLP, Linear
from fisherlib.spectral import fisher_operator, fisher_spectrum, slq, top_eigenpairs
from fisherlib.spectral import _exact, _summary
from tests.estimators.fisher_reference import dense_fisher, jacobians
from tests.spectral._cases import case, reference

D, C, N = 3, 5, 40


def zero_softmax_regression():
    """z = W x + b with W = 0, b = 0: p uniform, F = (I − 11ᵀ/C)/C ⊗ Σ [x; 1][x; 1]ᵀ, so each
    eigenvalue of the inputs' second moment appears C − 1 = 4 times."""
    model = Linear(D, C)
    params = {k: np.zeros_like(v) for k, v in model.init(0).items()}
    x = np.random.default_rng(0).normal(size=(N, D))
    z, J = jacobians(backends.get("numpy"), model, params, x)
    return model, params, x, dense_fisher(J, z)


def test_repeated_eigenvalues_are_all_found():
    """A single Krylov vector finds one copy of each: before, k = 6 gave [λ₁, λ₂, λ₃, ...], each
    once, with tiny residuals. The block of k starting vectors finds the four copies."""
    model, params, x, F = zero_softmax_regression()
    ev = np.linalg.eigvalsh(F)[::-1]
    assert np.allclose(ev[:4], ev[0]) and np.allclose(ev[4:8], ev[4])  # the multiplicity is real
    s = fisher_spectrum(model, params, x, k=6, method="estimate", bounds=False, density=False)
    np.testing.assert_allclose(s.eigenvalues, ev[:6], rtol=1e-10)
    assert np.all(s.residuals < 1e-8 * ev[0])
    Y = np.asarray(s.eigenvectors)
    np.testing.assert_allclose(Y @ Y.T, np.eye(6), atol=1e-8)  # six directions, not one repeated
    ex = fisher_spectrum(model, params, x, k=6, method="exact", bounds=False)
    np.testing.assert_allclose(ex.eigenvalues, ev[:6], rtol=1e-10)


def test_block_lanczos_on_a_dense_matrix_with_multiplicities():
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.normal(size=(50, 50)))
    w = np.concatenate([[7.0] * 3, [5.0] * 2, [4.0], rng.uniform(0, 1, 44)])
    A = (Q * w) @ Q.T
    blk = top_eigenpairs(lambda X: X @ A, rng.normal(size=(4, 50)), 4, tol=1e-12)
    np.testing.assert_allclose(blk.values, [7.0, 7.0, 7.0, 5.0], rtol=1e-10)
    assert np.all(blk.residuals < 1e-9)
    # A block on a matrix of small rank: the Krylov space is exhausted, the pairs stay exact.
    G = rng.normal(size=(30, 3))
    low = top_eigenpairs(lambda X: X @ (G @ G.T), rng.normal(size=(2, 30)), 3, tol=1e-12)
    np.testing.assert_allclose(low.values, np.linalg.eigvalsh(G @ G.T)[::-1][:3], rtol=1e-10)
    with pytest.raises(ValueError, match="v0"):
        top_eigenpairs(lambda X: X @ A, rng.normal(size=(51, 50)), 2)


def test_one_probe_is_not_reported_as_exact():
    """One probe: m₁, m₂ and the trace had standard error 0. Now the variance bound
    2 m_{2j} / P at the probe's own m_{2j}; over seeds it covers the spread of the estimates."""
    model, params, batches, _ = case("numpy")
    F = reference()
    P = F.shape[0]
    m1 = np.trace(F) / P
    s = fisher_spectrum(model, params, batches, method="estimate", probes=1, slq_steps=6, bounds=False)
    for key in ("m1", "m2", "trace"):
        assert getattr(s, f"{key}_stderr") > 0, key
    d = s.density
    assert s.m1_stderr == pytest.approx(np.sqrt(2 * np.sum(d.weights * d.nodes ** 2) / P))
    assert s.trace_stderr == pytest.approx(s.m1_stderr * P)
    assert "±" in str(s).split("tr F =")[1].splitlines()[0]
    op = fisher_operator(model, params, batches)
    est, se = np.array([slq(op, probes=1, steps=4, seed=i).moment(1) for i in range(60)]).T
    # The bound's mean square is at least the variance (up to the sampling error of 60 draws).
    assert np.mean(se ** 2) >= 0.7 * np.mean((est - m1) ** 2)
    assert np.mean(se ** 2) < 20 * np.mean((est - m1) ** 2)  # and not vacuous
    # Two probes or more: the spread, as before.
    two = slq(op, probes=2, steps=4, seed=0)
    per = np.sum(two.weights * two.nodes, axis=1)
    assert two.moment(1)[1] == pytest.approx(np.std(per, ddof=1) / np.sqrt(2))


def test_non_finite_input_is_an_error():
    """An inf input gave NaN products (a LinAlgError deep in eigh, or NaN statistics)."""
    model = MLP([3, 4, 3], activation="tanh")
    params = model.init(0)
    x = np.ones((4, 3))
    x[1, 0] = np.inf
    with np.errstate(invalid="ignore", over="ignore"):  # NumPy's own warnings aside
        for method in ("exact", "estimate"):
            with pytest.raises(ValueError, match="inf or NaN"):
                fisher_spectrum(model, params, x, method=method, bounds=False)


@pytest.mark.parametrize("n", [4, 30], ids=["gram side (R < P)", "primal side (P <= R)"])
def test_exact_path_takes_the_smaller_side(n, monkeypatch):
    """R = C·N against P = 59: with 4 inputs the Gram matrix (12 × 12), with 30 F (59 × 59)."""
    model = MLP((4, 7, 3), activation="tanh")
    params = model.init(0)
    x = 1.5 * np.random.default_rng(0).normal(size=(n, 4))
    z, J = jacobians(backends.get("numpy"), model, params, x)
    F = dense_fisher(J, z)
    ev = np.linalg.eigvalsh(F)[::-1]
    sizes = []
    real_eigh = np.linalg.eigh
    monkeypatch.setattr(_exact.np.linalg, "eigh", lambda M: sizes.append(M.shape[0]) or real_eigh(M))
    s = fisher_spectrum(model, params, x, k=3, method="exact", bounds=False)
    assert sizes == [min(3 * n, F.shape[0])]
    np.testing.assert_allclose(s.eigenvalues, ev[:3], rtol=1e-10)
    assert np.all(s.residuals < 1e-10 * ev[0])
    np.testing.assert_allclose([s.trace, s.m2 * F.shape[0]], [np.trace(F), np.sum(F ** 2)], rtol=1e-10)
    assert s.density.mass_below(1e-9 * ev[0]) == pytest.approx(np.mean(ev < 1e-9 * ev[0]), abs=1e-12)
    Y = np.asarray(s.eigenvectors)
    np.testing.assert_allclose(Y @ F, s.eigenvalues[:, None] * Y, atol=1e-9 * ev[0])
    # The memory rule counts the side held: min(R, P) × P.
    with pytest.raises(ValueError, match="max_elements"):
        fisher_spectrum(model, params, x, method="exact", bounds=False,
                        max_elements=min(3 * n, F.shape[0]) * F.shape[0] - 1)


def test_lambda_max_alone():
    """density=False: Lanczos only, no quadrature passes; the moments are None, not made up."""
    model, params, batches, _ = case("numpy")
    ev = np.linalg.eigvalsh(reference())[::-1]
    full = fisher_spectrum(model, params, batches, method="estimate", bounds=False, probes=8, slq_steps=10)
    alone = fisher_spectrum(model, params, batches, method="estimate", bounds=False, density=False)
    assert alone.lambda_max == pytest.approx(ev[0], rel=1e-9)
    assert alone.density is None and alone.m1 is None and alone.trace is None
    assert alone.passes == full.passes - 10
    assert "tr F" not in str(alone) and alone.as_dict()["m2"] is None


def test_auto_weighs_time():
    """The issue's CNN: P = 1,898 parameters, 1,297 inputs, C = 10. The Gram side (R = 12,970)
    was chosen by a memory rule and took over 20 minutes; the prediction picks F's side or
    the estimate, and refuses only what does not fit."""
    model, params, batches, _ = case("numpy")
    s = fisher_spectrum(model, params, batches, bounds=False)
    assert s.method == "exact" and s.plan.startswith("auto: exact")
    small = fisher_spectrum(model, params, batches, bounds=False, max_elements=100)
    assert small.method == "estimate" and "max_elements" in small.plan

    class Op:  # the shapes of the case, a forward pass of 1 ms per 100 inputs
        n_params = 1898
        batches = [(np.zeros((1297, 1)), None)]
        rank, bound = 1, None

        class backend:
            @staticmethod
            def linearize(model, params, x):
                import time

                time.sleep(0.013)
                return np.zeros((1297, 10)), None

        model = params = None

        def _forward(self, b):
            return np.zeros((1297, 10)), None

    method, plan = _summary._plan(Op(), [], 1, 16, 30, 100, True, 1 << 25)
    t_exact, t_est = (float(v.split()[0]) for v in plan.split("(predicted ")[1].split(", "))
    # F's side: 2·R·P² + 10·P³ flops; the Gram side would be 10·R³ = 2.2e13 flops (~2,000 s).
    assert t_exact < 60 and method == ("exact" if t_exact <= t_est else "estimate")
    assert t_est > 1


def test_cached_forward_passes_give_the_same_products():
    """cache=True keeps each batch's forward pass: the products (first and later passes) equal
    those without it, batch by batch (a cache keyed wrongly would serve one batch for all)."""
    model, params, batches, _ = case("numpy")
    V = np.random.default_rng(8).normal(size=(2, 59))
    plain = fisher_operator(model, params, batches).matmat(V)
    op = fisher_operator(model, params, batches, cache=True)
    for _ in range(2):
        np.testing.assert_allclose(op.matmat(V), plain, rtol=1e-12)
    assert len(op._cached) == len(batches)


def test_every_requested_pair_converges():
    """The stopping rule checks all k pairs: a dominant λ₁ converges in a few steps, while λ₂ of
    a tight cluster needs many more; stopping on λ₁ alone leaves λ₂ with a large residual."""
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.normal(size=(200, 200)))
    w = np.concatenate([[100.0, 1.0], np.linspace(0.0, 0.99, 198)])
    A = (Q * w) @ Q.T
    res = top_eigenpairs(lambda X: X @ A, rng.normal(size=200), 2, tol=1e-10)
    np.testing.assert_allclose(res.values, [100.0, 1.0], rtol=1e-9)
    assert np.all(res.residuals < 1e-7)
