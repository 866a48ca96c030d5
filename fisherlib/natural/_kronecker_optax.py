"""``natural_gradient(preconditioner="kfac")``: K-FAC steps as an optax transformation.

The layer structure (which leaves form which Kronecker block) is static and comes from a first
:class:`~fisherlib.KroneckerEstimate`; the state holds only arrays (the factors' EMA and their
damped eigendecompositions), so it checkpoints as any optax state and a step between
refreshes traces under ``jax.jit``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import backends as _backends
from ..core import kronecker
from ..estimators._kronecker import KroneckerEstimate, _from_core, _to_core
from ._optax import scaled_step

__all__ = ["KFACState", "kfac_natural_gradient"]


class KFACState(NamedTuple):
    count: jax.Array
    A: list  # per block: the EMA of A (G, Ĩ, Ĩ) or of a diagonal A (G, Ĩ)
    G: list  # per block: the EMA of G (G, O, O)
    diag: list  # per fallback leaf: the EMA of its diagonal
    basis: list  # per block: (Q_A or an empty array for a diagonal A, Q_G, damped eigenvalues (G, O, Ĩ))
    momentum: Any


def kfac_natural_gradient(learning_rate: float | Callable, kfac: KroneckerEstimate, *, damping: float = 1e-3,
                          decay: float = 0.95, momentum: float = 0.0, kl_clip: float | None = 1e-2,
                          split: bool = True) -> optax.GradientTransformationExtraArgs:
    r"""K-FAC natural-gradient steps −η (F̃ + λI)⁻¹ g, F̃ = ⊕ A_l ⊗ G_l, as an optax transformation.

    ``update(grads, state, params=None, *, kfac=None)``: with ``kfac`` (the K-FAC estimate of the
    refresh's batch, ``fisher(f, params, batch, structure="kfac", reduction="mean")``) the
    factors' EMA is updated and eigendecomposed; without it (steps between refreshes) the kept
    decomposition is applied, which traces under ``jax.jit``.

    Parameters
    ----------
    learning_rate : float or schedule
    kfac : KroneckerEstimate
        A first estimate: it fixes the blocks and starts the EMA (``init``).
    damping : float
        λ; with ``split`` Martens & Grosse's π-split (A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹.
    decay : float
        EMA decay of the factors at each refresh (0: the newest estimate replaces them).
    momentum, kl_clip
        As for :func:`~fisherlib.natural.natural_gradient`.
    """
    if not isinstance(kfac, KroneckerEstimate) or kfac.structure != "kfac":
        raise TypeError(f"kfac: expected the KroneckerEstimate of fisher(..., structure='kfac'), "
                        f"got {type(kfac).__name__}")
    if kl_clip is not None and not kl_clip > 0:
        raise ValueError(f"kl_clip: expected a positive number or None, got {kl_clip!r}")
    if decay is None or not 0 <= decay < 1:
        raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
    be = _backends.get("jax")
    blocks, fallback, names = list(kfac.blocks), list(kfac.fallback), list(kfac.names)
    w = float(decay)
    lr_fn = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def arrays(est):
        if [b.name for b in est.blocks] != [b.name for b in blocks] or list(est.fallback) != fallback:
            raise ValueError("kfac: the estimate's Kronecker blocks differ from those the transformation was built with")
        scale = 1.0 if est.reduction == "mean" else 1.0 / max(1, est.n_inputs)
        f = est.factors
        diag = est._fallback_values()
        return ([jnp.asarray(f[b.name]["A"]) for b in blocks], [jnp.asarray(f[b.name]["G"]) * scale for b in blocks],
                [jnp.asarray(diag[n]) * scale for n in fallback])

    def decompose(A, G):
        out = []
        for a, g in zip(A, G):
            (lamA, QA), (lamG, QG) = kronecker.eigh(a), kronecker.eigh(g)
            e = kronecker.damped_eigenvalues(lamA, lamG, damping, split=split)
            out.append((jnp.zeros((0,), a.dtype) if QA is None else QA, QG, e))
        return out

    def init(params):
        A, G, diag = arrays(kfac)
        mom = jax.tree_util.tree_map(jnp.zeros_like, params) if momentum else optax.EmptyState()
        return KFACState(jnp.zeros((), jnp.int32), A, G, diag, decompose(A, G), mom)

    def update(updates, state, params=None, *, kfac=None, **extra):
        A, G, diag, basis = state.A, state.G, state.diag, state.basis
        if kfac is not None:  # refresh: fold in the batch's factors, decompose once
            nA, nG, nd = arrays(kfac)
            A = [w * a + (1 - w) * b for a, b in zip(A, nA)]
            G = [w * a + (1 - w) * b for a, b in zip(G, nG)]
            diag = [w * a + (1 - w) * b for a, b in zip(diag, nd)]
            basis = decompose(A, G)
        leaves = dict(be.leaves(updates))
        if list(leaves) != names:
            raise ValueError(f"grads: expected the leaves {names[:3]}..., got {list(leaves)[:3]}...")
        out = {}
        for b, (QA, QG, e) in zip(blocks, basis):
            M = _to_core(b, leaves, xp=jnp)
            out.update(_from_core(b, kronecker.basis_solve(None if QA.ndim == 1 else QA, QG, e, M)))
        for n, d in zip(fallback, diag):
            out[n] = leaves[n] / (d + damping)
        d = be.unflatten(updates, [out[n] for n in names])
        step, mom = scaled_step(updates, d, lr_fn(state.count), kl_clip, momentum, state.momentum)
        return step, KFACState(state.count + 1, A, G, diag, basis, mom)

    return optax.GradientTransformationExtraArgs(init, update)
