"""λ_max and tr F through curvlinops and through fisherlib, called the same way by the agreement
test (tests/spectral/test_peers.py) and the benchmark (benchmarks/spectrum_peers.py)."""

from __future__ import annotations

import numpy as np
import torch

import fisherlib
from fisherlib.spectral import fisher_operator, top_eigenpairs
from tests.peers.peer_calls import curvlinops_operator


def curvlinops_lambda_max(model, x, y, *, tol=1e-6):
    """curvlinops' GGN operator (= F for the summed cross-entropy) handed to scipy's eigsh."""
    from scipy.sparse.linalg import eigsh

    A = curvlinops_operator(model, x, y).to_scipy()
    return float(eigsh(A, k=1, which="LA", tol=tol)[0][0])


def curvlinops_trace(model, x, y, *, matvecs=16, seed=0):
    """curvlinops' Hutchinson trace (Rademacher, ``matvecs`` GGN-vector products)."""
    from curvlinops import hutchinson_trace

    torch.manual_seed(seed)
    return float(hutchinson_trace(curvlinops_operator(model, x, y), matvecs))


def fisherlib_lambda_max(model, x, *, tol=1e-6, seed=0):
    """fisherlib's Lanczos (full reorthogonalisation) on its F·v operator: (λ_max, residual)."""
    op = fisher_operator(model, None, [x])
    v0 = op.backend.probes(seed, (op.n_params,), "gaussian", like=op.asarray(np.zeros(1)))
    pairs = top_eigenpairs(op.matmat, v0, 1, tol=tol)
    return float(pairs.values[0]), float(pairs.residuals[0])


def fisherlib_lambda_max_eigsh(model, x, *, tol=1e-6):
    """fisherlib's operator handed to scipy's eigsh, as curvlinops' is."""
    from scipy.sparse.linalg import eigsh

    return float(eigsh(fisher_operator(model, None, [x]).to_scipy(), k=1, which="LA", tol=tol)[0][0])


def fisherlib_trace(model, x, *, probes=16, seed=0):
    """fisherlib's Hutchinson trace: one VJP per probe (core-space probes B ξ): (value, stderr)."""
    est = fisherlib.fisher(model, None, [x], structure="trace", probes=probes, seed=seed)
    return float(est.value), float(est.stderr)
