"""Conformance cases for every built-in adapter (imported by conftest.py and the tests).

A case is (backend, :class:`fisherlib.backends.testing.Case`): a tiny float64 model with a dense
reference Jacobian from the framework's own ``jacrev`` where there is one. Cases of frameworks
that are not installed are skipped; GPU cases are marked ``gpu`` and skip without a device.
Registered third-party adapters join by providing ``conformance_case()``.
"""

from __future__ import annotations

import contextlib
import importlib.util

import numpy as np
import pytest

from fisherlib import backends
from fisherlib.backends.testing import Case
from fisherlib.models import MLP, Linear
from tests._backends import capability_marks

HAS = {m: importlib.util.find_spec(m) is not None
       for m in ("torch", "jax", "flax", "equinox", "cupy", "array_api_strict")}
BUILTIN = ("numpy", "torch", "jax", "cupy")
N, D, H, C = 5, 4, 6, 3


def needs(*modules: str, gpu: str | None = None) -> list:
    """Skip without ``modules``; with ``gpu`` (a backend name), the GPU marks of
    fisherlib/_capabilities.py for that backend (checked only where its framework is installed)."""
    marks = [pytest.mark.skipif(not HAS[m], reason=f"{m} is not installed") for m in modules]
    if gpu is not None:
        if HAS[gpu]:
            marks += capability_marks(gpu, "gpu")
        else:
            marks += [pytest.mark.gpu, pytest.mark.skip(reason=f"{gpu} is not installed")]
    return marks


