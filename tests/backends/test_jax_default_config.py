"""JAX's default configuration (``jax_enable_x64`` off): the main entry points ask for no int64
and print no warning.

The rest of the suite runs JAX in float64; here x64 is off (as for a new user) and every warning
is an error: asking JAX for int64 there warns "Explicitly requested dtype int64 ... will be
truncated to int32" on every call. Sizes are tiny: compiling is what costs.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
from backend_cases import HAS

import fisherlib
from fisherlib import spectral
from fisherlib.core import cotangents
from fisherlib.estimators import RunningFisher

pytestmark = pytest.mark.skipif(not HAS["jax"], reason="jax is not installed")

N, C = 6, 3


def f(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


@pytest.fixture
def default_config():
    """x64 off and warnings as errors, for the test's duration."""
    global jax, jnp
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        rng = np.random.default_rng(0)
        params = {"w1": jnp.asarray(rng.standard_normal((4, 5)), dtype=jnp.float32), "b1": jnp.zeros(5),
                  "w2": jnp.asarray(rng.standard_normal((5, C)), dtype=jnp.float32), "b2": jnp.zeros(C)}
        x = jnp.asarray(rng.standard_normal((N, 4)), dtype=jnp.float32)
        y = jnp.asarray([0, 1, 2, -100, 1, 0])  # int32, one ignored label
        yield params, x, y


def _float32(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    assert leaves and all(a.dtype == jnp.float32 for a in leaves)


def test_estimators_and_running_fisher(default_config):
    params, x, y = default_config
    for method, kw in (("hutchinson", {"probes": 2}), ("mc", {"probes": 2}), ("exact", {}), ("empirical", {})):
        est = fisherlib.fisher(f, params, [(x, y)], method=method, **kw)
        _float32(est.value)
        assert est.n_outputs == N - 1
    rf = RunningFisher("quasidiag", probes=2)
    for _ in range(2):
        loss, grads = rf.step(f, params, x, y)
    _float32(grads), _float32(rf.value), _float32(rf.stderr)
    assert loss.dtype == jnp.float32
    _float32(spectral.fisher_operator(f, params, [x]).matvec(params))


def test_core_labels_and_optax_step(default_config):
    params, x, y = default_config
    z = f(params, x)
    u = jnp.asarray(np.random.default_rng(1).uniform(size=(2, N)), dtype=jnp.float32)
    labels = cotangents.sample_labels(z, u)
    assert labels.dtype == jnp.int32
    loss, ct, hut = cotangents.training_cotangents(z, jnp.abs(y), jnp.ones((2, N, C), jnp.float32))
    _float32((loss, ct, hut))
    if importlib.util.find_spec("optax") is None:
        pytest.skip("optax is not installed")
    import optax

    from fisherlib.natural import natural_gradient, value_grad_and_probes

    tx = natural_gradient(0.1, preconditioner="diag")

    @jax.jit
    def step(p, st, seed):
        value, g, pg = value_grad_and_probes(f, p, x, jnp.abs(y), seed, probes=2)
        upd, st = tx.update(g, st, p, probe_grads=pg, n=N)
        return optax.apply_updates(p, upd), st, value

    p1, _, value = step(params, tx.init(params), 3)
    _float32(p1)
    assert value.dtype == jnp.float32
