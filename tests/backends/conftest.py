"""Fixtures for the backend tests; the cases themselves live in backend_cases.py."""

from __future__ import annotations

import pytest
from backend_cases import CASES, HAS, clean_registry_state


@pytest.fixture(autouse=True)
def _x64():
    """float64 JAX for the duration of each test (a context, so other tests' settings stay)."""
    if not HAS["jax"]:
        yield
        return
    import jax

    with jax.enable_x64(True):
        yield


@pytest.fixture(params=[pytest.param(name, marks=marks, id=name) for name, (_, marks) in CASES.items()])
def conformance_case(request):
    """(backend, Case) for every adapter case in backend_cases.CASES."""
    backend, c = CASES[request.param][0]()
    return backend, c


@pytest.fixture
def clean_registry():
    with clean_registry_state() as reg:
        yield reg
