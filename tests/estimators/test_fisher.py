"""fisherlib.fisher against dense float64 references Σ_x J_xᵀ I(z_x) J_x on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fisherlib
from fisherlib import backends
from fisherlib.estimators import FisherEstimate
from fisherlib.models import MLP

from fisher_reference import dense_fisher, jacobians, sigmoid_by_enumeration

N, D, C = 12, 3, 4


@pytest.fixture(scope="module")
def setup():
    model = MLP([D, 5, C], activation="tanh")
    params = model.init(seed=3, like=np.zeros(1))
    x = np.random.default_rng(0).normal(size=(N, D)) * 1.5
    z, J = jacobians(backends.get("numpy"), model, params, x)
    return model, params, x, z, J


def flat(est_value, names):
    return np.concatenate([np.asarray(est_value[n]).ravel() for n in names])


def diag_of(est):
    v = est.to_numpy().value
    return np.concatenate([np.ravel(v[n]) for n in est.names])


def block_slices(J):
    return J


# ---------------------------------------------------------------- exact = dense reference


@pytest.mark.parametrize("likelihood,bound,rank", [
    ("softmax", None, 1), ("softmax", "upper", 1), ("softmax", "lower", 1), ("softmax", "lower", 2),
    ("sigmoid", None, 1),
])
def test_exact_matches_dense_reference(setup, likelihood, bound, rank):
    model, params, x, z, J = setup
    F = dense_fisher(J, z, likelihood, bound, rank)
    kw = dict(method="exact", likelihood=likelihood, bound=bound, rank=rank)
    np.testing.assert_allclose(diag_of(fisherlib.fisher(model, params, x, **kw)), np.diag(F), rtol=1e-12, atol=1e-14)
    tr = fisherlib.fisher(model, params, x, structure="trace", **kw)
    np.testing.assert_allclose(float(tr.value), np.trace(F), rtol=1e-12)
    blocks = fisherlib.fisher(model, params, x, structure="blocks", blocks=[["0.weight", "0.bias", "1.weight", "1.bias"]], **kw)
    np.testing.assert_allclose(next(iter(blocks.value.values())), F, rtol=1e-11, atol=1e-14)


def test_exact_blocks_default_and_unitwise(setup):
    model, params, x, z, J = setup
    F = dense_fisher(J, z)
    est = fisherlib.fisher(model, params, x, method="exact", structure="blocks")
    sizes = [np.asarray(params[n]).size for n in est.names]
    offsets = np.cumsum([0] + sizes)
    for n, a, b in zip(est.names, offsets[:-1], offsets[1:]):
        np.testing.assert_allclose(est.value[n], F[a:b, a:b], rtol=1e-11, atol=1e-14)
    unit = fisherlib.fisher(model, params, x, method="exact", structure="blocks", blocks="unitwise")
    W = np.asarray(params["0.weight"])
    out, inp = W.shape  # unit i: row i of the weight with bias entry i
    blk = unit.value["0.weight"]
    assert blk.shape == (out, inp + 1, inp + 1)
    for i in range(out):
        idx = list(range(i * inp, (i + 1) * inp)) + [out * inp + i]
        np.testing.assert_allclose(blk[i], F[np.ix_(idx, idx)], rtol=1e-11, atol=1e-14)


def test_sigmoid_exact_equals_label_enumeration(setup):
    model, params, x, z, J = setup
    F = sigmoid_by_enumeration(J, z)
    est = fisherlib.fisher(model, params, x, method="exact", likelihood="sigmoid", structure="blocks",
                           blocks=[["0.weight", "0.bias", "1.weight", "1.bias"]])
    np.testing.assert_allclose(next(iter(est.value.values())), F, rtol=1e-10, atol=1e-14)


def test_exact_bounds_are_ordered(setup):
    model, params, x, z, J = setup
    lo, mid, up = (fisherlib.fisher(model, params, x, method="exact", bound=b) for b in ("lower", None, "upper"))
    assert np.all(diag_of(lo) <= diag_of(mid) + 1e-14) and np.all(diag_of(mid) <= diag_of(up) + 1e-14)
    group = [["0.weight", "0.bias", "1.weight", "1.bias"]]
    B = [next(iter(fisherlib.fisher(model, params, x, method="exact", bound=b, structure="blocks",
                                    blocks=group).value.values())) for b in ("lower", None, "upper")]
    scale = np.abs(B[2]).max()
    assert np.linalg.eigvalsh(B[1] - B[0]).min() >= -1e-12 * scale
    assert np.linalg.eigvalsh(B[2] - B[1]).min() >= -1e-12 * scale


def test_lower_bound_exact_at_two_classes():
    model = MLP([D, 4, 2])
    params = model.init(seed=1, like=np.zeros(1))
    x = np.random.default_rng(1).normal(size=(8, D))
    lo = fisherlib.fisher(model, params, x, method="exact", bound="lower")
    F = fisherlib.fisher(model, params, x, method="exact")
    np.testing.assert_allclose(diag_of(lo), diag_of(F), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- unbiasedness (statistical)

K = 3000  # probes in one call: the same as K seeds of one probe each


def _within(est, exact, sigmas=5.0):
    """Every entry of the mean over probes within `sigmas` standard errors of the exact value."""
    mean, se = diag_of(est), np.concatenate([np.ravel(np.asarray(est.to_numpy().stderr[n])) for n in est.names])
    return np.abs(mean - exact) <= sigmas * se + 1e-12 * np.abs(exact).max()


@pytest.mark.parametrize("method,bound,per_example", [
    ("hutchinson", None, False), ("hutchinson", None, True), ("mc", None, False), ("mc", None, True),
    ("hutchinson", "upper", False), ("hutchinson", "lower", False),
])
def test_random_estimators_are_unbiased(setup, method, bound, per_example):
    model, params, x, z, J = setup
    exact = np.diag(dense_fisher(J, z, bound=bound))
    est = fisherlib.fisher(model, params, x, method=method, bound=bound, probes=K, per_example=per_example, seed=7)
    assert est.stderr_kind == "probes"
    assert np.all(_within(est, exact))


def test_sigmoid_hutchinson_is_unbiased(setup):
    model, params, x, z, J = setup
    exact = np.diag(dense_fisher(J, z, "sigmoid"))
    est = fisherlib.fisher(model, params, x, likelihood="sigmoid", probes=K, seed=2)
    assert np.all(_within(est, exact))


def test_the_unbiasedness_test_catches_a_biased_estimator(setup, monkeypatch):
    """The paper's formula as printed (weight p̃ instead of √p̃) gives E = Σ Jᵀ I_Δ² J: rejected."""
    from fisherlib.core import cotangents, simplex

    model, params, x, z, J = setup
    monkeypatch.setattr(cotangents, "hutchinson", lambda z, xi, likelihood="softmax": simplex.matvec(z, xi))
    est = fisherlib.fisher(model, params, x, probes=K, seed=7)
    assert not np.all(_within(est, np.diag(dense_fisher(J, z))))


