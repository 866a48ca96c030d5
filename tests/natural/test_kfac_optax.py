"""natural_gradient(preconditioner="kfac") (optax): the K-FAC solve of its factors, jitted between refreshes."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import fisherlib  # noqa: E402
from fisherlib.natural import natural_gradient  # noqa: E402


def _model():
    rng = np.random.default_rng(0)
    params = {"0.weight": jnp.asarray(rng.normal(size=(8, 6)) * 0.5), "0.bias": jnp.zeros(8),
              "1.weight": jnp.asarray(rng.normal(size=(3, 8)) * 0.5), "1.bias": jnp.zeros(3)}

    def f(p, x):
        return jnp.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["1.weight"].T + p["1.bias"]

    x = jnp.asarray(rng.normal(size=(32, 6)))
    y = jnp.asarray((rng.normal(size=32) > 0).astype(int) + (np.asarray(x[:, 0]) > 0.5))
    return f, params, x, y


def _loss(f, p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(f(p, x), y).mean()


def _kfac(f, params, x, y, b):
    return fisherlib.fisher(f, params, [(x, y)], structure="kfac", reduction="mean", first_batch=b)


def test_step_is_the_damped_solve_and_jits_between_refreshes():
    f, params, x, y = _model()
    est = _kfac(f, params, x, y, 0)
    tx = natural_gradient(0.1, preconditioner="kfac", kfac=est, damping=1e-2, kl_clip=None, decay=0.5)
    state = tx.init(params)
    g = jax.grad(lambda p: _loss(f, p, x, y))(params)
    upd, state = tx.update(g, state, params)
    want = est.solve(g, 1e-2, split=True)
    for n in params:
        np.testing.assert_allclose(np.asarray(upd[n]), -0.1 * np.asarray(want[n]), rtol=1e-8, atol=1e-12)
    # a refresh folds the new factors in with weight 1 - decay
    est2 = _kfac(f, params, x, y, 1)
    _, state2 = tx.update(g, state, params, kfac=est2)
    np.testing.assert_allclose(np.asarray(state2.G[1]), 0.5 * np.asarray(est.factors["1"]["G"])
                               + 0.5 * np.asarray(est2.factors["1"]["G"]), rtol=1e-10)
    step = jax.jit(lambda g, s: tx.update(g, s, params))
    a, _ = step(g, state2)
    b, _ = tx.update(g, state2, params)
    for n in params:
        np.testing.assert_allclose(np.asarray(a[n]), np.asarray(b[n]), rtol=1e-9, atol=1e-12)


def test_it_trains():
    f, params, x, y = _model()
    tx = natural_gradient(0.3, preconditioner="kfac", kfac=_kfac(f, params, x, y, 0), damping=1e-2)
    state = tx.init(params)
    before = float(_loss(f, params, x, y))
    for t in range(20):
        g = jax.grad(lambda p: _loss(f, p, x, y))(params)
        upd, state = tx.update(g, state, params, kfac=_kfac(f, params, x, y, t) if t % 5 == 0 else None)
        params = optax.apply_updates(params, upd)
    assert float(_loss(f, params, x, y)) < 0.5 * before


def test_bad_arguments():
    f, params, x, y = _model()
    with pytest.raises(ValueError, match="kfac"):
        natural_gradient(0.1, preconditioner="kfac")
    with pytest.raises(ValueError, match="kfac"):
        natural_gradient(0.1, preconditioner="diag", kfac=_kfac(f, params, x, y, 0))
    with pytest.raises(TypeError, match="kfac"):
        natural_gradient(0.1, preconditioner="kfac", kfac=fisherlib.fisher(f, params, x, method="exact"))
