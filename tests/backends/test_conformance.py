"""Every adapter against the protocol: dense Jacobians, finite differences, K-stacks,
per-example products, dtype and device, and probes (fisherlib.backends.testing)."""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib.backends import Backend, testing

from backend_cases import NumpyAsCupy, needs

CHECKS = [
    testing.check_vjp_dense,
    testing.check_vjp_directional,
    testing.check_vjp_batched,
    testing.check_per_example,
    testing.check_dtype_device,
]


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_conformance(conformance_case, check):
    backend, case = conformance_case
    if check is testing.check_per_example and not case.per_example:
        pytest.skip("this case does not support per-example VJPs")
    check(backend, case)


def test_adapters_satisfy_the_protocol(conformance_case):
    backend, _ = conformance_case
    assert isinstance(backend, Backend)
    assert isinstance(backend.name, str)


def _like(kind: str, dtype: str):
    if kind == "numpy":
        return np.zeros(3, dtype=dtype), np.asarray
    if kind == "array_api_strict":
        import array_api_strict as xps

        return xps.zeros(3, dtype=getattr(xps, dtype)), np.asarray
    if kind == "torch":
        import torch

        return torch.zeros(3, dtype=getattr(torch, dtype)), lambda a: a.cpu().numpy()
    if kind == "torch-cuda":
        import torch

        return torch.zeros(3, dtype=getattr(torch, dtype), device="cuda"), lambda a: a.cpu().numpy()
    if kind in ("jax", "jax-gpu"):
        import jax
        import jax.numpy as jnp

        like = jnp.zeros(3, dtype=dtype)
        return (jax.device_put(like, jax.devices("gpu")[0]) if kind == "jax-gpu" else like), np.asarray
    import cupy

    return cupy.zeros(3, dtype=dtype), cupy.asnumpy


PROBE_BACKENDS = [
    pytest.param("numpy", "numpy", id="numpy"),
    pytest.param("numpy", "array_api_strict", id="numpy-on-array_api_strict", marks=needs("array_api_strict")),
    pytest.param("torch", "torch", id="torch", marks=needs("torch")),
    pytest.param("torch", "torch-cuda", id="torch-cuda", marks=needs("torch", gpu="torch")),
    pytest.param("jax", "jax", id="jax", marks=needs("jax")),
    pytest.param("jax", "jax-gpu", id="jax-gpu", marks=needs("jax", gpu="jax")),
    pytest.param("numpy-as-cupy", "numpy", id="cupy-on-numpy"),
    pytest.param("cupy", "cupy", id="cupy", marks=needs("cupy", gpu="cupy")),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("name", "kind"), PROBE_BACKENDS)
def test_probes(name, kind, dtype):
    from fisherlib import backends

    backend = NumpyAsCupy.make() if name == "numpy-as-cupy" else backends.get(name)
    like, to_numpy = _like(kind, dtype)
    testing.check_probes(backend, like, to_numpy)


class _Biased:
    """A deliberately wrong adapter: Gaussian probes with variance 1.1, Rademacher ±1 shifted by 0.05."""

    name = "biased"

    def __init__(self, inner, fault):
        self.inner, self.fault = inner, fault

    def probes(self, seed, shape, dist, like):
        out = self.inner.probes(seed, shape, dist, like)
        if self.fault == "variance" and dist == "gaussian":
            return out * np.sqrt(1.1)
        if self.fault == "mean":
            return out + 0.05
        if self.fault == "seed":
            return self.inner.probes(int(np.random.default_rng().integers(1 << 30)), shape, dist, like)
        return out


@pytest.mark.parametrize("fault", ["variance", "mean", "seed"])
def test_probe_check_catches_a_biased_generator(fault):
    from fisherlib import backends

    with pytest.raises(AssertionError):
        testing.check_probes(_Biased(backends.get("numpy"), fault), np.zeros(1))


def test_dense_check_catches_a_wrong_vjp():
    """The dense reference is not vacuous: a VJP off by 1% fails."""
    from fisherlib import backends
    from fisherlib.models import MLP

    class Off(MLP):
        def vjp(self, params, x, ct):
            return {k: 1.01 * v for k, v in super().vjp(params, x, ct).items()}

        linearize = None

    model = Off([3, 4, 2])
    case = testing.Case(model, model.init(0), np.random.default_rng(0).standard_normal((3, 3)))
    with pytest.raises(AssertionError):
        testing.check_vjp_dense(backends.get("numpy"), case)
    with pytest.raises(AssertionError):
        testing.check_vjp_directional(backends.get("numpy"), case)


def test_the_suite_covers_every_installed_backend():
    from fisherlib import backends

    from backend_cases import CASES

    covered = {name.split("-")[0] for name in CASES} | {"numpy"}
    for name in backends.available():
        if name in ("numpy", "torch", "jax", "cupy"):
            assert name in covered, f"no conformance case for built-in backend {name!r}"
        elif hasattr(backends.get(name), "conformance_case"):
            assert f"third-party-{name}" in CASES, f"{name!r} opted in but is not in the suite"
