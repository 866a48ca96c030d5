"""Shared fixtures: the backend matrix (``xp``), GPU skipping and the hypothesis profiles.

* ``xp`` runs a test once per backend of ``tests/_backends.Backend`` (numpy, numpy:readonly,
  array_api_strict, torch, jax, and the GPU variants torch:cuda, jax:gpu, cupy). A backend whose
  framework is missing, or a GPU backend without a GPU, is skipped with the reason.
  ``library`` gives the :class:`~tests._backends.Backend` itself.
* Tests marked ``gpu`` skip cleanly when no GPU is available.
* JAX runs in float64 (``jax_enable_x64``), so that float64 tests mean float64 on every backend,
  and without XLA's backend optimisations (``JAX_DISABLE_MOST_OPTIMIZATIONS=1`` unless set),
  which cost compile time and change no result beyond rounding.
* Hypothesis: the default profile ``fisherlib`` is deterministic (``derandomize``) with 30
  examples and no deadline, so the suite neither flakes nor runs long; ``--hypothesis-profile
  explore`` draws 500 fresh examples per test to hunt for counterexamples.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

# The suite's arrays are tiny: BLAS/OpenMP worker threads only spin and compete for the cores
# (on 2 cores, test_spectrum.py took 89 s with them and 55 s without). Environment variables
# come too late when a pytest plugin has already imported numpy, so the pools are also capped
# at run time (threadpoolctl; torch in tests/_backends.py). An explicit setting wins.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
if os.environ.get("OMP_NUM_THREADS") == "1":
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # optional: only a speed-up
        pass

from tests._backends import Backend, available, gpu_available, namespace, selected_backends

settings.register_profile(
    "fisherlib",
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "explore",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("fisherlib")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU (CuPy, torch CUDA or JAX GPU); skipped without one")
    if importlib.util.find_spec("jax") is not None:
        import jax

        jax.config.update("jax_enable_x64", True)
        # The tests check results, not speed, and most of the JAX part's time is XLA compiling
        # small programs: without LLVM's optimisations it took 146 s instead of 183 s (subprocesses
        # inherit the variable; set it to 0 to test the optimised code).
        os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
        jax.config.update("jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not gpu_available():
        skip = pytest.mark.skip(reason="needs a GPU (CuPy, torch CUDA or JAX GPU); none available")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(
    scope="session",
    params=[
        pytest.param(b, id=str(b), marks=[pytest.mark.gpu] if b.gpu else [])
        for b in selected_backends()
    ],
)
def library(request) -> Backend:
    """The backend under test; skips when its framework or GPU is missing."""
    backend = request.param
    ok, reason = available(backend)
    if not ok:
        pytest.skip(reason)
    return backend


@pytest.fixture(scope="session")
def xp(library):
    """The Array API namespace of the backend under test (see tests/_backends.py).

    Build inputs with ``tests._backends.to_xp(numpy_array, xp)`` and read results back with
    ``to_numpy``; on numpy:readonly every array ``xp`` makes is read-only.
    """
    return namespace(library)