@pytest.mark.parametrize("dist,expect", [("rademacher", "le"), ("gaussian", "eq")])
def test_coefficient_of_variation_with_one_probe(setup, dist, expect):
    model, params, x, z, J = setup
    est = fisherlib.fisher(model, params, x, probes=4000, dist=dist, seed=11)
    samples = np.concatenate([np.asarray(p).reshape(p.shape[0], -1) for p in est.to_numpy().parts], axis=1)
    cv = samples.std(0, ddof=1) / samples.mean(0)
    # A K=1 estimate is a quadratic form (wᵀξ)², at worst a scaled χ²₁ (kurtosis 15): the
    # standard error of its sample std is about sqrt((15-1)/(4K)) ~ 3% relative, so 4 SE = 12%.
    tol = 4 * math.sqrt(14 / (4 * samples.shape[0]))
    assert np.all(cv <= math.sqrt(2) * (1 + tol))
    if expect == "eq":
        np.testing.assert_allclose(cv, math.sqrt(2), rtol=tol)


def test_single_probe_reports_the_analytic_bound(setup):
    model, params, x, z, J = setup
    est = fisherlib.fisher(model, params, x, seed=1)
    assert est.stderr_kind == "bound"
    np.testing.assert_allclose(diag_of(est) * math.sqrt(2),
                               np.concatenate([np.ravel(v) for v in est.to_numpy().stderr.values()]))
    assert fisherlib.fisher(model, params, x, method="mc").stderr_kind == "unavailable"
    assert fisherlib.fisher(model, params, x, method="exact").stderr_kind == "exact"


def test_first_probes_is_the_estimate_of_fewer_probes(setup):
    model, params, x, z, J = setup
    est = fisherlib.fisher(model, params, x, probes=6, seed=2)
    parts = [np.asarray(p) for p in est.to_numpy().parts]
    three = est.first_probes(3)
    assert three.n_probes == 3 and three.stderr_kind == "probes"
    np.testing.assert_allclose(diag_of(three), np.concatenate([p[:3].mean(0).ravel() for p in parts]))
    se = np.concatenate([p[:3].std(0, ddof=1).ravel() / math.sqrt(3) for p in parts])
    np.testing.assert_allclose(np.concatenate([np.ravel(v) for v in three.to_numpy().stderr.values()]), se)
    assert est.first_probes(1).stderr_kind == "bound"
    mc = fisherlib.fisher(model, params, x, method="mc", probes=2, seed=2)
    assert mc.first_probes(1).stderr_kind == "unavailable"
    for k in (0, 7, 2.0, True):
        with pytest.raises(ValueError, match="k:"):
            est.first_probes(k)
    with pytest.raises(ValueError, match="no probes"):
        fisherlib.fisher(model, params, x, method="exact").first_probes(1)


