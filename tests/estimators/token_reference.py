"""Dense float64 references that loop over inputs and output positions (tests only).

F = Σ_n Σ_t m_nt J_ntᵀ I(z_nt) J_nt, and the empirical Σ_n Σ_t m_nt g_nt g_ntᵀ with
g_nt = J_ntᵀ (e_y − p): every input run alone (a batch of one, with its own padding and mask),
every Jacobian row by its own backward pass. Slow, obviously right.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def _one(inputs, n):
    if isinstance(inputs, Mapping):
        return {k: v[n:n + 1] for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(v[n:n + 1] for v in inputs)
    return inputs[n:n + 1]


def _call(model, x):
    if isinstance(x, Mapping):
        out = model(**x)
    elif isinstance(x, tuple):
        out = model(*x)
    else:
        out = model(x)
    return getattr(out, "logits", out)


def token_fisher(model, inputs, weights, params=None, labels=None, full=True):
    """(F, names, shapes): F (P, P) over ``params`` (default: all that require grad), float64.

    ``weights`` (N, *positions): 1 for counted outputs. With ``labels`` (N, *positions): the
    empirical Fisher instead. ``full=False``: only the diagonal, as a diagonal matrix's
    stand-in (a 1-D array; :func:`diag_tree` takes either) for models too large for P x P.
    """
    named = params if params is not None else {n: p for n, p in model.named_parameters() if p.requires_grad}
    names, leaves = list(named), list(named.values())
    weights = np.asarray(weights, dtype=float)
    N = weights.shape[0]
    P = sum(p.numel() for p in leaves)
    F = np.zeros((P, P)) if full else np.zeros(P)
    for n in range(N):
        z = _call(model, _one(inputs, n))[0]  # (*positions, C)
        C = z.shape[-1]
        z = z.reshape(-1, C)
        w = weights[n].reshape(-1)
        y = None if labels is None else np.asarray(labels)[n].reshape(-1)
        for t in range(z.shape[0]):
            if w[t] == 0:
                continue
            rows = []
            for c in range(C):
                g = torch.autograd.grad(z[t, c], leaves, retain_graph=True, allow_unused=True)
                rows.append(np.concatenate([
                    (torch.zeros_like(p) if gi is None else gi).detach().double().reshape(-1).numpy()
                    for gi, p in zip(g, leaves)]))
            J = np.stack(rows)  # (C, P)
            p = torch.softmax(z[t].detach().double(), -1).numpy()
            if y is None:
                B = np.diag(np.sqrt(p)) - np.outer(p, np.sqrt(p))  # B Bᵀ = diag(p) - p pᵀ
                G = J.T @ B  # (P, C): F = G Gᵀ
            else:
                G = (J.T @ (np.eye(C)[int(y[t])] - p))[:, None]
            F += w[t] * (G @ G.T if full else np.sum(G * G, axis=1))
    return F, names, [tuple(p.shape) for p in leaves]


def diag_tree(F, names, shapes):
    """{name: diagonal block entries shaped like the leaf}."""
    out, i = {}, 0
    d = np.diag(F) if F.ndim == 2 else F
    for name, shape in zip(names, shapes):
        k = int(np.prod(shape))
        out[name] = d[i:i + k].reshape(shape)
        i += k
    return out


def leaf_blocks(F, names, shapes):
    """{name: the leaf's dense diagonal block (size, size)}."""
    out, i = {}, 0
    for name, shape in zip(names, shapes):
        k = int(np.prod(shape))
        out[name] = F[i:i + k, i:i + k]
        i += k
    return out


def as_numpy(tree):
    """Values of an estimate's dict as float64 NumPy arrays."""
    from fisherlib.estimators._estimate import _to_numpy

    return {k: np.asarray(_to_numpy(v), dtype=float) for k, v in tree.items()}
