"""natural_gradient (optax) as one compiled program: ``update(..., refresh=)`` chooses the refresh
with ``jax.lax.cond``, so ``jax.jit(tx.update)`` compiles once and gives the eager path's updates
across refreshes; the state checkpoints (pickle, orbax) and continues identically."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

from fisherlib.natural import natural_gradient, value_grad_and_probes  # noqa: E402

N, REFRESH, STEPS = 16, 3, 7  # refreshes at steps 0, 3 and 6


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def f(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _setup():
    rng = np.random.default_rng(1)
    params = {"w1": jnp.asarray(rng.normal(size=(5, 6)) / 2), "b1": jnp.asarray(rng.normal(size=6) / 4),
              "w2": jnp.asarray(rng.normal(size=(6, 3)) / 2), "b2": jnp.zeros(3)}
    xs = [jnp.asarray(rng.normal(size=(N, 5))) for _ in range(STEPS)]
    ys = [jnp.asarray(rng.integers(0, 3, size=N)) for _ in range(STEPS)]
    return params, xs, ys


def _close(a, b, msg=""):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-11, atol=1e-14, err_msg=msg)


def _eager_run(tx, params, xs, ys, state=None, start=0):
    """The Python-decided path, not compiled: probes on refresh steps only."""
    state = tx.init(params) if state is None else state
    out = []
    for t in range(start, STEPS):
        due = t % REFRESH == 0
        _, g, pg = value_grad_and_probes(f, params, xs[t], ys[t], t, probes=2 if due else 0)
        u, state = tx.update(g, state, params, probe_grads=pg, n=N)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out, params, state


@pytest.mark.parametrize("preconditioner", ["ollivier", "unitwise", "diag"])
def test_jitted_update_with_refresh_equals_the_eager_path(preconditioner):
    """``jax.jit(tx.update)`` with ``refresh=state.count % 3 == 0`` traces once and gives the
    eager updates at every step, refreshes (0, 3, 6) and the steps between alike."""
    tx = natural_gradient(0.05, preconditioner=preconditioner, damping=1e-2, momentum=0.5, decay=0.9)
    params, xs, ys = _setup()
    eager, _, st_eager = _eager_run(tx, params, xs, ys)
    traces = []

    def traced(*a, **k):
        traces.append(1)
        return tx.update(*a, **k)

    update = jax.jit(traced)
    state, p = tx.init(params), params
    for t in range(STEPS):
        _, g, pg = value_grad_and_probes(f, p, xs[t], ys[t], t, probes=2)  # probes every step: cond picks
        u, state = update(g, state, p, probe_grads=pg, n=N, refresh=state.count % REFRESH == 0)
        _close(u, eager[t], f"step {t}")
        p = optax.apply_updates(p, u)
    assert len(traces) == 1
    _close(state, st_eager, "state")


def test_whole_training_step_compiles_once_and_checkpoints():
    """The training step with ``value_grad_and_probes(when=)`` and ``update(refresh=)`` is one
    program (traced once for seven steps and three refreshes) equal to the eager path; its
    state, pickled (and through orbax where installed) after step 4, continues identically."""
    tx = natural_gradient(0.05, preconditioner="ollivier", damping=1e-2, momentum=0.5)
    params, xs, ys = _setup()
    eager, p_eager, st_eager = _eager_run(tx, params, xs, ys)
    traces = []

    @jax.jit
    def step(p, state, x, y, seed):
        traces.append(1)
        due = state.count % REFRESH == 0
        loss, g, pg = value_grad_and_probes(f, p, x, y, seed, probes=2, when=due)
        u, state = tx.update(g, state, p, probe_grads=pg, n=x.shape[0], refresh=due)
        return optax.apply_updates(p, u), state, u

    def run(p, state, start, stop):
        for t in range(start, stop):
            p, state, u = step(p, state, xs[t], ys[t], t)
            _close(u, eager[t], f"step {t}")
        return p, state

    p, state = run(params, tx.init(params), 0, 4)
    blob = pickle.dumps(state)
    p_end, st_end = run(p, state, 4, STEPS)
    assert len(traces) == 1
    _close((p_end, st_end), (p_eager, st_eager))

    restored = pickle.loads(blob)
    assert type(restored) is type(state) and jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    _close(run(p, restored, 4, STEPS), (p_end, st_end))
    assert len(traces) == 1  # the unpickled state is the same pytree: no new compilation


def test_state_checkpoints_with_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = natural_gradient(0.05, preconditioner="unitwise", damping=1e-2, momentum=0.5)
    params, xs, ys = _setup()
    _, p, state = _eager_run(tx, params, xs[:2] + xs[2:], ys)
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "state", state)
    ck.wait_until_finished()
    back = ck.restore(tmp_path / "state", state)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    _close(back, state)
    _, g, pg = value_grad_and_probes(f, p, xs[0], ys[0], 9, probes=2)
    _close(tx.update(g, back, p, probe_grads=pg, n=N), tx.update(g, state, p, probe_grads=pg, n=N))


def test_refresh_needs_the_probe_gradients():
    tx = natural_gradient(0.05)
    params, xs, ys = _setup()
    state = tx.init(params)
    _, g, _ = value_grad_and_probes(f, params, xs[0], ys[0], 0, probes=0)
    with pytest.raises(ValueError, match="probe_grads: update\\(refresh=...\\) needs the probe gradients"):
        tx.update(g, state, params, refresh=True)
    with pytest.raises(ValueError, match="when: needs probes > 0"):
        value_grad_and_probes(f, params, xs[0], ys[0], 0, probes=0, when=True)
