"""One small MLP, the same weights on every framework, and its dense float64 Fisher (tests only)."""

from __future__ import annotations

import numpy as np

from fisherlib import backends
from fisherlib.models import MLP
from tests.estimators.fisher_reference import dense_fisher, jacobians

SIZES = (4, 7, 3)
N = 24
FRAMEWORKS = ("numpy", "torch", "jax")


def data(n: int = N, seed: int = 0) -> np.ndarray:
    return 1.5 * np.random.default_rng(seed).normal(size=(n, SIZES[0]))


def case(framework: str, *, seed: int = 0):
    """(model, params, batches, leaf_order): two batches; params None for the torch module.

    ``leaf_order`` maps the flat vector of this framework to that of the NumPy reference (JAX
    sorts dict keys; torch and NumPy keep the layer order).
    """
    mlp = MLP(SIZES, activation="tanh")
    p = mlp.init(seed)
    x = data()
    if framework == "numpy":
        model, params, xs = mlp, p, x
    elif framework == "torch":
        import torch

        layers = [torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.Tanh(), torch.nn.Linear(SIZES[1], SIZES[2])]
        model = torch.nn.Sequential(*layers).double()
        with torch.no_grad():
            for (_, q), v in zip(model.named_parameters(), p.values()):
                q.copy_(torch.as_tensor(v))
        params, xs = None, torch.as_tensor(x)
    else:
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        model, params, xs = mlp.forward, {k: jnp.asarray(v) for k, v in p.items()}, jnp.asarray(x)
    batches = [xs[:10], xs[10:]]
    return model, params, batches, _order(framework, p)


def _order(framework, p):
    """Index array: reference flat vector[idx] = this framework's flat layout."""
    names = list(p)
    sizes = [p[n].size for n in names]
    starts = dict(zip(names, np.cumsum([0] + sizes[:-1])))
    ordered = sorted(names) if framework == "jax" else names
    return np.concatenate([np.arange(starts[n], starts[n] + p[n].size) for n in ordered])


def reference(bound=None, likelihood="softmax", reduction="sum"):
    """Dense F (or F_UB / F_LB) of :func:`case`'s model on its data, float64, NumPy leaf order."""
    mlp = MLP(SIZES, activation="tanh")
    p = mlp.init(0)
    x = data()
    z, J = jacobians(backends.get("numpy"), mlp, p, x)
    F = dense_fisher(J, z, likelihood, bound)
    return F / len(x) if reduction == "mean" else F


def to_numpy(a) -> np.ndarray:
    from fisherlib.estimators._estimate import _to_numpy

    return np.asarray(_to_numpy(a), dtype=np.float64)
