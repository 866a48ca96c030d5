r"""Pruning masks by Fisher saliency (optimal brain damage) or by magnitude, at a target sparsity.

Optimal brain damage (LeCun, Denker & Solla, NIPS 1989) removes the parameters whose removal
the quadratic model of the loss says costs least: setting θ_i to zero changes the loss by
½ H_ii θ_i² (at a minimum, ignoring off-diagonal terms). With the Fisher as the curvature,

    s_i = ½ F_ii θ_i²,

the predicted KL divergence between the network's outputs before and after (for the softmax
cross-entropy the Fisher is the generalised Gauss–Newton matrix, a positive semi-definite
Hessian model; Theis et al. 2018, "Fisher pruning"). Magnitude pruning (s_i = |θ_i|; Han et al.,
"Learning both weights and connections", NIPS 2015) is the baseline that ignores the data.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..estimators import FisherEstimate
from . import _trees

Array = Any
Tree = Any

__all__ = ["apply_mask", "magnitude_mask", "prune_mask", "sparsity_of"]

SCOPES = ("global", "layer")


def prune_mask(fisher: FisherEstimate | Tree, params: Tree, sparsity: float, *,
               scope: str = "global", leaves: Iterable[str] | None = None,
               backend: Any = None) -> Tree:
    r"""0/1 keep-masks that drop the fraction ``sparsity`` of lowest saliency ½ F_ii θ_i².

    Parameters
    ----------
    fisher : FisherEstimate or tree
        diag F at ``params`` (see :func:`fisherlib.uses.sensitivity`).
    params : tree
        The parameters (any backend's tree, or a torch ``nn.Module``).
    sparsity : float in [0, 1]
        Fraction of the prunable parameters to remove: ``round(sparsity · n)`` of them, exactly
        (ties broken by position, so the count never depends on ties).
    scope : {"global", "layer"}
        Rank all prunable parameters together, or remove the fraction from each leaf alone.
    leaves : iterable of str, optional
        Names of the leaves that may be pruned (e.g. the weight matrices); the others are kept
        whole. Default: all leaves.
    backend
        The parameters' backend; inferred from their type when None.

    Returns
    -------
    tree
        0/1 arrays shaped like the parameters (1: keep), in their namespace, dtype and device,
        so that ``θ * mask`` prunes (:func:`apply_mask`) in any framework.

    Notes
    -----
    Saliency ranking is scale-aware where magnitude is not: a weight feeding a saturated unit
    (F_ii ≈ 0) goes first however large it is. Global ranking compares saliencies across leaves
    directly, since both are in units of predicted loss increase; magnitudes are not
    comparable across leaves of different scale, hence the common per-layer magnitude scope.

    Cost: one sort of the prunable entries (O(P log P)); no model evaluation.
    """
    lv = _trees.split(params, backend)
    diag = _trees.diagonal(fisher, lv)
    scores = [0.5 * _trees.detach(t) ** 2 * d for t, d in zip(lv.arrays, diag)]
    return _mask(lv, scores, sparsity, scope, leaves)


def magnitude_mask(params: Tree, sparsity: float, *, scope: str = "global",
                   leaves: Iterable[str] | None = None, backend: Any = None) -> Tree:
    """0/1 keep-masks that drop the fraction ``sparsity`` of smallest |θ_i| (the non-Fisher baseline).

    Same arguments and conventions as :func:`prune_mask`.
    """
    lv = _trees.split(params, backend)
    return _mask(lv, [abs(_trees.detach(t)) for t in lv.arrays], sparsity, scope, leaves)


def apply_mask(params: Tree, mask: Tree, *, backend: Any = None) -> Tree:
    """θ ⊙ mask, a new tree like ``params`` (a torch module gives ``{name: tensor}``)."""
    lv = _trees.split(params, backend)
    keep = _trees.diagonal(mask, lv, argname="mask")
    return lv.build([t * k for t, k in zip(lv.arrays, keep)])


def sparsity_of(mask: Tree, *, backend: Any = None) -> float:
    """The fraction of zero entries in a mask tree (or in a parameter tree)."""
    lv = _trees.split(mask, backend, argname="mask")
    xp = lv.xp
    total = sum(_trees.size(m) for m in lv.arrays)
    zeros = sum(int(xp.sum(xp.astype(m == 0, xp.int32))) for m in lv.arrays)
    return zeros / total


# --------------------------------------------------------------------------- helpers


def _mask(lv: _trees.Leaves, scores: list[Array], sparsity: float, scope: str,
          leaves: Iterable[str] | None) -> Tree:
    sparsity = _trees.check_fraction(sparsity, "sparsity")
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    chosen = lv.select(leaves)
    xp = lv.xp
    keep: list[Array | None] = [None] * len(scores)
    idx = [i for i, c in enumerate(chosen) if c]
    if scope == "global":
        flat = xp.concat([xp.reshape(scores[i], (-1,)) for i in idx]) if idx else None
        if flat is not None:
            kept = _keep_top(flat, sparsity, xp)
            start = 0
            for i in idx:
                n = _trees.size(scores[i])
                keep[i] = xp.reshape(kept[start:start + n], scores[i].shape)
                start += n
    else:
        for i in idx:
            keep[i] = xp.reshape(_keep_top(xp.reshape(scores[i], (-1,)), sparsity, xp), scores[i].shape)
    return lv.build([xp.ones_like(t) if k is None else xp.astype(k, t.dtype)
                     for t, k in zip(lv.arrays, keep)])


def _keep_top(s: Array, sparsity: float, xp) -> Array:
    """Boolean: True for all but the round(sparsity·n) smallest entries of s (by rank, not value)."""
    n = s.shape[0]
    drop = int(round(sparsity * n))
    rank = xp.argsort(xp.argsort(s, stable=True), stable=True)  # rank of each entry, 0 = smallest
    return rank >= drop

