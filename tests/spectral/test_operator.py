"""F v products against the dense float64 Fisher, on numpy, torch and JAX; the scipy and JAX views."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from fisherlib import backends
from fisherlib.models import MLP, Linear
from fisherlib.spectral import fisher_operator
from tests.spectral._cases import FRAMEWORKS, SIZES, case, data, reference, to_numpy

FW = [pytest.param(f, marks=pytest.mark.skipif(f != "numpy" and importlib.util.find_spec(f) is None,
                                                reason=f"{f} not installed")) for f in FRAMEWORKS]


@pytest.mark.parametrize("framework, bound", [
    pytest.param(f.values[0], b, marks=f.marks, id=f"{f.values[0]}-{b}")
    for f in FW for b in (None, "upper", "lower") if b is None or f.values[0] != "jax"])
def test_matmat_is_dense_fisher(framework, bound):
    model, params, batches, order = case(framework)
    op = fisher_operator(model, params, batches, bound=bound)
    F = reference(bound)[np.ix_(order, order)]
    V = np.random.default_rng(3).normal(size=(3, op.n_params))
    got = to_numpy(op.matmat(op.asarray(V)))
    np.testing.assert_allclose(got, V @ F, rtol=1e-10, atol=1e-12 * np.abs(F).max())
    one = to_numpy(op.matmat(op.asarray(V[0])))  # a single vector, same product
    np.testing.assert_allclose(one, got[0], rtol=1e-12, atol=1e-13 * np.abs(F).max())
    assert op.products == 4 and op.passes == 2 and op.n_inputs == 24


@pytest.mark.parametrize("framework", FW[:2])  # the core's kernels; JAX runs the same code
def test_tree_matvec_mean_and_sigmoid(framework):
    model, params, batches, order = case(framework)
    for likelihood, reduction in (("softmax", "mean"), ("sigmoid", "sum")):
        op = fisher_operator(model, params, batches, likelihood=likelihood, reduction=reduction)
        F = reference(likelihood=likelihood, reduction=reduction)[np.ix_(order, order)]
        v = np.random.default_rng(4).normal(size=op.n_params)
        tree = op.unflatten(op.asarray(v))
        out = op.matvec(tree)  # a tree in, a tree out
        assert [n for n, _ in op.backend.leaves(out)] == op.names
        np.testing.assert_allclose(to_numpy(op.flatten(out)), F @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("framework", FW)
def test_adapter_jvp_matches_jacobian(framework):
    """The adapters' jvp capability: J t, one direction and a stack of K."""
    model, params, batches, order = case(framework)
    op = fisher_operator(model, params, batches)
    be = op.backend
    from tests.estimators.fisher_reference import jacobians

    mlp = MLP(SIZES)
    _, J = jacobians(backends.get("numpy"), mlp, mlp.init(0), data())  # (N, C, P), numpy order
    T = np.random.default_rng(5).normal(size=(2, op.n_params))
    want = np.einsum("ncp,kp->knc", J[:10], T[:, np.argsort(order)])
    stacked = be.jvp(model, params, batches[0], op.unflatten(op.asarray(T)))
    np.testing.assert_allclose(to_numpy(stacked), want, rtol=1e-10, atol=1e-12)
    single = be.jvp(model, params, batches[0], op.unflatten(op.asarray(T[1])))
    np.testing.assert_allclose(to_numpy(single), want[1], rtol=1e-10, atol=1e-12)


def test_fallback_without_jvp():
    """An adapter without the capability: J v from the Jacobian rows (per-example VJPs)."""

    class NoJvp:  # an explicit-VJP model that states no jvp
        def __init__(self):
            self.m = MLP(SIZES)

        def forward(self, p, x):
            return self.m.forward(p, x)

        def vjp(self, p, x, ct):
            return self.m.vjp(p, x, ct)

    params = MLP(SIZES).init(0)
    op = fisher_operator(NoJvp(), params, [data()[:10], data()[10:]])
    V = np.random.default_rng(6).normal(size=(2, op.n_params))
    np.testing.assert_allclose(op.matmat(V), V @ reference(), rtol=1e-10, atol=1e-12)
    with pytest.raises(NotImplementedError, match="jvp"):
        backends.get("numpy").jvp(NoJvp(), params, data(), params)


