"""fisherlib.models: explicit VJPs against dense autodiff Jacobians, on several namespaces."""

from __future__ import annotations

import ast
import importlib.util
import inspect

import numpy as np
import pytest

from fisherlib import models
from fisherlib.models import MLP, Linear

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
HAS_STRICT = importlib.util.find_spec("array_api_strict") is not None

MODELS = [
    pytest.param(lambda: Linear(4, 3), id="linear"),
    pytest.param(lambda: MLP([4, 5, 3], "tanh"), id="mlp-tanh"),
    pytest.param(lambda: MLP([4, 5, 6, 3], "relu"), id="mlp-relu-2-hidden"),
]


def _data(model, seed=0, n=6, k=3):
    rng = np.random.default_rng(seed)
    params = model.init(seed)
    x = rng.standard_normal((n, model.in_features))
    ct = rng.standard_normal((k, n, model.classes))
    return params, x, ct


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("make", MODELS)
def test_vjp_matches_torch_jacobian(make):
    import torch

    model = make()
    params, x, ct = _data(model)
    pt = {k: torch.from_numpy(v) for k, v in params.items()}
    jac = torch.func.jacrev(lambda p: model.forward(p, torch.from_numpy(x)))(pt)
    stacked = model.vjp(params, x, ct)
    single = model.vjp(params, x, ct[1])
    rows = model.per_example_vjp(params, x, ct)
    z, lin_vjp = model.linearize(params, x)
    via_lin = lin_vjp(ct)
    np.testing.assert_allclose(z, model.forward(params, x))
    for name in params:
        j = jac[name].numpy()  # (N, C, *shape)
        want = np.tensordot(ct, j, axes=([1, 2], [0, 1]))
        np.testing.assert_allclose(stacked[name], want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(single[name], want[1], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(via_lin[name], want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(rows[name], np.einsum("knc,nc...->kn...", ct, j), rtol=1e-10, atol=1e-12)
        assert rows[name].shape == (3, 6, *params[name].shape)


@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed")
@pytest.mark.parametrize("make", MODELS)
def test_vjp_matches_jax_jacobian_and_traces(make):
    import jax
    import jax.numpy as jnp

    model = make()
    with jax.enable_x64(True):
        params, x, ct = _data(model, seed=1)
        pj = model.init(1, xp=jnp, dtype=jnp.float64)
        jac = jax.jacrev(lambda p: model.forward(p, jnp.asarray(x)))(pj)
        got = jax.jit(model.vjp)(pj, jnp.asarray(x), jnp.asarray(ct))  # the models trace
        for name in params:
            want = np.tensordot(ct, np.asarray(jac[name]), axes=([1, 2], [0, 1]))
            np.testing.assert_allclose(np.asarray(got[name]), want, rtol=1e-10, atol=1e-12)


def test_forward_against_a_direct_formula():
    model = MLP([4, 5, 3], "relu")
    params, x, _ = _data(model)
    h = np.maximum(x @ params["0.weight"].T + params["0.bias"], 0)
    np.testing.assert_allclose(model.forward(params, x), h @ params["1.weight"].T + params["1.bias"])
    lin = Linear(4, 3)
    p, x, _ = _data(lin)
    np.testing.assert_allclose(lin.forward(p, x), x @ p["weight"].T + p["bias"])


@pytest.mark.skipif(not HAS_STRICT, reason="array_api_strict is not installed")
@pytest.mark.parametrize("make", MODELS)
def test_array_api_strict_gives_the_numpy_values(make):
    import array_api_strict as xps

    model = make()
    params, x, ct = _data(model)
    sp = model.init(0, xp=xps, dtype=xps.float64)
    sx, sct = xps.asarray(x), xps.asarray(ct)
    for got, want in [(model.forward(sp, sx), model.forward(params, x))]:
        assert isinstance(got, type(sx))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    for method in (model.vjp, model.per_example_vjp):
        got, want = method(sp, sx, sct), method(params, x, ct)
        for name in params:
            assert isinstance(got[name], type(sx))
            np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", MODELS)
def test_read_only_inputs_are_not_written(make):
    model = make()
    params, x, ct = _data(model)
    for a in [*params.values(), x, ct]:
        a.flags.writeable = False
    model.vjp(params, x, ct)
    model.per_example_vjp(params, x, ct)
    model.linearize(params, x)[1](ct[0])


def test_init_is_reproducible_across_namespaces_and_keeps_dtype_and_device():
    model = MLP([3, 4, 2])
    a, b = model.init(7), model.init(7)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], model.init(8)["0.weight"])
    assert a["0.weight"].dtype == np.float64 and a["0.weight"].shape == (4, 3)
    bound = 1 / np.sqrt(3)
    assert np.all(np.abs(a["0.weight"]) <= bound)
    assert model.init(7, like=np.zeros(1, np.float32))["0.bias"].dtype == np.float32
    if HAS_TORCH:
        import torch

        t = model.init(7, xp=torch)
        assert t["0.weight"].dtype == torch.float32  # the namespace's default float
        t64 = model.init(7, like=torch.zeros(1, dtype=torch.float64))
        np.testing.assert_array_equal(t64["0.weight"].numpy(), a["0.weight"])


def test_errors_name_the_argument():
    model = MLP([3, 4, 2])
    params, x, ct = _data(model, n=5)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 3\), got \(5, 4\)"):
        model.forward(params, np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"ct: expected shape \(N, C\) or \(K, N, C\)"):
        model.vjp(params, x, np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"ct: expected shape \(K, N, C\)"):
        model.per_example_vjp(params, x, ct[0])
    with pytest.raises(KeyError, match="params: missing"):
        model.forward({"0.weight": params["0.weight"]}, x)
    with pytest.raises(ValueError, match="params: expected 0.weight"):
        model.forward({**params, "0.weight": np.ones((3, 3))}, x)
    with pytest.raises(ValueError, match="activation: expected one of"):
        MLP([3, 2], "sigmoid")
    with pytest.raises(ValueError, match="sizes: expected at least two"):
        MLP([3])
    with pytest.raises(TypeError, match="params: expected a dict"):
        model.forward([1, 2], x)


def test_names_and_repr():
    assert list(MLP([2, 3, 4, 5]).init(0)) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert list(Linear(2, 3).init(0)) == ["weight", "bias"]
    assert repr(MLP([2, 3], "relu")) == "MLP(sizes=[2, 3], activation='relu')"
    assert repr(Linear(2, 3)) == "Linear(in_features=2, classes=3)"


def test_module_imports_no_array_library_at_top_level():
    tree = ast.parse(inspect.getsource(models))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | {
        (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)
    }
    assert not names & {"numpy", "torch", "jax", "cupy"}, names
