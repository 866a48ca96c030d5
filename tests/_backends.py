"""The array backends the test suite runs on, and helpers to move arrays in and out of them.

Every test that takes the ``xp`` fixture (see ``tests/conftest.py``) runs once per backend:

- ``numpy``: NumPy through ``array_api_compat.numpy``;
- ``numpy:readonly``: NumPy whose arrays all have ``writeable=False`` (catches writes to inputs);
- ``array_api_strict``: the standard's reference implementation (catches anything non-standard);
- ``torch``: PyTorch on the CPU;
- ``jax``: JAX on its default device, float64 enabled (``jax_enable_x64``, set in conftest);
- ``torch:cuda``, ``jax:gpu``, ``cupy``: on a GPU, marked ``gpu``.

A backend whose framework is not installed is skipped, and so is a GPU backend without a GPU.
``FISHERLIB_TEST_BACKENDS=numpy,torch pytest`` runs a subset (unknown names are an error).

Tests build inputs in NumPy float64 and convert them with :func:`to_xp`; results come back
with :func:`to_numpy` for comparison against dense float64 references.
"""

from __future__ import annotations

import enum
import functools
import importlib
import os
from typing import Any

import numpy as np

__all__ = [
    "JAX_NEW_SHAPE",
    "Backend",
    "NumPyReadOnly",
    "available",
    "backend_of",
    "capability_marks",
    "gpu_available",
    "jit",
    "namespace",
    "selected_backends",
    "skip_backend",
    "to_numpy",
    "to_xp",
]


class Backend(enum.Enum):
    """A backend of the test matrix; the value is its name in ids and FISHERLIB_TEST_BACKENDS."""

    NUMPY = "numpy"
    NUMPY_READONLY = "numpy:readonly"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH = "torch"
    JAX = "jax"
    TORCH_CUDA = "torch:cuda"
    JAX_GPU = "jax:gpu"
    CUPY = "cupy"

    @property
    def modname(self) -> str:
        """The framework to import."""
        return self.value.split(":")[0]

    @property
    def gpu(self) -> bool:
        return self in (Backend.TORCH_CUDA, Backend.JAX_GPU, Backend.CUPY)

    def __str__(self) -> str:
        return self.value


def selected_backends() -> list[Backend]:
    """All backends, or those named (comma-separated) in FISHERLIB_TEST_BACKENDS."""
    names = os.environ.get("FISHERLIB_TEST_BACKENDS", "").strip()
    if not names:
        return list(Backend)
    known = {b.value: b for b in Backend}
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in known:
            raise ValueError(
                f"FISHERLIB_TEST_BACKENDS: unknown backend {name!r}; known: {', '.join(known)}"
            )
        chosen.append(known[name])
    return chosen


@functools.cache
def _importable(modname: str) -> bool:
    try:
        importlib.import_module(modname)
    except ImportError:
        return False
    return True


@functools.cache
def gpu_available(backend: Backend | None = None) -> bool:
    """Whether ``backend`` (or, when None, any of CuPy, torch CUDA and JAX GPU) has a GPU."""
    if backend is None:
        return any(gpu_available(b) for b in Backend if b.gpu)
    if not backend.gpu or not _importable(backend.modname):
        return False
    try:
        if backend is Backend.TORCH_CUDA:
            import torch

            return bool(torch.cuda.is_available())
        if backend is Backend.JAX_GPU:
            import jax

            return len(jax.devices("gpu")) > 0
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # a driver or runtime error means no usable GPU
        return False


def available(backend: Backend) -> tuple[bool, str]:
    """(usable, reason if not)."""
    if not _importable(backend.modname):
        return False, f"{backend.modname} is not installed"
    if backend.gpu and not gpu_available(backend):
        from fisherlib._capabilities import support

        note = support(backend.modname, "gpu").note
        return False, f"{backend}: no GPU available (GPU: {note})"
    return True, ""


_GPU_VARIANT = {"torch": Backend.TORCH_CUDA, "jax": Backend.JAX_GPU, "cupy": Backend.CUPY}


def _requirement_met(requirement: str, backend: str) -> bool:
    if requirement == "gpu":
        return backend in _GPU_VARIANT and gpu_available(_GPU_VARIANT[backend])
    if requirement == "x64":
        import jax

        return bool(jax.config.read("jax_enable_x64"))
    raise ValueError(f"requirement: unknown {requirement!r}")


def capability_marks(backend: Backend | str, feature: str) -> list:
    """pytest marks for ``feature`` on ``backend``, from ``fisherlib/_capabilities.py``.

    Unsupported: skip, with the recorded reason. Supported under a condition the suite can
    check (a GPU, ``jax_enable_x64``): ``skipif`` it does not hold, plus the ``gpu`` mark for a
    GPU. Otherwise no marks. ``backend`` is a name or a test-matrix :class:`Backend`
    ("torch:cuda" means torch). Checking a condition imports that framework, so call this only
    for a framework that is installed (or guard it with ``needs``/``available``).
    """
    import pytest

    from fisherlib import _capabilities as caps

    name = backend.modname if isinstance(backend, Backend) else str(backend).split(":")[0]
    entry = caps.support(name, feature)
    title = caps.feature_info(feature).short
    if entry.status is caps.Status.NO:
        return [pytest.mark.skip(reason=f"{name} does not support {title}: {entry.note}")]
    marks = []
    for req in caps.requirements(name, feature):
        note = entry.note if req == entry.requires else caps.backend_info(name).note
        if req == "gpu":
            marks.append(pytest.mark.gpu)
        reason = f"{name}, {title}: not available here ({note})"
        marks.append(pytest.mark.skipif(not _requirement_met(req, name), reason=reason))
    return marks


