"""The same weights in numpy, torch and jax give the same Fisher (float64)."""

from __future__ import annotations

import numpy as np
import pytest

import fisherlib
from fisherlib.models import MLP
from fisher_reference import torch_mlp

D, H, C, N = 3, 5, 4, 10


@pytest.fixture(scope="module")
def weights():
    params = MLP([D, H, C]).init(seed=5, like=np.zeros(1))
    x = np.random.default_rng(3).normal(size=(N, D))
    return params, x


ORDER = ["0.weight", "0.bias", "1.weight", "1.bias"]


def _flat(est, rename=None):
    """Leaves in the numpy model's order; names normalised across frameworks' conventions."""
    v = est.to_numpy().value
    canon = {(rename or {}).get(n.strip("[]'\""), n.strip("[]'\"")): np.ravel(v[n]) for n in est.names}
    return np.concatenate([canon[n] for n in ORDER])


def _jax_model(params):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy

    def f(p, x):
        h = jnp.tanh(x @ p["0.weight"].T + p["0.bias"])
        return h @ p["1.weight"].T + p["1.bias"]

    return f, {k: jnp.asarray(v) for k, v in params.items()}, jnp


@pytest.mark.parametrize("kw", [dict(method="exact"), dict(method="exact", bound="lower"),
                                dict(method="exact", likelihood="sigmoid"), dict(structure="trace", method="exact")])
def test_exact_fisher_agrees_across_frameworks(weights, kw):
    params, x = weights
    ref = fisherlib.fisher(MLP([D, H, C]), params, x, **kw)
    torch, net = torch_mlp(params)
    t = fisherlib.fisher(net, None, torch.as_tensor(x), **kw)
    f, jparams, jnp = _jax_model(params)
    j = fisherlib.fisher(f, jparams, jnp.asarray(x), **kw)
    if kw.get("structure") == "trace":
        vals = [float(np.asarray(e.to_numpy().value)) for e in (ref, t, j)]
        np.testing.assert_allclose(vals[1:], vals[0], rtol=1e-10)
        return
    np.testing.assert_allclose(_flat(t, {"2.weight": "1.weight", "2.bias": "1.bias"}), _flat(ref),
                               rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(_flat(j), _flat(ref), rtol=1e-10, atol=1e-14)


def test_hutchinson_runs_on_each_framework_and_stays_there(weights):
    params, x = weights
    torch, net = torch_mlp(params)
    est = fisherlib.fisher(net, None, [torch.as_tensor(x[:5]), torch.as_tensor(x[5:])], probes=4)
    assert all(isinstance(v, torch.Tensor) for v in est.value.values())
    f, jparams, jnp = _jax_model(params)
    est = fisherlib.fisher(f, jparams, jnp.asarray(x), probes=4, structure="sketch")
    assert est.value.size == sum(v.size for v in params.values())
