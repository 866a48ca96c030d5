"""sophia (optax) and natural_gradient(preconditioner="sophia"): a jitted step is Sophia's clipped rule
with the Hutchinson diagonal computed here by hand in float64; the clip bounds every coordinate; the
diagonal changes only on refresh steps; the state is a pytree; bad input names the argument."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

from fisherlib import backends  # noqa: E402
from fisherlib.natural import natural_gradient, sophia, value_grad_and_probes  # noqa: E402

N = 24


def f(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _setup():
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(5, 6)) / 2), "b1": jnp.zeros(6),
              "w2": jnp.asarray(rng.normal(size=(6, 3)) / 2), "b2": jnp.zeros(3)}
    x = jnp.asarray(rng.normal(size=(N, 5)))
    y = jnp.asarray((np.asarray(x[:, 0]) > 0).astype(int) + (np.asarray(x[:, 1]) > 0.5))
    return params, x, y


PARAMS, X, Y = _setup()


def _step(tx):
    @jax.jit
    def refresh(p, st, seed):
        loss, g, pg = value_grad_and_probes(f, p, X, Y, seed, probes=1)
        u, st = tx.update(g, st, p, probe_grads=pg, n=N)
        return optax.apply_updates(p, u), st

    @jax.jit
    def plain(p, st):
        loss, g, _ = value_grad_and_probes(f, p, X, Y, 0, probes=0)
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st

    return refresh, plain


def _hand(params, steps, k, *, lr, betas, gamma, eps, wd, mask=None):
    """The rule in NumPy float64: the probe ξ drawn as value_grad_and_probes draws it, Bξ by hand."""
    b1, b2 = betas
    be = backends.get("jax")
    p = {n: np.asarray(v, dtype=np.float64) for n, v in params.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    num = {n: np.zeros_like(v) for n, v in p.items()}
    den = 0.0
    for t in range(steps):
        jp = {n: jnp.asarray(v) for n, v in p.items()}
        g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(f(q, X), Y).mean())(jp)
        if t % k == 0:
            z = np.asarray(f(jp, X))
            xi = np.asarray(be.probes(t, (1, *z.shape), "rademacher", like=jnp.asarray(z)))[0]
            e = np.exp(z - z.max(-1, keepdims=True))
            pr = e / e.sum(-1, keepdims=True)
            s = np.sqrt(pr)
            ct = s * xi - pr * (s * xi).sum(-1, keepdims=True)
            _, vjp = jax.vjp(lambda q: f(q, X), jp)
            (pg,) = vjp(jnp.asarray(ct))
            num = {n: b2 * num[n] + (1 - b2) * np.asarray(pg[n]) ** 2 / N for n in p}
            den = b2 * den + (1 - b2)
        for n in p:
            m[n] = b1 * m[n] + (1 - b1) * np.asarray(g[n])
            step = np.clip(m[n] / np.maximum(gamma * num[n] / den, eps), -1, 1)
            decay = wd if mask is None or mask[n] else 0.0
            p[n] = p[n] - lr * (step + decay * p[n])
    return p


@pytest.mark.parametrize("via", ["sophia", "natural_gradient"])
def test_step_is_the_hand_formula_in_float64(via):
    opts = dict(betas=(0.9, 0.8), gamma=0.3, eps=1e-6, weight_decay=0.1)
    tx = sophia(0.02, **opts) if via == "sophia" else natural_gradient(0.02, preconditioner="sophia", **opts)
    refresh, plain = _step(tx)
    p, st = PARAMS, tx.init(PARAMS)
    for t in range(7):
        p, st = refresh(p, st, t) if t % 3 == 0 else plain(p, st)
    want = _hand(PARAMS, 7, 3, lr=0.02, betas=(0.9, 0.8), gamma=0.3, eps=1e-6, wd=0.1)
    for n in want:
        np.testing.assert_allclose(np.asarray(p[n]), want[n], rtol=1e-12, atol=1e-14)


def test_one_compiled_step_with_refresh_equals_the_two_step_functions():
    tx = sophia(0.02, betas=(0.9, 0.8), gamma=0.3, eps=1e-6)
    refresh, plain = _step(tx)

    @jax.jit
    def whole(p, st, t):
        due = t % 3 == 0
        _, g, pg = value_grad_and_probes(f, p, X, Y, t, probes=1, when=due)
        u, st = tx.update(g, st, p, probe_grads=pg, n=N, refresh=due)
        return optax.apply_updates(p, u), st

    p, st = PARAMS, tx.init(PARAMS)
    q, sq = PARAMS, tx.init(PARAMS)
    for t in range(7):
        p, st = refresh(p, st, t) if t % 3 == 0 else plain(p, st)
        q, sq = whole(q, sq, t)
    for n in p:
        np.testing.assert_allclose(np.asarray(q[n]), np.asarray(p[n]), rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="probe_grads:"):
        tx.update(PARAMS, tx.init(PARAMS), PARAMS, refresh=True)


def test_weight_decay_mask_is_a_parameter_group():
    mask = {"w1": True, "b1": False, "w2": True, "b2": False}
    tx = sophia(0.02, gamma=0.3, weight_decay=0.5, mask=mask)
    refresh, plain = _step(tx)
    p, st = PARAMS, tx.init(PARAMS)
    for t in range(4):
        p, st = refresh(p, st, t) if t % 2 == 0 else plain(p, st)
    want = _hand(PARAMS, 4, 2, lr=0.02, betas=(0.965, 0.99), gamma=0.3, eps=1e-12, wd=0.5, mask=mask)
    for n in want:
        np.testing.assert_allclose(np.asarray(p[n]), want[n], rtol=1e-12, atol=1e-14)


def test_clip_bounds_the_step_and_the_diagonal_moves_only_on_refresh():
    tx = sophia(0.05, gamma=1e-3, weight_decay=0.0)
    refresh, plain = _step(tx)
    p, st = PARAMS, tx.init(PARAMS)
    clipped = free = 0
    for t in range(6):
        before, fisher = p, st[0].fisher
        p, st = refresh(p, st, t) if t % 3 == 0 else plain(p, st)
        same = jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), fisher,
                                                             st[0].fisher))
        assert same == (t % 3 != 0)
        for n in p:
            d = np.abs(np.asarray(p[n]) - np.asarray(before[n]))
            assert (d <= 0.05 * (1 + 1e-12)).all()
            clipped += int((d >= 0.05 * (1 - 1e-12)).sum())
            free += int((d < 0.05 * 0.99).sum())
    assert clipped > 0 and free > 0


def test_state_is_a_pytree_that_round_trips_through_numpy():
    tx = sophia(0.02, stderr=True)
    refresh, plain = _step(tx)
    p, st = refresh(PARAMS, tx.init(PARAMS), 0)
    leaves, tree = jax.tree_util.tree_flatten(st)
    st2 = jax.tree_util.tree_unflatten(tree, [jnp.asarray(np.asarray(v)) for v in leaves])
    a, _ = plain(p, st)
    b, _ = plain(p, st2)
    for n in a:
        np.testing.assert_array_equal(np.asarray(a[n]), np.asarray(b[n]))
    assert "s" in st[0].fisher  # the error bar's second moments


@pytest.mark.parametrize("kwargs, match, exc", [
    (dict(betas=(0.9, 1.0)), "betas:", ValueError),
    (dict(gamma=-1.0), "gamma:", ValueError),
    (dict(eps=0.0), "eps:", ValueError),
    (dict(weight_decay=-1.0), "weight_decay:", ValueError),
    (dict(damping=0.5), "damping:", TypeError),
    (dict(kl_clip=None), "kl_clip:", TypeError),
    (dict(momentum=0.9), "momentum:", TypeError),
    (dict(colour=1), "colour", TypeError),
])
def test_bad_input_names_the_argument(kwargs, match, exc):
    with pytest.raises(exc, match=match):
        natural_gradient(0.01, preconditioner="sophia", **kwargs)


def test_sophia_options_need_the_sophia_preconditioner_and_n_with_probes():
    with pytest.raises(TypeError, match="gamma"):
        natural_gradient(0.01, preconditioner="diag", gamma=0.1)
    with pytest.raises(ValueError, match="lr:"):
        sophia(-0.1)
    tx = sophia(0.01)
    _, g, pg = value_grad_and_probes(f, PARAMS, X, Y, 0, probes=1)
    with pytest.raises(ValueError, match="n:"):
        tx.update(g, tx.init(PARAMS), PARAMS, probe_grads=pg)
