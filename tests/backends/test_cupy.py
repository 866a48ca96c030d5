"""The CuPy adapter. Its DLPack hand-over to torch and JAX runs here with NumPy standing in for
CuPy (same Generator and DLPack APIs); the real CuPy tests are marked ``gpu`` and skip cleanly."""

from __future__ import annotations

import numpy as np
import pytest
from backend_cases import HAS, NumpyAsCupy, needs

from fisherlib.models import MLP


def test_explicit_model_on_the_stand_in():
    be = NumpyAsCupy.make()
    model = MLP([3, 4, 2])
    params, x = model.init(0), np.ones((5, 3))
    z, vjp = be.linearize(model, params, x)
    g = vjp(be.probes(0, (2, 5, 2), "rademacher", z))
    assert g["0.weight"].shape == (2, 4, 3)
    assert be.per_example_vjp(model, params, x, np.ones((2, 5, 2)))["1.bias"].shape == (2, 5, 2)


@pytest.mark.skipif(not HAS["torch"], reason="torch is not installed")
def test_torch_model_gets_the_inputs_without_a_copy():
    import torch

    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2).double()

        def forward(self, x):
            seen.append(x.data_ptr())
            return self.lin(x)

    be = NumpyAsCupy.make()
    x = np.random.default_rng(0).standard_normal((4, 3))
    z, vjp = be.linearize(Spy(), None, x)  # an nn.Module: torch is chosen without via=
    assert seen == [x.ctypes.data]
    assert type(z) is np.ndarray and z.shape == (4, 2)
    g = vjp(np.ones((3, 4, 2)))
    assert type(g["lin.weight"]) is np.ndarray and g["lin.weight"].shape == (3, 2, 3)
    np.testing.assert_allclose(g["lin.bias"], np.full((3, 2), 4.0))


@pytest.mark.skipif(not HAS["jax"], reason="jax is not installed")
def test_jax_params_choose_jax():
    import jax.numpy as jnp

    be = NumpyAsCupy.make()
    z, vjp = be.linearize(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2), dtype=jnp.float64)}, np.ones((4, 3)))
    assert type(z) is np.ndarray
    assert type(vjp(np.ones((4, 2)))["w"]) is np.ndarray


def test_callable_with_array_params_needs_via():
    be = NumpyAsCupy.make()
    with pytest.raises(TypeError, match="via='torch'"):
        be.linearize(lambda p, x: x, {"w": np.ones(2)}, np.ones((2, 2)))
    with pytest.raises(ValueError, match="via: expected 'torch', 'jax' or None"):
        NumpyAsCupy.make(via="tf")


def test_probes_need_an_array_of_the_library():
    be = NumpyAsCupy.make()
    with pytest.raises(TypeError, match="like: expected a floating numpy array"):
        be.probes(0, (2,), "gaussian", np.ones(2, dtype=np.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("via", [pytest.param("torch", marks=needs("cupy", "torch", gpu="torch")),
                                 pytest.param("jax", marks=needs("cupy", "jax", gpu="jax"))])
def test_real_cupy_through_dlpack(via):
    import cupy

    model = MLP([3, 4, 2])
    params = model.init(0)
    x = cupy.asarray(np.random.default_rng(0).standard_normal((5, 3)))
    if via == "torch":
        import torch as fw
    else:
        import jax.numpy as fw

    def f(p, x):
        return fw.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["1.weight"].T + p["1.bias"]

    from fisherlib import backends

    be = backends.get("cupy", via=via)
    cparams = {k: cupy.asarray(v) for k, v in params.items()}
    z, vjp = be.linearize(f, cparams, x)
    assert isinstance(z, cupy.ndarray)
    ct = be.probes(0, (2, *z.shape), "gaussian", z)
    g = vjp(ct)
    want = model.vjp(params, cupy.asnumpy(x), cupy.asnumpy(ct))
    for k in want:
        assert isinstance(g[k], cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(g[k]), want[k], rtol=1e-10, atol=1e-12)
