"""RunningFisher inside the caller's ``jax.jit``: the estimate is a pytree passed in and returned,
its probes' seed comes from the traced step count, and the steps equal the eager ones.

The seed derivation itself (:func:`derive_array`, SplitMix64 on uint32 words) is checked against
the integer :func:`derive` on NumPy and JAX, traced and not.
"""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib.estimators._seeds import derive, derive_array


def test_derive_array_equals_derive_on_numpy():
    rng = np.random.default_rng(0)
    seeds = [0, 1, 7, 2**40 + 3, 2**64 - 1, *map(int, rng.integers(0, 2**62, 4))]
    ts = np.asarray([0, 1, 2, 999, 2**24 + 1, 2**31 + 5, 2**32 - 1], dtype=np.uint32)
    for s in seeds:
        got = derive_array(s, ts, 7)
        assert got.dtype == np.uint32 and got.shape == ts.shape
        assert [int(v) for v in got] == [derive(s, int(t), 7) for t in ts], s
    assert int(derive_array(5, np.asarray(3, dtype=np.uint32))) == derive(5, 3)  # 0-d in, 0-d out
    with pytest.raises(TypeError, match="array key"):
        derive_array(1, 2)


jax = pytest.importorskip("jax")
jnp = jax.numpy

from fisherlib.estimators import RunningFisher  # noqa: E402


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def test_derive_array_traced_equals_derive():
    f = jax.jit(lambda t: derive_array(123456789, t, 7))
    for t in (0, 1, 77, 2**20 + 3):
        assert int(f(jnp.asarray(float(t)))) == derive(123456789, t, 7)  # the state's float step count


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _setup():
    rng = np.random.default_rng(3)
    params = {"w1": jnp.asarray(rng.standard_normal((3, 4))), "b1": jnp.asarray(rng.standard_normal(4)),
              "w2": jnp.asarray(rng.standard_normal((4, 3))), "b2": jnp.asarray(rng.standard_normal(3))}
    xs = [jnp.asarray(rng.standard_normal((5, 3))) for _ in range(4)]
    y = jnp.asarray([0, 2, -100, 1, 1])
    return params, xs, y


@pytest.mark.parametrize("decay", [None, 0.95])
def test_step_inside_jit_equals_the_eager_steps(decay):
    """Four steps through a jitted training step (the estimate in and out, two of them before and
    after an eager step) give the eager estimate's losses, gradients, value and standard error to
    rounding; the compiled function traces twice (no state yet; a state) and no more."""
    params, xs, y = _setup()
    traces = []

    @jax.jit
    def train(rf, p, x, y):
        traces.append(1)
        loss, grads = rf.step(_mlp, p, x, y)
        return rf, loss, grads

    eager = RunningFisher("quasidiag", probes=2, decay=decay)
    jitted = RunningFisher("quasidiag", probes=2, decay=decay)
    for i, x in enumerate(xs):
        le, ge = eager.step(_mlp, params, x, y)
        if i == 2:  # an eager step of the same object between the jitted ones
            lj, gj = jitted.step(_mlp, params, x, y)
        else:
            jitted, lj, gj = train(jitted, params, x, y)
        np.testing.assert_allclose(float(lj), float(le), rtol=1e-12)
        for a, b in zip(jax.tree_util.tree_leaves(gj), jax.tree_util.tree_leaves(ge), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-14)
    assert len(traces) == 2 and jitted.steps == eager.steps == 4
    assert sorted(jitted.value) == sorted(eager.value) and "cross:w1" in eager.value
    for k in eager.value:
        np.testing.assert_allclose(np.asarray(jitted.value[k]), np.asarray(eager.value[k]), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(np.asarray(jitted.stderr[k]), np.asarray(eager.stderr[k]), rtol=1e-9, atol=1e-15)
    # A different probe draw each step: the seeds follow the traced step count, not a constant.
    one = RunningFisher("diag", probes=1, decay=None)
    a = train(one, params, xs[0], y)[0]
    b = train(a, params, xs[0], y)[0]
    assert not np.allclose(np.asarray(b.value["diag:w2"]), np.asarray(a.value["diag:w2"]))


def test_step_captured_by_a_jitted_function_is_an_error():
    """An estimate with a state, captured from outside (not passed through), would keep the
    trace's values and skip every later call's step: a clear error instead."""
    params, xs, y = _setup()
    rf = RunningFisher("diag", probes=2, decay=0.95)
    rf.step(_mlp, params, xs[0], y)
    with pytest.raises(RuntimeError, match="pass the estimate into the jitted function and return it"):
        jax.jit(lambda p, x, y: rf.step(_mlp, p, x, y))(params, xs[1], y)
    assert rf.steps == 1 and not isinstance(rf.state["t"], jax.core.Tracer)  # untouched
