"""Dense float64 references built from per-example Jacobians (tests only)."""

from __future__ import annotations

import itertools

import numpy as np

from fisherlib.estimators._estimate import _to_numpy


def jacobians(backend, model, params, x):
    """Per-example Jacobians J (N, C, P) in float64 NumPy, leaves flattened in leaf order."""
    logits, _ = backend.linearize(model, params, x)
    z = _to_numpy(logits)
    N, C = z.shape
    eye = np.broadcast_to(np.eye(C)[:, None, :], (C, N, C)).copy()
    like = logits
    ct = _as(eye, like)
    tree = backend.per_example_vjp(model, params, x, ct)
    cols = [_to_numpy(g).reshape(C, N, -1) for _, g in backend.leaves(tree)]
    return z, np.concatenate(cols, axis=-1).transpose(1, 0, 2)


def _as(a, like):
    from array_api_compat import array_namespace

    from fisherlib.core._compat import device

    xp = array_namespace(like)
    return xp.asarray(a, dtype=like.dtype, device=device(like))


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kernel(z, likelihood="softmax", bound=None, rank=1):
    """I(z) per input (N, C, C), or the bound's kernel."""
    if likelihood == "sigmoid":
        s = 1 / (1 + np.exp(-z))
        return np.stack([np.diag(r) for r in s * (1 - s)])
    p = softmax(z)
    I = np.stack([np.diag(r) - np.outer(r, r) for r in p])
    if bound == "upper":
        return np.stack([np.diag(r) for r in p])
    if bound == "lower":
        w, V = np.linalg.eigh(I)
        return np.einsum("nik,nk,njk->nij", V[..., -rank:], w[..., -rank:], V[..., -rank:])
    return I


def dense_fisher(J, z, likelihood="softmax", bound=None, rank=1):
    """Σ_x J_xᵀ K(z_x) J_x, (P, P)."""
    return np.einsum("nci,ncd,ndj->ij", J, kernel(z, likelihood, bound, rank), J)


def sigmoid_by_enumeration(J, z):
    """Σ_x Σ_{y ∈ {0,1}^C} p(y|x) g gᵀ with g = J_xᵀ (y - σ): the definition, term by term."""
    N, C, P = J.shape
    s = 1 / (1 + np.exp(-z))
    F = np.zeros((P, P))
    for n in range(N):
        for y in itertools.product((0.0, 1.0), repeat=C):
            y = np.array(y)
            prob = np.prod(np.where(y == 1, s[n], 1 - s[n]))
            g = J[n].T @ (y - s[n])
            F += prob * np.outer(g, g)
    return F


def torch_mlp(params):
    """(torch, net): the float64 torch twin of a two-layer tanh ``fisherlib.models.MLP`` holding
    ``params`` ({"0.weight", "0.bias", "1.weight", "1.bias"}); skips without torch."""
    import pytest

    torch = pytest.importorskip("torch")
    (H, D), C = np.shape(params["0.weight"]), np.shape(params["1.weight"])[0]
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)).double()
    with torch.no_grad():
        for layer, i in ((net[0], 0), (net[2], 1)):
            layer.weight.copy_(torch.as_tensor(params[f"{i}.weight"]))
            layer.bias.copy_(torch.as_tensor(params[f"{i}.bias"]))
    return torch, net
