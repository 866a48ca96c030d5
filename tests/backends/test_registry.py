"""The registry: names, inference from array types, errors, register() and entry points."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from backend_cases import HAS, needs

from fisherlib import backends
from fisherlib.backends import testing


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_imports_no_framework():
    code = """
        import sys
        import fisherlib, fisherlib.backends, fisherlib.models
        from fisherlib import backends
        backends.available()
        print(sorted(m for m in ("torch", "jax", "jaxlib", "cupy", "flax", "equinox") if m in sys.modules))
    """
    assert _run(code) == "[]"


def test_inferring_numpy_params_imports_no_framework():
    code = """
        import sys
        import numpy as np
        from fisherlib import backends
        from fisherlib.models import MLP
        be = backends.infer(MLP([3, 4, 2]).init(0))
        z, vjp = be.linearize(MLP([3, 4, 2]), MLP([3, 4, 2]).init(0), np.ones((2, 3)))
        vjp(be.probes(0, (2, 2, 2), "rademacher", z))
        print(be.name, sorted(m for m in ("torch", "jax", "jaxlib", "cupy") if m in sys.modules))
    """
    assert _run(code) == "numpy []"


@pytest.mark.parametrize("name", [pytest.param("numpy")] + [
    pytest.param(n, marks=needs(n)) for n in ("torch", "jax")
])
def test_get_builtin(name):
    be = backends.get(name)
    assert isinstance(be, backends.Backend)
    assert be.name == name
    assert backends.get(name) is be  # shared without options
    assert name in backends.available()


@pytest.mark.skipif(not HAS["jax"], reason="jax is not installed")
def test_get_with_options_makes_a_new_instance():
    be = backends.get("jax", jit=False)
    assert be is not backends.get("jax") and be.jit is False


def test_get_passes_an_instance_through():
    be = backends.get("numpy")
    assert backends.get(be) is be


def test_unknown_backend_lists_the_installed_ones():
    with pytest.raises(ValueError, match="'tensorflow' is unknown") as err:
        backends.get("tensorflow")
    assert "Installed backends: " in str(err.value) and "numpy" in str(err.value)
    assert "fisherlib.backends" in str(err.value)  # says how to add one
    with pytest.raises(TypeError, match="backend: expected a backend name"):
        backends.get(3)


def test_uninstalled_backend_names_the_extra(clean_registry):
    backends.register("ghost", lambda: None, requires="no_such_module_xyz", extra="ghost")
    assert "ghost" not in backends.available()
    assert "ghost" in backends.available(include_missing=True)
    with pytest.raises(ImportError, match=r"pip install 'fisherlib\[ghost\]'") as err:
        backends.get("ghost")
    assert "Installed backends: " in str(err.value)


@pytest.mark.skipif(HAS["cupy"], reason="cupy is installed")
def test_cupy_without_cupy_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install 'fisherlib\[cupy\]'"):
        backends.get("cupy")


def test_aliases():
    assert backends.get("pytorch").name == "torch" if HAS["torch"] else True
    assert backends.get("jaxlib").name == "jax" if HAS["jax"] else True


# -- inference ----------------------------------------------------------------------------------


def test_infer_numpy_and_nested_trees():
    assert backends.infer({"w": np.zeros(3)}).name == "numpy"
    assert backends.infer([None, {"a": (1.0, np.float64(2.0))}]).name == "numpy"
    assert backends.infer(np.zeros(2)).name == "numpy"


@pytest.mark.skipif(not HAS["array_api_strict"], reason="array_api_strict is not installed")
def test_infer_array_api_strict_is_numpy():
    import array_api_strict as xps

    assert backends.infer({"w": xps.zeros(3)}).name == "numpy"


@pytest.mark.skipif(not HAS["torch"], reason="torch is not installed")
def test_infer_torch():
    import torch

    assert backends.infer({"w": torch.zeros(2)}).name == "torch"
    assert backends.infer(torch.nn.Linear(2, 2)).name == "torch"  # a module, or a Parameter
    assert backends.infer([torch.nn.Parameter(torch.zeros(1))]).name == "torch"

    class Sub(torch.Tensor):  # a subclass from another module: found through its bases
        pass

    assert backends.infer(torch.zeros(1).as_subclass(Sub)).name == "torch"


@pytest.mark.skipif(not HAS["jax"], reason="jax is not installed")
def test_infer_jax_arrays_tracers_and_pytrees():
    import jax
    import jax.numpy as jnp

    assert type(jnp.zeros(1)).__module__.split(".")[0] == "jaxlib"  # the alias is needed
    assert backends.infer({"w": jnp.zeros(2)}).name == "jax"
    names = []

    @jax.jit
    def f(p):
        names.append(backends.infer(p).name)
        return p["w"]

    f({"w": jnp.zeros(2)})
    assert names == ["jax"]
    if HAS["equinox"]:
        import equinox as eqx

        mlp = eqx.nn.MLP(2, 2, 3, 1, key=jax.random.key(0))
        assert backends.infer(eqx.partition(mlp, eqx.is_array)[0]).name == "jax"


def test_infer_unknown_type_names_it():
    class Blob:
        pass

    with pytest.raises(TypeError, match=r"no backend handles .*Blob.*Registered backends: .*numpy"):
        backends.infer({"w": Blob()})
    with pytest.raises(TypeError, match="found no array leaves"):
        backends.infer({"w": [1.0, None]})


def test_infer_caches_per_type():
    from fisherlib.backends import _registry

    backends.infer({"w": np.zeros(1)})
    assert _registry._TYPE_CACHE[np.ndarray] == "numpy"


# -- third-party adapters ----------------------------------------------------------------------

TOY_MODULE = '''
"""A third-party adapter for "toy" arrays: NumPy arrays in a wrapper class from this module."""
import numpy as np
from fisherlib.backends.numpy import NumpyBackend
from fisherlib.backends.testing import Case
from fisherlib.models import MLP


class ToyArray(np.ndarray):
    """An array type whose top-level module is this one, so infer() must find it by name."""


class ToyBackend(NumpyBackend):
    name = "toy"

    def conformance_case(self):
        model = MLP([3, 4, 2])
        params = {k: v.view(ToyArray) for k, v in model.init(0).items()}
        x = np.random.default_rng(0).standard_normal((4, 3))
        return Case(model, params, x)
'''


@pytest.fixture
def toy_package(tmp_path, monkeypatch, clean_registry):
    """A distribution on sys.path whose entry point in group 'fisherlib.backends' is 'toy'."""
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "toy.py").write_text(TOY_MODULE)
    dist = pkg / "toy_fisherlib_adapter-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-fisherlib-adapter\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fisherlib.backends]\ntoy = toy:ToyBackend\n")
    monkeypatch.syspath_prepend(str(pkg))
    importlib.invalidate_caches()
    yield pkg
    sys.modules.pop("toy", None)


def test_entry_point_adapter_is_discovered(toy_package):
    assert "toy" not in sys.modules
    assert "toy" in backends.available()
    assert "toy" not in sys.modules  # listing does not load it
    be = backends.get("toy")
    assert be.name == "toy" and isinstance(be, backends.Backend)
    toy = sys.modules["toy"]
    assert backends.infer({"w": np.zeros(2).view(toy.ToyArray)}) is be  # by the type's module name
    testing.check_all(be, be.conformance_case())  # the opt-in conformance case passes


def test_entry_point_found_by_infer_before_get(toy_package):
    spec = importlib.util.spec_from_file_location("toy", toy_package / "toy.py")
    toy = importlib.util.module_from_spec(spec)
    sys.modules["toy"] = toy
    spec.loader.exec_module(toy)
    assert backends.infer([np.zeros(1).view(toy.ToyArray)]).name == "toy"


def test_entry_points_are_read_through_importlib_metadata(monkeypatch, clean_registry):
    import importlib.metadata as md

    class Plugin:
        name = "plug"

        def linearize(self, model, params, inputs):
            raise NotImplementedError

        def per_example_vjp(self, model, params, inputs, cotangents):
            raise NotImplementedError

        probes = leaves = unflatten = linearize

    ep = md.EntryPoint(name="plug", value="x:y", group="fisherlib.backends")
    monkeypatch.setattr(md.EntryPoint, "load", lambda self: Plugin)
    real = md.entry_points
    monkeypatch.setattr(md, "entry_points",
                        lambda **kw: [ep] if kw.get("group") == "fisherlib.backends" else real(**kw))
    assert "plug" in backends.available()
    assert isinstance(backends.get("plug"), Plugin)


def test_register_a_third_party_adapter(clean_registry):
    from fisherlib.backends.numpy import NumpyBackend

    class Mine(NumpyBackend):
        name = "mine"

    class MyArray(np.ndarray):
        pass

    MyArray.__module__ = "myarrays"
    backends.register("mine", Mine, modules=("myarrays",))
    assert "mine" in backends.available()
    be = backends.get("mine")
    assert isinstance(be, Mine)
    assert backends.infer({"w": np.zeros(1).view(MyArray)}) is be
    with pytest.raises(ValueError, match="already registered"):
        backends.register("mine", Mine)
    backends.register("mine", Mine(), replace=True)  # an instance works too
    assert isinstance(backends.get("mine"), Mine)
    backends.unregister("mine")
    assert "mine" not in backends.available()
    with pytest.raises(ValueError, match="no backend 'mine'"):
        backends.unregister("mine")


def test_register_by_import_path_and_bad_factories(clean_registry):
    backends.register("np2", "fisherlib.backends.numpy:NumpyBackend")
    from fisherlib.backends.numpy import NumpyBackend

    assert type(backends.get("np2")) is NumpyBackend
    backends.register("broken", lambda: object())
    with pytest.raises(TypeError, match="lacks"):
        backends.get("broken")
    with pytest.raises(TypeError, match="name: expected a non-empty str"):
        backends.register("", lambda: None)


def test_replacing_a_builtin_and_restoring_it(clean_registry):
    from fisherlib.backends.numpy import NumpyBackend

    class Custom(NumpyBackend):
        pass

    backends.register("numpy", Custom, replace=True)
    assert isinstance(backends.get("numpy"), Custom)
    assert isinstance(backends.infer(np.zeros(1)), Custom)
    backends.unregister("numpy")  # the built-in comes back
    assert type(backends.get("numpy")) is NumpyBackend
