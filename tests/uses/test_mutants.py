"""The uses' formulas written out, where a plausible slip (1/12 for 1/24, log2 without its half,
a quantizer a level off, ddof 0, |θ| for θ²) kept every earlier test green (issue 23)."""

from __future__ import annotations

import numpy as np
import pytest

import fisherlib
from fisherlib.models import Linear
from fisherlib.uses import allocate_bits, distortion, prune_mask, quantize, sensitivity


def test_distortion_is_half_the_expected_noise_energy():
    """Σ_l (Δ_l²/24) tr F_l = ½ E[εᵀ diag(F) ε] for ε uniform on [−Δ/2, Δ/2]: compared with the
    quantizer's actual error on finely spread weights (high-resolution regime, a few % off)."""
    rng = np.random.default_rng(0)
    params = {"a": rng.uniform(-1, 1, 20000), "b": 3 * rng.uniform(-1, 1, 20000)}
    F = {"a": rng.uniform(0.5, 1.5, 20000), "b": rng.uniform(0.1, 0.3, 20000)}
    bits = {"a": 5, "b": 4}
    q = quantize(params, bits)
    actual = sum(0.5 * np.sum(F[k] * (q[k] - params[k]) ** 2) for k in params)
    assert distortion(F, params, bits) == pytest.approx(actual, rel=0.05)


def test_quantizer_levels():
    """b bits: L = 2^{b−1} − 1 levels each side of 0, step max|θ| / L."""
    theta = {"w": np.linspace(-2.0, 2.0, 101)}
    for b in (2, 3, 4):
        L = 2 ** (b - 1) - 1
        got = np.unique(quantize(theta, {"w": b})["w"])
        np.testing.assert_allclose(got, np.arange(-L, L + 1) * 2.0 / L, atol=1e-12)


def test_water_filling_puts_half_a_log2_per_factor():
    """b_l = b̄ + ½ log2(F̄_l / geometric mean): a factor 16 in F̄ is 2 bits, 64 is 3 bits."""
    params = {"a": np.ones(100), "b": np.ones(100)}
    for ratio, gap in ((16.0, 2.0), (64.0, 3.0)):
        F = {"a": np.full(100, ratio), "b": np.full(100, 1.0)}
        bits = allocate_bits(F, params, 5, integer=False, b_max=12)
        assert bits["a"] - bits["b"] == pytest.approx(gap, abs=1e-6)
        assert (bits["a"] + bits["b"]) / 2 == pytest.approx(5.0, abs=1e-6)


def test_layer_stderr_is_the_probe_spread():
    """K ≥ 2 probes: the sample standard deviation (ddof 1) of the K per-probe layer sums / √K."""
    model = Linear(3, 4)
    params = model.init(seed=0, like=np.zeros(1))
    x = np.random.default_rng(0).normal(size=(10, 3))
    est = fisherlib.fisher(model, params, x, probes=3, seed=1, keep_probes=True)
    s = sensitivity(est, params)
    for name in ("weight", "bias"):
        sums = np.asarray(est.parts[est.names.index(name)]).reshape(3, -1).sum(axis=1)
        assert s.layer_stderr[name] == pytest.approx(np.std(sums, ddof=1) / np.sqrt(3), rel=1e-12)


def test_pruning_ranks_by_theta_squared():
    """Saliency ½ F θ²: θ = (1, 2), F = (3, 1) gives (1.5, 2), so the first goes; by ½ F |θ| the
    second would (1.5, 1)."""
    mask = prune_mask({"w": np.array([3.0, 1.0])}, {"w": np.array([1.0, 2.0])}, 0.5)
    np.testing.assert_array_equal(mask["w"], [0.0, 1.0])
