"""Reduced precision against a float64 reference, and the probes' own variance formulas.

Reduced precision: the reference is computed in float64 from the weights and inputs *as
rounded to the dtype*, so that only the arithmetic error is measured. Each diagonal entry goes
through about a dozen rounded operations (two matrix products of depth <= 4, tanh, softmax,
the products back); with errors below one unit roundoff each, 8·eps of the largest entry
bounds the error (measured: at most 0.75·eps, float32, float16 and bfloat16, layer-I/O and
vmap routes alike).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fisherlib
from fisherlib import backends
from fisherlib.models import MLP

from fisher_reference import dense_fisher, jacobians, softmax
from matrix_cases import D, H, C, read, sigmas, weights

K = 600


def _routes():
    try:
        return [backends.get("torch", layer_io=True), backends.get("torch", layer_io=False)]
    except TypeError:
        return [backends.get("torch")]
    except ImportError:
        return []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_reduced_precision_against_float64(dtype):
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype)
    params, x, y, ymulti = weights()
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)).to(dt)
    with torch.no_grad():
        for layer, i in ((net[0], 0), (net[2], 1)):
            layer.weight.copy_(torch.as_tensor(params[f"{i}.weight"]))
            layer.bias.copy_(torch.as_tensor(params[f"{i}.bias"]))
    xt = torch.as_tensor(x).to(dt)
    rounded = {f"{i}.{w}": getattr(net[2 * i], w).detach().double().numpy() for i in (0, 1) for w in ("weight", "bias")}
    z, J = jacobians(backends.get("numpy"), MLP([D, H, C], activation="tanh"), rounded, xt.double().numpy())
    eps = torch.finfo(dt).eps
    work = torch.float32 if dtype != "float64" else dt  # reduced precisions accumulate in float32
    for be in _routes():
        for kw in (dict(method="exact"), dict(method="exact", bound="lower", rank=2),
                   dict(method="empirical"), dict(probes=K, seed=1)):
            batches = [(xt[:6], torch.as_tensor(y[:6])), (xt[6:], torch.as_tensor(y[6:]))]
            est = fisherlib.fisher(net, None, batches, backend=be, chunk_size=3, **kw)
            assert est.value["0.weight"].dtype == work
            if kw.get("method") == "empirical":
                g = np.einsum("nci,nc->ni", J, np.eye(C)[y] - softmax(z))
                F = (g ** 2).sum(0)
            else:
                F = np.diag(dense_fisher(J, z, bound=kw.get("bound"), rank=kw.get("rank", 1)))
            value, se = read(est, "diag")
            tol = 8 * eps * np.abs(F).max()
            if "probes" in kw:
                assert np.all(np.abs(value - F) <= sigmas(F.size) * se + tol), (dtype, kw)
            else:
                np.testing.assert_allclose(value, F, rtol=0, atol=tol, err_msg=f"{dtype} {kw}")


# ------------------------------------------------------------------ variance of one probe


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_one_probe_variance_formula(dist):
    """theory.md §5.2, one input (so that the fourth-moment term is large): with w_i = Bᵀ J_i,
    Var(F̂_ii) = 2F_ii² for Gaussian probes and 2(F_ii² - Σ_k w_ik⁴) for Rademacher. The K = 4000
    per-probe sample variance has relative sd <= √((κ-1)/K) (κ <= 15 for a scaled χ²₁), so
    4 sd is 0.24; the Rademacher term moves the variance by 30-60 % here, so the test tells the
    two distributions apart (the CV <= √2 test of test_fisher.py cannot)."""
    params, x, y, ymulti = weights()
    model = MLP([D, H, C], activation="tanh")
    x1 = x[:1]
    z, J = jacobians(backends.get("numpy"), model, params, x1)
    p = softmax(z)[0]
    B = np.diag(np.sqrt(p)) - np.outer(p, np.sqrt(p))  # B Bᵀ = I_Δ
    w = B.T @ J[0]  # (C, P)
    F = (w ** 2).sum(0)
    var = 2 * F ** 2 - (2 * (w ** 4).sum(0) if dist == "rademacher" else 0)
    keep = F > 1e-6 * F.max()
    if dist == "rademacher":
        assert np.median(1 - var[keep] / (2 * F[keep] ** 2)) > 0.3  # the two formulas differ here
    n = 4000
    est = fisherlib.fisher(model, params, x1, probes=n, dist=dist, seed=5)
    value, se = read(est, "diag")
    sample_var = (se * math.sqrt(n)) ** 2
    ratio = sample_var[keep] / var[keep]
    assert np.all(np.abs(ratio - 1) <= 4 * math.sqrt(14 / n)), (ratio.min(), ratio.max())
