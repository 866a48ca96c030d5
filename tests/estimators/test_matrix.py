"""Every option of ``fisherlib.fisher`` value-checked against a dense float64 reference.

The full matrix (method x structure x bound x likelihood x reduction x per_example x dist, each
over two batches with chunk_size forcing several chunks; see matrix_cases.py) runs on NumPy.
A slice chosen to cover every value of every option runs on array_api_strict (through the
NumPy adapter), torch and JAX (tests/estimators/test_matrix_frameworks.py). docs/testing.md
lists what is checked where.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fisherlib
from fisherlib.models import MLP

from matrix_cases import (
    CHUNK, NP_NAMES, D, H, C, N, Cell, check, matrix, numpy_reference_data, reference, read, run, sigmas, split,
)

K = 1500  # probes per random cell


@pytest.fixture(scope="module")
def data():
    return numpy_reference_data()


def _batches(cell, x, y, ymulti):
    if cell.method == "empirical":
        return split(x, y if cell.likelihood == "softmax" else ymulti)
    return split(x)


@pytest.mark.parametrize("cell", matrix(), ids=lambda c: c.id)
def test_cell_matches_dense_reference(data, cell):
    params, x, y, ymulti, z, J = data
    model = MLP([D, H, C], activation="tanh")
    est = run(model, params, _batches(cell, x, y, ymulti), cell, K=K)
    assert est.n_inputs == N
    F = reference(cell, J, z, y, ymulti)
    check(cell, est, F, K=K)


def test_matrix_covers_every_option():
    cells = matrix()
    assert len(cells) == len(set(cells))
    for attr, values in (("method", {"hutchinson", "mc", "exact", "empirical"}),
                         ("structure", {"diag", "blocks", "trace", "sketch"}),
                         ("likelihood", {"softmax", "sigmoid"}), ("bound", {None, "upper", "lower"}),
                         ("rank", {1, 2}), ("reduction", {"sum", "mean"}), ("per_example", {False, True}),
                         ("dist", {"rademacher", "gaussian", "none"})):
        assert {getattr(c, attr) for c in cells} == values, attr
    # Each random method meets every structure with per_example on and off (sketch: off only).
    for method in ("hutchinson", "mc"):
        for structure in ("diag", "blocks", "trace"):
            assert {c.per_example for c in cells if c.method == method and c.structure == structure} == {False, True}


def test_the_matrix_check_rejects_a_wrong_answer(data):
    """The same check, fed a reference off by 3 % (a plausible scaling bug), fails: not vacuous."""
    params, x, y, ymulti, z, J = data
    cell = Cell("hutchinson", "diag", "softmax", None, 1, "sum", True, "rademacher")
    est = run(MLP([D, H, C], activation="tanh"), params, split(x), cell, K=K)
    F = reference(cell, J, z, y, ymulti)
    check(cell, est, F, K=K)
    with pytest.raises(AssertionError, match="standard errors"):
        check(cell, est, F * 1.03, K=K)


def test_per_example_lowers_the_variance(data):
    """Per-example squares drop the cross terms between inputs: Var(Σ_x (w_xᵀξ_x)²) =
    Σ_x Var((w_xᵀξ_x)²) <= Var((Σ_x w_xᵀξ_x)²) entrywise (theory.md §5.2), for Hutchinson and
    for Monte-Carlo (whose per-input scores also have zero mean)."""
    params, x, y, ymulti, z, J = data
    model = MLP([D, H, C], activation="tanh")
    for method in ("hutchinson", "mc"):
        se = {}
        for pe in (False, True):
            est = fisherlib.fisher(model, params, split(x), method=method, probes=K, per_example=pe,
                                   seed=3, chunk_size=CHUNK)
            se[pe] = read(est, "diag")[1]
        assert np.median(se[True] / se[False]) < 0.8, method


def test_batches_are_seeded_apart(data):
    """Batch b draws from a seed derived from (seed, b): two equal batches give different
    probes, and one batch gives the same estimate whatever follows it."""
    params, x, y, ymulti, z, J = data
    model = MLP([D, H, C], activation="tanh")
    twice = fisherlib.fisher(model, params, [x[:5], x[:5]], probes=2, seed=4)
    parts = [np.asarray(p) for p in twice.to_numpy().parts]
    once = fisherlib.fisher(model, params, [x[:5]], probes=2, seed=4)
    first = [np.asarray(p) for p in once.to_numpy().parts]
    diff = [a - 2 * b for a, b in zip(parts, first)]  # zero iff batch 1 repeated batch 0's probes
    assert max(np.abs(d).max() for d in diff) > 1e-3


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_sigmas_are_derived(dist):
    """k grows with the number of entries checked (Bonferroni), from about 4.4 to 5.5."""
    assert 4.0 < sigmas(36) < sigmas(36 * 36) < 6.0
    assert math.isclose(sigmas(1, alpha=0.05), 1.959963984540054)