class NumPyReadOnly:
    """``array_api_compat.numpy`` whose functions return read-only arrays.

    A core function that writes into an input (``x[i] = v``, ``x += y``) then fails with
    "assignment destination is read-only". ``array_namespace`` of these arrays is still
    ``array_api_compat.numpy``, as for any NumPy array.
    """

    def __init__(self):
        import array_api_compat.numpy as compat_np

        self._xp = compat_np

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._xp, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        @functools.wraps(attr)
        def wrapper(*args, **kwargs):
            return _readonly(attr(*args, **kwargs))

        return wrapper

    def __repr__(self) -> str:
        return "NumPyReadOnly(array_api_compat.numpy)"


def _readonly(out):
    if isinstance(out, np.ndarray):
        out.flags.writeable = False  # always allowed (only setting True can fail)
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(_readonly(o) for o in out)
    return out


class _OnDevice:
    """A namespace whose array-creating functions default to ``device`` (torch CUDA)."""

    _CREATORS = frozenset({"asarray", "zeros", "ones", "full", "empty", "arange", "eye", "linspace"})

    def __init__(self, xp, device):
        self._xp = xp
        self._device = device

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._xp, name)
        if name not in self._CREATORS:
            return attr

        @functools.wraps(attr)
        def wrapper(*args, **kwargs):
            kwargs.setdefault("device", self._device)
            return attr(*args, **kwargs)

        return wrapper

    def __repr__(self) -> str:
        return f"{self._xp.__name__} on {self._device}"


def namespace(backend: Backend):
    """The Array API namespace of ``backend`` (array-api-compat's wrapper where one exists)."""
    from array_api_compat import array_namespace

    if backend is Backend.NUMPY_READONLY:
        return NumPyReadOnly()
    mod = importlib.import_module(backend.modname)
    if backend.modname == "torch" and os.environ.get("OMP_NUM_THREADS") == "1":
        mod.set_num_threads(1)  # tiny test arrays: worker threads only compete (see conftest)
    if backend in (Backend.JAX, Backend.JAX_GPU):
        import jax.numpy as jnp

        return jnp
    xp = array_namespace(mod.empty(0)) if hasattr(mod, "empty") else mod
    if backend is Backend.TORCH_CUDA:
        return _OnDevice(xp, "cuda")
    return xp


def backend_of(xp) -> str:
    """The framework behind namespace ``xp``: 'numpy', 'array_api_strict', 'torch', 'jax', 'cupy'."""
    if isinstance(xp, NumPyReadOnly):
        return "numpy"
    if isinstance(xp, _OnDevice):
        return backend_of(xp._xp)
    parts = getattr(xp, "__name__", "").split(".")
    fw = parts[1] if parts[0] == "array_api_compat" and len(parts) > 1 else parts[0]
    if fw not in ("array_api_strict", "numpy", "torch", "jax", "cupy"):
        raise ValueError(f"unknown namespace {xp!r}")
    return fw


def to_xp(a, xp, dtype: str | None = None):
    """NumPy (or nested lists) -> an array of namespace ``xp``, in dtype ``dtype`` (a name).

    Without ``dtype``, floating input becomes float64 (so test data keep full precision).
    bfloat16, which NumPy lacks, goes through float32 in the target framework.
    """
    a = np.array(a, copy=True)  # never hand the caller's array to a namespace (read-only flags)
    if dtype is None and a.dtype.kind == "f":
        dtype = "float64"
    if dtype is None:
        return xp.asarray(a)
    if dtype == "bfloat16":
        return xp.astype(xp.asarray(a.astype(np.float32)), xp.bfloat16)
    return xp.asarray(a.astype(np.dtype(dtype)))


def to_numpy(x, dtype=None) -> np.ndarray:
    """Any backend's array -> a new NumPy array (bfloat16 widens to float32), in ``dtype`` if given."""
    from array_api_compat import is_cupy_array, is_torch_array

    if is_torch_array(x):
        import torch

        x = x.detach().cpu()
        out = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    elif is_cupy_array(x):
        out = x.get()
    elif type(x).__module__.startswith("array_api_strict"):
        out = np.from_dlpack(x)
    else:
        out = np.asarray(x)
        if out.dtype.name == "bfloat16":  # JAX's ml_dtypes
            out = out.astype(np.float32)
    out = np.array(out, copy=True)
    return out if dtype is None else out.astype(dtype)


def jit(f, xp, **static):
    """``f`` under ``jax.jit`` when ``xp`` is JAX (keyword arguments ``static`` are closed over),
    else ``f`` itself; used to check that the core traces (no value-dependent Python control)."""
    if backend_of(xp) != "jax":
        return functools.partial(f, **static) if static else f
    import jax

    return jax.jit(functools.partial(f, **static))


def skip_backend(xp, name: str, reason: str) -> None:
    """Skip the running test on backend ``name`` ('jax', 'torch', ...), stating why."""
    import pytest

    if backend_of(xp) == name:
        pytest.skip(f"{name}: {reason}")


JAX_NEW_SHAPE = (
    "JAX compiles every op anew for each new shape (seconds for the solver); this case is "
    "backend-independent shape logic, covered on the other backends"
)
