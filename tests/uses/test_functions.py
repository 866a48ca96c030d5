"""fisherlib.uses against dense float64 formulas, on every backend of the ``xp`` fixture."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fisherlib.estimators import FisherEstimate
from fisherlib.uses import (EWC, allocate_bits, apply_mask, distortion, ewc_gradient, ewc_penalty,
                            magnitude_mask, prune_mask, quantize, saliency, sensitivity, sparsity_of)
from tests._backends import to_numpy, to_xp

SHAPES = {"w": (4, 3), "b": (3,), "v": (3, 2)}


def _tree(rng, xp, positive=False):
    out = {}
    for k, s in SHAPES.items():
        a = rng.gamma(1.0, size=s) if positive else rng.normal(size=s)
        out[k] = to_xp(a, xp)
    return out


def _np(tree):
    return {k: to_numpy(v) for k, v in tree.items()}


def _flat(tree):
    return np.concatenate([np.ravel(to_numpy(tree[k])) for k in SHAPES])


def _estimate(parts: dict, kind: str) -> FisherEstimate:
    """A diag estimate from per-probe parts {name: (K, *shape)} (NumPy)."""
    K = next(iter(parts.values())).shape[0]
    return FisherEstimate(names=list(parts), parts=list(parts.values()), method="hutchinson",
                          structure="diag", likelihood="softmax", bound=None, rank=1, reduction="sum",
                          n_inputs=10, n_probes=K, per_example=False, dist="rademacher",
                          stderr_kind=kind, seed=0)


def test_sensitivity_scores(xp):
    rng = np.random.default_rng(0)
    theta, F = _tree(rng, xp), _tree(rng, xp, positive=True)
    s = sensitivity(F, theta)
    np.testing.assert_allclose(_flat(s.value), _flat(F))
    assert s.stderr is None and s.sizes == {k: math.prod(v) for k, v in SHAPES.items()}
    sal = sensitivity(F, theta, score="saliency")
    ref = 0.5 * _flat(F) * _flat(theta) ** 2
    np.testing.assert_allclose(_flat(sal.value), ref)
    np.testing.assert_allclose(_flat(saliency(F, theta)), ref)
    for k in SHAPES:
        np.testing.assert_allclose(sal.layers[k], np.sum(0.5 * to_numpy(F[k]) * to_numpy(theta[k]) ** 2))
        np.testing.assert_allclose(s.layer_mean[k], to_numpy(F[k]).mean())
    assert type(s.value["w"]) is type(theta["w"])


def test_layer_stderr_from_probes(xp):
    """A layer's error bar is the spread of per-probe layer sums, not the root sum of squares."""
    rng = np.random.default_rng(1)
    K = 6
    parts = {k: rng.gamma(1.0, size=(K, *s)) for k, s in SHAPES.items()}
    parts["w"][:, 0, 0] += np.arange(K) * 3.0  # correlated within the leaf
    theta = _tree(rng, xp)
    th = _np(theta)
    for score, w in (("fisher", {k: np.ones(s) for k, s in SHAPES.items()}),
                     ("saliency", {k: 0.5 * th[k] ** 2 for k in SHAPES})):
        s = sensitivity(_estimate(parts, "probes"), theta, score=score)
        for k in SHAPES:
            sums = (parts[k] * w[k]).reshape(K, -1).sum(1)
            np.testing.assert_allclose(s.layers[k], sums.mean())
            np.testing.assert_allclose(s.layer_stderr[k], sums.std(ddof=1) / math.sqrt(K))
            entry = (parts[k] * w[k]).std(0, ddof=1) / math.sqrt(K)
            np.testing.assert_allclose(to_numpy(s.stderr[k]), entry)
    one = {k: v[:1] for k, v in parts.items()}
    s = sensitivity(_estimate(one, "bound"), theta)
    for k in SHAPES:
        np.testing.assert_allclose(s.layer_stderr[k], math.sqrt(2) * one[k].sum())
    exact = sensitivity(_estimate(one, "exact"), theta)
    assert all(v == 0.0 for v in exact.layer_stderr.values())


