"""Core-space geometry against dense float64 references, on every installed namespace."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest

from fisherlib import hypercube, simplex

NAMESPACES = ["numpy", "array_api_strict", "torch", "jax"]


def _xp(name):
    if name == "numpy":
        return np, lambda a: np.asarray(a)
    if name == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        return jax.numpy, jax.numpy.asarray
    mod = pytest.importorskip(name)
    return mod, lambda a: mod.asarray(a)


def _np(a):
    if hasattr(a, "detach"):
        a = a.detach()
    try:
        return np.asarray(a, dtype=np.float64)
    except TypeError:  # array_api_strict
        import array_api_strict as xs

        return np.asarray(xs.asarray(a)._array, dtype=np.float64)


def _logits():
    rng = np.random.default_rng(0)
    z = [rng.normal(size=(6, 7)) * s for s in (0.3, 3.0, 30.0)]
    tied = rng.normal(size=(3, 7)); tied[:, 1] = tied[:, 0]; tied[:, 4] = tied[:, 0]
    zeros = rng.normal(size=(3, 7)); zeros[:, 2] = -np.inf; zeros[:, 5] = -np.inf
    return np.concatenate(z + [tied, zeros, np.full((1, 7), 0.5), np.array([[1e4, -1e4, 0, 3, 1e4 - 5, 2, 1]])])


def _dense(z):
    p = np.exp(z - z.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    return p, np.stack([np.diag(r) - np.outer(r, r) for r in p])


@pytest.mark.parametrize("ns", NAMESPACES)
def test_products_and_spectrum_match_dense(ns):
    mod, asarray = _xp(ns)
    z = _logits()
    p, F = _dense(z)
    zz = asarray(z)
    np.testing.assert_allclose(_np(simplex.fim(zz)), F, atol=1e-15)
    v = np.random.default_rng(1).normal(size=z.shape)
    np.testing.assert_allclose(_np(simplex.matvec(zz, asarray(v))), np.einsum("nij,nj->ni", F, v), atol=1e-14)
    Bv = _np(simplex.factor_matvec(zz, asarray(v)))
    B = _np(simplex.factor(zz))
    np.testing.assert_allclose(Bv, np.einsum("nij,nj->ni", B, v), atol=1e-14)
    np.testing.assert_allclose(B @ np.swapaxes(B, -1, -2), F, atol=1e-15)  # B Bᵀ = I_Δ
    BtBv = _np(simplex.factor_matvec(zz, simplex.factor_rmatvec(zz, asarray(v))))
    np.testing.assert_allclose(BtBv, np.einsum("nij,nj->ni", F, v), atol=1e-14)  # B(Bᵀv) = Iv
    np.testing.assert_allclose(_np(simplex.trace(zz)), np.trace(F, axis1=1, axis2=2), atol=1e-15)
    lam, V = (_np(a) for a in simplex.eigh(zz))
    w = np.linalg.eigvalsh(F)
    pmax = p.max(-1, keepdims=True)
    assert np.all(np.abs(lam - w) <= 1e-12 * pmax)
    assert np.abs(np.einsum("nij,njk->nik", F, V) - V * lam[:, None, :]).max() <= 1e-12
    assert np.abs(np.swapaxes(V, 1, 2) @ V - np.eye(7)).max() <= 1e-12
    top, vtop = (_np(a) for a in simplex.top_eigpair(zz))
    np.testing.assert_allclose(top, lam[:, -1], atol=1e-15)
    lo, hi = (_np(a) for a in simplex.lambda_max_bounds(zz))
    assert np.all(lo <= w[:, -1] + 1e-15) and np.all(w[:, -1] <= hi + 1e-15)
    ilo, ihi = (_np(a) for a in simplex.interlacing_bounds(zz))
    assert np.all(ilo <= w + 1e-15) and np.all(w <= ihi + 1e-15)


def test_special_spectra():
    p = np.array([0.3, 0.7])
    lam = simplex.eigvalsh(np.log(p))
    np.testing.assert_allclose(lam, [0, 2 * 0.3 * 0.7], atol=1e-16)  # C = 2: rank one, 2 p1 p2
    np.testing.assert_allclose(simplex.eigvalsh(np.zeros(5)), [0] + [0.2] * 4, atol=1e-16)  # uniform
    np.testing.assert_allclose(simplex.fim(np.zeros((2, 1))), np.zeros((2, 1, 1)))  # C = 1


def test_float32_and_reduced_precision():
    torch = pytest.importorskip("torch")
    z = _logits()[:12]
    _, F = _dense(z.astype(np.float32).astype(np.float64))
    lam = simplex.eigvalsh(z.astype(np.float32))
    assert lam.dtype == np.float32
    assert np.all(np.abs(lam - np.linalg.eigvalsh(F)) <= 1e-5 * F.max())
    for dt in (torch.float16, torch.bfloat16):
        out = simplex.eigvalsh(torch.asarray(z, dtype=dt))
        assert out.dtype == dt


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_envelopes_in_loewner_order(k):
    z = _logits()
    p, F = _dense(z)
    low = simplex.lower_envelope(z, rank=k)
    gap = F - low.to_dense()
    assert np.linalg.eigvalsh(gap).min() >= -1e-13
    if k == 6:
        np.testing.assert_allclose(low.to_dense(), F, atol=1e-13)
    for kind in ("diag", "diag2", "scalar"):
        up = simplex.upper_envelope(z, kind)
        assert np.linalg.eigvalsh(up.to_dense() - F).min() >= -1e-13
        v = np.random.default_rng(2).normal(size=z.shape)
        np.testing.assert_allclose(up.matvec(v), np.einsum("nij,nj->ni", up.to_dense(), v), atol=1e-14)
    np.testing.assert_allclose(simplex.upper_envelope(z).to_dense() - F, np.einsum("ni,nj->nij", p, p), atol=1e-15)
    rank1 = simplex.lower_envelope(z).to_dense()
    assert np.all(np.linalg.norm(F - rank1, axis=(1, 2)) <= simplex.trimmed_norm(z) + 1e-13)


def test_hypercube_against_dense():
    z = np.random.default_rng(3).normal(size=(4, 5)) * 3
    s, q = 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(z))  # σ(z), σ(-z) = 1 - σ(z) without cancellation
    np.testing.assert_allclose(hypercube.fim(z), s * q, rtol=1e-13)
    np.testing.assert_allclose(hypercube.eigvalsh(z), np.sort(s * q, -1), rtol=1e-13)
    np.testing.assert_allclose(hypercube.trace(z), (s * q).sum(-1), rtol=1e-13)
    xi = np.ones_like(z)
    np.testing.assert_allclose(hypercube.factor_matvec(z, xi) ** 2, s * q, rtol=1e-12)
    assert hypercube.fim(np.array([-np.inf, 0.0]))[0] == 0


@pytest.mark.parametrize("bad,err,match", [
    (np.array([0.0, np.nan]), ValueError, "NaN"),
    (np.array([0.0, np.inf]), ValueError, r"\+inf"),
    (np.array([-np.inf, -np.inf]), ValueError, "-inf"),
    (np.array([1, 2]), TypeError, "floating"),
    (np.array(1.0), ValueError, "0-d"),
    (np.zeros((3, 0)), ValueError, "size 0"),
])
def test_bad_logits_name_the_argument(bad, err, match):
    with pytest.raises(err, match=match) as info:
        simplex.eigh(bad)
    assert str(info.value).startswith("z:")


def test_mixed_namespaces_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different namespaces"):
        simplex.matvec(np.zeros(3), torch.zeros(3, dtype=torch.float64))


def test_jit():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    z = _logits()[:6]
    lam = jax.jit(simplex.eigvalsh)(jax.numpy.asarray(z))
    np.testing.assert_allclose(np.asarray(lam), simplex.eigvalsh(z), atol=1e-15)


def test_import_loads_no_framework():
    code = ("import sys, fisherlib, fisherlib.simplex, fisherlib.hypercube, fisherlib.backends;"
            "bad = [m for m in ('torch', 'jax', 'cupy') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("mod", ["_compat", "_lib", "simplex", "spectrum", "envelopes", "hypercube", "cotangents"])
def test_core_modules_import_no_numpy_or_framework(mod):
    import ast
    import pathlib

    src = pathlib.Path(importlib.import_module(f"fisherlib.core.{mod}").__file__).read_text()
    names = {a.name.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert not names & {"numpy", "torch", "jax", "cupy", "scipy"}