def test_sketch_expectation_and_products(setup):
    model, params, x, z, J = setup
    F = dense_fisher(J, z)
    est = fisherlib.fisher(model, params, x, structure="sketch", probes=K, seed=5)
    S = est.value
    dense = np.asarray(S.to_dense())
    se = np.sqrt((np.outer(np.diag(F), np.diag(F)) + F**2) / K)  # Var(𝔽_ij) <= F_ii F_jj + F_ij²
    assert np.all(np.abs(dense - F) <= 5 * se + 1e-12)
    v = np.random.default_rng(0).normal(size=S.size)
    np.testing.assert_allclose(S.matvec(v), dense @ v, rtol=1e-10)
    np.testing.assert_allclose(float(S.trace()), np.trace(dense), rtol=1e-10)


def test_empirical_uses_observed_labels(setup):
    model, params, x, z, J = setup
    y = np.random.default_rng(4).integers(0, C, size=N)
    p = np.exp(z - z.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    g = np.einsum("nci,nc->ni", J, np.eye(C)[y] - p)
    est = fisherlib.fisher(model, params, [(x, y)], method="empirical")
    np.testing.assert_allclose(diag_of(est), (g**2).sum(0), rtol=1e-12)


# ---------------------------------------------------------------- estimate objects


def test_merge_save_load_and_resume(setup, tmp_path):
    model, params, x, z, J = setup
    whole = fisherlib.fisher(model, params, x, method="exact")
    a = fisherlib.fisher(model, params, [x[:5]], method="exact")
    a.save(tmp_path / "part.npz")
    b = fisherlib.fisher(model, params, [x[5:8], x[8:]], method="exact")
    merged = FisherEstimate.load(tmp_path / "part.npz") + b
    assert merged.n_inputs == N
    np.testing.assert_allclose(diag_of(merged), diag_of(whole), rtol=1e-12)
    mean = fisherlib.fisher(model, params, x, method="exact", reduction="mean")
    np.testing.assert_allclose(diag_of(mean), diag_of(whole) / N, rtol=1e-12)
    r1 = fisherlib.fisher(model, params, [x[:6]], probes=4, seed=1)
    with pytest.raises(ValueError, match="seed"):
        r1 + fisherlib.fisher(model, params, [x[6:]], probes=4, seed=1)
    r = r1 + fisherlib.fisher(model, params, [x[6:]], probes=4, seed=2)
    assert r.n_inputs == N and r.n_probes == 4
    with pytest.raises(ValueError, match="method"):
        whole + r


def test_progress_bar_runs(setup):
    model, params, x, z, J = setup
    est = fisherlib.fisher(model, params, [x[:6], x[6:]], progress=True)
    assert est.n_inputs == N


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(structure="full"), "structure"),
    (dict(method="kfac"), "method"),
    (dict(method="exact", structure="sketch"), "sketch"),
    (dict(method="mc", bound="upper"), "bound"),
    (dict(likelihood="sigmoid", bound="lower"), "bound"),
    (dict(probes=0), "probes"),
    (dict(method="exact", probes=3), "probes"),
    (dict(rank=2), "rank"),
    (dict(blocks="unitwise"), "blocks"),
    (dict(structure="sketch", per_example=True), "per_example"),
])
def test_bad_arguments(setup, kwargs, match):
    model, params, x, z, J = setup
    with pytest.raises(ValueError, match=match):
        fisherlib.fisher(model, params, x, **kwargs)


def test_bad_batches(setup):
    model, params, x, z, J = setup
    with pytest.raises(ValueError, match="labels outside"):
        fisherlib.fisher(model, params, [(x, np.full(N, C))], method="empirical")
    with pytest.raises(ValueError, match="shape"):
        fisherlib.fisher(model, params, [(x, np.zeros(N - 1, dtype=int))], method="empirical")
    with pytest.raises(ValueError, match="labels"):
        fisherlib.fisher(model, params, [x], method="empirical")
    bad = x.copy(); bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fisherlib.fisher(model, params, [bad])
    with pytest.raises(ValueError, match="no batch"):
        fisherlib.fisher(model, params, [])