def _keep_reference(scores: np.ndarray, sparsity: float) -> np.ndarray:
    drop = int(round(sparsity * scores.size))
    keep = np.ones(scores.size, bool)
    keep[np.argsort(scores, kind="stable")[:drop]] = False
    return keep


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_prune_masks(xp, sparsity):
    rng = np.random.default_rng(2)
    theta, F = _tree(rng, xp), _tree(rng, xp, positive=True)
    th, f = _np(theta), _np(F)
    # Global saliency: the round(s·n) smallest ½Fθ² over all leaves go.
    mask = prune_mask(F, theta, sparsity)
    sal = np.concatenate([np.ravel(0.5 * f[k] * th[k] ** 2) for k in SHAPES])
    np.testing.assert_array_equal(_flat(mask) == 1, _keep_reference(sal, sparsity))
    assert sparsity_of(mask) == pytest.approx(round(sparsity * sal.size) / sal.size)
    # Per layer, on two leaves only: the third is kept whole.
    mask = prune_mask(F, theta, sparsity, scope="layer", leaves=["w", "v"])
    for k in ("w", "v"):
        np.testing.assert_array_equal(np.ravel(to_numpy(mask[k])) == 1,
                                      _keep_reference(np.ravel(0.5 * f[k] * th[k] ** 2), sparsity))
    assert np.all(to_numpy(mask["b"]) == 1)
    # Magnitude.
    mask = magnitude_mask(theta, sparsity)
    np.testing.assert_array_equal(_flat(mask) == 1, _keep_reference(np.abs(_flat(theta)), sparsity))
    pruned = apply_mask(theta, mask)
    np.testing.assert_array_equal(_flat(pruned), _flat(theta) * _flat(mask))


def test_saliency_differs_from_magnitude(xp):
    """Not vacuous: a large weight with no Fisher goes first by saliency, last by magnitude."""
    theta = {"w": to_xp(np.array([10.0, 1.0, 2.0, 3.0]), xp)}
    F = {"w": to_xp(np.array([0.0, 1.0, 1.0, 1.0]), xp)}
    assert to_numpy(prune_mask(F, theta, 0.25)["w"]).tolist() == [0, 1, 1, 1]
    assert to_numpy(magnitude_mask(theta, 0.25)["w"]).tolist() == [1, 0, 1, 1]


def test_ewc_penalty_and_gradient(xp):
    rng = np.random.default_rng(3)
    theta = _tree(rng, xp)
    tasks = [(_tree(rng, xp, positive=True), _tree(rng, xp)) for _ in range(3)]
    # Some entries with no Fisher in any task (the anchor there is arbitrary, the penalty 0).
    tasks[0][0]["b"] = to_xp(np.zeros(3), xp)
    lam = 0.7
    ewc = EWC(lam)
    for F, anchor in tasks:
        ewc.add_task(F, anchor)
    t = _flat(theta)
    ref = 0.5 * lam * sum(np.sum(_flat(F) * (t - _flat(a)) ** 2) for F, a in tasks)
    grad = lam * sum(_flat(F) * (t - _flat(a)) for F, a in tasks)
    np.testing.assert_allclose(float(ewc.penalty(theta)), ref, rtol=1e-12)
    np.testing.assert_allclose(_flat(ewc.gradient(theta)), grad, rtol=1e-12, atol=1e-12)
    assert ewc.tasks == 3
    F, a = tasks[1]
    np.testing.assert_allclose(float(ewc_penalty(theta, F, a, lam)),
                               0.5 * lam * np.sum(_flat(F) * (t - _flat(a)) ** 2), rtol=1e-12)
    np.testing.assert_allclose(_flat(ewc_gradient(theta, F, a, lam)), lam * _flat(F) * (t - _flat(a)),
                               rtol=1e-12)
    # At the single anchor the penalty and gradient vanish.
    assert float(EWC(2.0).add_task(F, a).penalty(a)) == 0.0


def _brute_force(sizes, weights, bits, lo, hi):
    best, arg = math.inf, None
    for combo in itertools.product(range(lo, hi + 1), repeat=len(sizes)):
        if sum(n * b for n, b in zip(sizes, combo)) > bits * sum(sizes) + 1e-9:
            continue
        d = sum(n * w / (2 ** (b - 1) - 1) ** 2 for n, w, b in zip(sizes, weights, combo))
        if d < best - 1e-15:
            best, arg = d, combo
    return best, arg


def test_allocation_formula_and_budget(xp):
    """Unclipped: b_l = b̄ + ½ log2(w_l / G), G the size-weighted geometric mean; budget met."""
    sizes = {"w": 12, "b": 3, "v": 6}
    theta = {k: to_xp(np.ones(SHAPES[k]), xp) for k in SHAPES}  # equal ranges: w_l = F̄_l
    fbar = {"w": 1.0, "b": 2.0, "v": 8.0}
    F = {k: to_xp(np.full(SHAPES[k], fbar[k]), xp) for k in SHAPES}
    bits = allocate_bits(F, theta, 5, b_min=2, b_max=12, integer=False)
    logG = sum(sizes[k] * math.log2(fbar[k]) for k in SHAPES) / sum(sizes.values())
    for k in SHAPES:
        assert bits[k] == pytest.approx(5 + 0.5 * (math.log2(fbar[k]) - logG), abs=1e-6)
    assert sum(sizes[k] * bits[k] for k in SHAPES) == pytest.approx(5 * sum(sizes.values()), abs=1e-5)
    # Ranges enter as F̄ R²: doubling one leaf's range is worth one more bit there (relative).
    theta2 = dict(theta, v=to_xp(2 * np.ones(SHAPES["v"]), xp))
    bits2 = allocate_bits(F, theta2, 5, b_min=2, b_max=12, integer=False)
    assert bits2["v"] - bits2["w"] == pytest.approx(bits["v"] - bits["w"] + 1, abs=1e-6)
    # Clipped: within [b_min, b_max], budget still met where it can be.
    clipped = allocate_bits(F, theta, 3, b_min=2, b_max=4, integer=False)
    assert all(2 <= b <= 4 for b in clipped.values())
    assert sum(sizes[k] * clipped[k] for k in SHAPES) == pytest.approx(3 * sum(sizes.values()), abs=1e-5)