def inputs(n: int = N, d: int = D, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


class NumpyAsCupy:
    """The CuPy adapter with NumPy as its array library: its DLPack path, run on the CPU."""

    @staticmethod
    def make(**options):
        from fisherlib.backends.cupy import CupyBackend

        class Backend(CupyBackend):
            _array_module = "numpy"

        return Backend(**options)


# -- dense references ---------------------------------------------------------------------------


def _torch_jacobian_of_explicit(model, params, x):
    """jacrev of an Array API model run on torch tensors: an autodiff reference for explicit VJPs."""
    import torch

    pt = {k: torch.from_numpy(np.asarray(v)) for k, v in params.items()}
    xt = torch.from_numpy(np.asarray(x))
    jac = torch.func.jacrev(lambda p: model.forward(p, xt))(pt)
    return {k: jac[k].numpy() for k in params}


# -- the cases ----------------------------------------------------------------------------------

CASES: dict[str, tuple] = {}


def case(name: str, *marks):
    def register(builder):
        CASES[name] = (builder, [m for group in marks for m in group])
        return builder

    return register


@case("numpy-mlp-tanh")
def _numpy_mlp():
    model = MLP([D, H, C], "tanh")
    params, x = model.init(0), inputs()
    jac = (lambda: _torch_jacobian_of_explicit(model, params, x)) if HAS["torch"] else None
    return backends.get("numpy"), Case(model, params, x, jacobian=jac)


@case("numpy-linear")
def _numpy_linear():
    model = Linear(D, C)
    params, x = model.init(1), inputs(seed=1)
    jac = (lambda: _torch_jacobian_of_explicit(model, params, x)) if HAS["torch"] else None
    return backends.get("numpy"), Case(model, params, x, jacobian=jac)


@case("numpy-minimal-protocol")
def _numpy_minimal():
    """A model with forward and vjp only: the adapter's fallbacks (vjp re-runs forward; per input loop)."""
    inner = MLP([D, H, C], "relu")

    class Minimal:
        forward = staticmethod(inner.forward)
        vjp = staticmethod(inner.vjp)

    return backends.get("numpy"), Case(Minimal(), inner.init(2), inputs(seed=2))


@case("array_api_strict-mlp", needs("array_api_strict"))
def _strict_mlp():
    import array_api_strict as xps

    model = MLP([D, H, C], "tanh")
    params = model.init(3, xp=xps, dtype=xps.float64)
    return backends.get("numpy"), Case(
        model, params, xps.asarray(inputs(seed=3)), to_numpy=np.asarray, from_numpy=xps.asarray
    )


def _torch_case(kind: str, device: str = "cpu"):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.LayerNorm(H), torch.nn.Linear(H, C)
    ).to(device=device, dtype=torch.float64)
    x = torch.from_numpy(inputs()).to(device)
    own = {k: v.detach() for k, v in net.named_parameters()}

    def to_numpy(a):
        return a.detach().cpu().numpy()

    def from_numpy(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    if kind == "module":
        model, params = net, None
    elif kind == "dict":
        model, params = net, own
    else:  # a plain callable over a nested tree
        def model(p, x):
            h = torch.tanh(x @ p["layers"][0]["w"].T + p["layers"][0]["b"])
            return h @ p["layers"][1]["w"].T + p["layers"][1]["b"]

        params = {"layers": [{"w": own["0.weight"], "b": own["0.bias"]}, {"w": own["3.weight"], "b": own["3.bias"]}]}

    def jacobian():
        flat = dict(backends.get("torch").leaves(params if params is not None else net))
        names = list(flat)

        def f(*leaves):
            tree = backends.get("torch").unflatten(params if params is not None else net, list(leaves))
            if params is None:
                return torch.func.functional_call(net, tree, (x,))
            return torch.func.functional_call(net, tree, (x,)) if kind == "dict" else model(tree, x)

        jac = torch.func.jacrev(f, argnums=tuple(range(len(names))))(*[flat[n].detach() for n in names])
        return {n: to_numpy(j) for n, j in zip(names, jac)}

    return backends.get("torch"), Case(model, params, x, to_numpy, from_numpy, jacobian)


case("torch-module", needs("torch"))(lambda: _torch_case("module"))
case("torch-dict", needs("torch"))(lambda: _torch_case("dict"))
case("torch-callable", needs("torch"))(lambda: _torch_case("callable"))
case("torch-module-cuda", needs("torch", gpu="torch"))(lambda: _torch_case("module", "cuda"))


def _jax_case(kind: str):
    import jax
    import jax.numpy as jnp

    def from_numpy(a):
        a = jnp.asarray(a)
        return jax.device_put(a, jax.devices("gpu")[0]) if kind == "gpu" else a

    x = from_numpy(inputs())
    if kind in ("dict", "gpu"):
        mlp = MLP([D, H, C], "tanh")
        params = {k: from_numpy(np.asarray(v)) for k, v in mlp.init(4).items()}

        def model(p, x):
            return jnp.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["1.weight"].T + p["1.bias"]

    elif kind == "flax":
        import flax.linen as fnn

        class Net(fnn.Module):
            @fnn.compact
            def __call__(self, x):
                h = jnp.tanh(fnn.Dense(H, param_dtype=jnp.float64)(x))
                return fnn.Dense(C, param_dtype=jnp.float64)(h)

        net = Net()
        params, model = net.init(jax.random.key(0), x), net.apply
    else:
        import equinox as eqx

        mlp = eqx.nn.MLP(D, C, H, 1, activation=jnp.tanh, key=jax.random.key(1), dtype=jnp.float64)
        params, static = eqx.partition(mlp, eqx.is_array)

        def model(p, x):
            return jax.vmap(eqx.combine(p, static))(x)

    def jacobian():
        jac = jax.jacrev(lambda p: model(p, x))(params)
        return {n: np.asarray(j) for n, j in backends.get("jax").leaves(jac)}

    return backends.get("jax"), Case(model, params, x, np.asarray, from_numpy, jacobian)


case("jax-dict", needs("jax"))(lambda: _jax_case("dict"))
case("jax-flax", needs("jax", "flax"))(lambda: _jax_case("flax"))
case("jax-equinox", needs("jax", "equinox"))(lambda: _jax_case("equinox"))
case("jax-dict-gpu", needs("jax", gpu="jax"))(lambda: _jax_case("gpu"))


def _dlpack_case(via: str):
    """A model in ``via`` fed NumPy data through the CuPy adapter's DLPack path (NumPy as CuPy)."""
    mlp = MLP([D, H, C], "tanh")
    params, x = mlp.init(5), inputs(seed=5)
    if via == "torch":
        import torch as fw

        def model(p, x):
            return fw.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["1.weight"].T + p["1.bias"]
    else:
        import jax.numpy as fw

        def model(p, x):
            return fw.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["1.weight"].T + p["1.bias"]

    jac = (lambda: _torch_jacobian_of_explicit(mlp, params, x)) if HAS["torch"] else None
    return NumpyAsCupy.make(via=via), Case(model, params, x, jacobian=jac)


case("cupy-dlpack-torch-on-numpy", needs("torch"))(lambda: _dlpack_case("torch"))
case("cupy-dlpack-jax-on-numpy", needs("jax"))(lambda: _dlpack_case("jax"))


@case("cupy-mlp", needs("cupy", gpu="cupy"))
def _cupy_mlp():
    import cupy

    model = MLP([D, H, C], "tanh")
    params = model.init(6, xp=cupy, dtype=cupy.float64)
    return backends.get("cupy"), Case(model, params, cupy.asarray(inputs(seed=6)), cupy.asnumpy, cupy.asarray)


@case("cupy-dlpack-torch-cuda", needs("cupy", "torch", gpu="cupy"), needs("torch", gpu="torch"))
def _cupy_torch():
    import cupy
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)).cuda().double()
    x = cupy.asarray(inputs())
    # The parameters stay torch tensors on the GPU; only inputs, logits, cotangents and gradients are CuPy.
    params = {k: cupy.from_dlpack(v.detach()) for k, v in net.named_parameters()}
    return backends.get("cupy", via="torch"), Case(net, params, x, cupy.asnumpy, cupy.asarray)


def _third_party_cases() -> dict[str, tuple]:
    """Registered adapters beyond the built-ins that opt in with ``conformance_case()``."""
    out = {}
    for name in backends.available():
        if name in BUILTIN:
            continue
        try:
            backend = backends.get(name)
        except Exception as exc:  # report a broken adapter as a failing case, not a collection error
            out[f"third-party-{name}"] = (lambda exc=exc: pytest.fail(f"backend {name!r}: {exc}"), [])
            continue
        if hasattr(backend, "conformance_case"):
            out[f"third-party-{name}"] = ((lambda b=backend: (b, b.conformance_case())), [])
    return out


CASES.update(_third_party_cases())


@contextlib.contextmanager
def clean_registry_state():
    """Restore the registry's tables after a test that registers adapters."""
    from fisherlib.backends import _registry as reg

    saved = (dict(reg._ENTRIES), dict(reg._INSTANCES), dict(reg._TYPE_CACHE), reg._SCANNED, set(reg._LOOKED_UP))
    try:
        yield reg
    finally:
        reg._ENTRIES.clear()
        reg._ENTRIES.update(saved[0])
        reg._INSTANCES.clear()
        reg._INSTANCES.update(saved[1])
        reg._TYPE_CACHE.clear()
        reg._TYPE_CACHE.update(saved[2])
        reg._SCANNED = saved[3]
        reg._LOOKED_UP.clear()
        reg._LOOKED_UP.update(saved[4])