def test_scipy_linear_operator():
    scipy = pytest.importorskip("scipy.sparse.linalg")
    model, params, batches, _ = case("numpy")
    A = fisher_operator(model, params, batches).to_scipy()
    F = reference()
    assert A.shape == F.shape
    vals = scipy.eigsh(A, k=2, which="LA", tol=1e-12)[0]
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(F)[-2:], rtol=1e-9)
    X = np.random.default_rng(7).normal(size=(F.shape[0], 3))
    np.testing.assert_allclose(A @ X, F @ X, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_jax_solver_on_pytrees():
    pytest.importorskip("jax")
    import jax
    from jax.scipy.sparse.linalg import cg

    model, params, batches, order = case("jax")
    op = fisher_operator(model, params, batches)
    f = op.as_function()
    damped = lambda t: jax.tree_util.tree_map(lambda a, b: a + 0.5 * b, f(t), t)  # noqa: E731
    rhs = jax.tree_util.tree_map(lambda a: a * 0 + 1.0, params)
    sol = jax.jit(lambda b: cg(damped, b, tol=1e-12, maxiter=300)[0])(rhs)  # one program
    F = reference()[np.ix_(order, order)]
    x = to_numpy(op.flatten(sol))
    np.testing.assert_allclose((F + 0.5 * np.eye(len(F))) @ x, np.ones(len(F)), atol=1e-8)


def test_bad_arguments():
    model, params = Linear(3, 2), Linear(3, 2).init(0)
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="bound"):
        fisher_operator(model, params, x, bound="middle")
    with pytest.raises(ValueError, match="bound"):
        fisher_operator(model, params, x, bound="upper", likelihood="sigmoid")
    with pytest.raises(ValueError, match="rank"):
        fisher_operator(model, params, x, rank=0)
    with pytest.raises(ValueError, match="reduction"):
        fisher_operator(model, params, x, reduction="max")
    with pytest.raises(ValueError, match="batches"):
        fisher_operator(model, params, [])
    op = fisher_operator(model, params, x)
    with pytest.raises(ValueError, match="V: expected shape"):
        op.matmat(np.ones((2, 5)))
    with pytest.raises(ValueError, match="tangent"):
        model.jvp(params, x, {"weight": np.ones((2, 2, 3, 1)), "bias": np.ones(2)})


@pytest.mark.parametrize("model", [MLP([3, 5, 4, 2], activation="relu"), MLP([3, 6, 2]), Linear(3, 4)],
                         ids=["relu MLP", "tanh MLP", "Linear"])
def test_model_jvp_is_the_jacobian(model):
    """fisherlib.models' own jvp: J t equals the Jacobian (from per-example VJPs) times t."""
    from tests.estimators.fisher_reference import jacobians

    params = model.init(seed=1)
    x = np.random.default_rng(2).normal(size=(7, 3))
    be = backends.get("numpy")
    _, J = jacobians(be, model, params, x)  # (N, C, P)
    names = list(params)
    T = np.random.default_rng(3).normal(size=(3, J.shape[-1]))
    sizes = np.cumsum([0] + [params[n].size for n in names])
    tree = {n: T[:, a:b].reshape(3, *params[n].shape) for n, a, b in zip(names, sizes[:-1], sizes[1:])}
    np.testing.assert_allclose(model.jvp(params, x, tree), np.einsum("ncp,kp->knc", J, T), rtol=1e-12, atol=1e-12)
    one = {n: v[0] for n, v in tree.items()}
    np.testing.assert_allclose(model.jvp(params, x, one), J @ T[0], rtol=1e-12, atol=1e-12)