def test_integer_allocation_is_optimal_on_a_toy(xp):
    rng = np.random.default_rng(4)
    shapes = {"a": (5,), "b": (5,), "c": (5,), "d": (5,)}
    for trial in range(4):
        fbar = rng.lognormal(0, 2.5, size=4)
        F = {k: to_xp(np.full(s, f), xp) for (k, s), f in zip(shapes.items(), fbar)}
        theta = {k: to_xp(np.ones(s), xp) for k, s in shapes.items()}
        for avg in (2.5, 3, 4.25):
            w = allocate_bits(F, theta, avg, b_min=2, b_max=7)
            combo = tuple(w[k] for k in shapes)
            assert sum(5 * b for b in combo) <= avg * 20
            best, _ = _brute_force([5] * 4, list(fbar), avg, 2, 7)
            got = sum(5 * f / (2 ** (b - 1) - 1) ** 2 for f, b in zip(fbar, combo))
            assert got == pytest.approx(best, rel=1e-12), (trial, avg, combo)
            # ... and distortion() is that objective (times R²/24, with R = 1).
            assert distortion(F, theta, w) == pytest.approx(got / 24, rel=1e-12)
    # Unequal sizes: never over budget.
    theta = {k: to_xp(np.ones(s), xp) for k, s in SHAPES.items()}
    w = allocate_bits({k: to_xp(np.full(s, 1.0 + i), xp) for i, (k, s) in enumerate(SHAPES.items())},
                      theta, 3.4)
    assert sum(w[k] * math.prod(SHAPES[k]) for k in SHAPES) <= 3.4 * 21


@pytest.mark.parametrize("b", [2, 3, 5])
def test_quantize(xp, b):
    rng = np.random.default_rng(5)
    theta = _tree(rng, xp)
    q = quantize(theta, {"w": b, "v": b})
    for k in ("w", "v"):
        t, qk = to_numpy(theta[k]), to_numpy(q[k])
        L = 2 ** (b - 1) - 1
        step = np.abs(t).max() / L
        assert len(np.unique(qk)) <= 2 * L + 1
        np.testing.assert_allclose(qk / step, np.round(qk / step), atol=1e-9)  # on the grid
        assert np.abs(qk - t).max() <= step / 2 + 1e-12
        assert np.abs(qk).max() == pytest.approx(np.abs(t).max())  # the range is a level
    np.testing.assert_array_equal(to_numpy(q["b"]), to_numpy(theta["b"]))


def test_errors():
    theta = {"w": np.ones(4)}
    F = {"w": np.ones(4)}
    with pytest.raises(ValueError, match="sparsity"):
        prune_mask(F, theta, 1.5)
    with pytest.raises(TypeError, match="sparsity"):
        prune_mask(F, theta, "half")
    with pytest.raises(ValueError, match="scope"):
        prune_mask(F, theta, 0.5, scope="row")
    with pytest.raises(ValueError, match="leaves.*'x'"):
        magnitude_mask(theta, 0.5, leaves=["x"])
    with pytest.raises(ValueError, match="score"):
        sensitivity(F, theta, score="hessian")
    with pytest.raises(ValueError, match="fisher.*shape"):
        sensitivity({"w": np.ones(3)}, theta)
    with pytest.raises(ValueError, match="bits"):
        allocate_bits(F, theta, 9, b_max=8)
    with pytest.raises(ValueError, match="b_min"):
        allocate_bits(F, theta, 3, b_min=1)
    with pytest.raises(ValueError, match="bits: leaf 'w'"):
        quantize(theta, {"w": 1})
    with pytest.raises(ValueError, match="lam"):
        EWC(-1.0)
    with pytest.raises(ValueError, match="no task"):
        EWC().penalty(theta)
    with pytest.raises(ValueError, match="negative"):
        EWC().add_task({"w": -np.ones(4)}, theta)
    with pytest.raises(TypeError, match="params"):
        sensitivity(F, None)
    est = _estimate({"w": np.ones((1, 4))}, "exact")
    est.structure = "trace"
    with pytest.raises(ValueError, match="structure 'diag'"):
        sensitivity(est, theta)
