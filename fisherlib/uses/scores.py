r"""Parameter sensitivity from the Fisher diagonal: per parameter and per layer, with error bars.

For a small change δ of the parameters, the model's predictive distribution moves by
KL(p_θ ‖ p_{θ+δ}) = ½ δᵀ F δ + O(δ³), summed over the inputs F was computed on. Two scores
follow (both from the diagonal of F):

- ``score="fisher"``: s_i = F_ii, the curvature of that divergence along parameter i: how far
  the outputs move per unit of change of θ_i (Amari, *Information Geometry and Its
  Applications*, 2016, §12; Kirkpatrick et al. 2017 use it as "importance" in EWC).
- ``score="saliency"``: s_i = ½ F_ii θ_i², the predicted divergence (equivalently, for the
  cross-entropy, the Gauss–Newton prediction of the loss increase) of setting θ_i to 0 —
  optimal brain damage's saliency with the Fisher in place of the Hessian diagonal (LeCun,
  Denker & Solla, "Optimal Brain Damage", NIPS 1989, eq. 7; Theis et al., "Faster gaze
  prediction with dense networks and Fisher pruning", 2018). For softmax outputs the Fisher
  *is* the generalised Gauss–Newton matrix of the cross-entropy, so this is OBD without the
  Hessian's negative curvature; the empirical Fisher is not.

A layer's score is the sum over its entries (for ``"fisher"``: the trace of its diagonal block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..core._compat import array_namespace
from ..estimators import FisherEstimate
from . import _trees

Array = Any
Tree = Any

__all__ = ["Sensitivity", "saliency", "sensitivity"]

SCORES = ("fisher", "saliency")


@dataclass
class Sensitivity:
    """Sensitivity scores per parameter and per layer, with standard errors.

    Attributes
    ----------
    score : {"fisher", "saliency"}
    value, stderr
        Trees shaped like the parameters (a torch module gives ``{name: tensor}``); ``stderr``
        is None when the Fisher came as a plain tree, zeros for an exact estimate and NaN for a
        one-sample Monte-Carlo estimate (see :attr:`FisherEstimate.stderr_kind`).
    layers
        ``{leaf name: sum of the scores over the leaf}`` (Python floats).
    layer_stderr
        The standard errors of those sums, from the spread of the per-probe sums (entries of a
        leaf share probes, so their errors are correlated: this is not the root sum of squares
        of the entries' errors). NaN where the estimate has none.
    sizes
        ``{leaf name: number of parameters}``.
    """

    score: str
    value: Tree
    stderr: Tree | None
    layers: dict[str, float]
    layer_stderr: dict[str, float]
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def layer_mean(self) -> dict[str, float]:
        """Mean score per parameter of each leaf (for ``"fisher"``: F̄_l = tr F_l / n_l)."""
        return {k: v / max(1, self.sizes[k]) for k, v in self.layers.items()}


def sensitivity(fisher: FisherEstimate | Tree, params: Tree, *, score: str = "fisher",
                backend: Any = None) -> Sensitivity:
    r"""Sensitivity of every parameter and every layer (leaf), with standard errors.

    Parameters
    ----------
    fisher : FisherEstimate or tree
        A diagonal estimate (``fisherlib.fisher(..., structure="diag")``) of the model at
        ``params``, or a tree of diag F shaped like ``params``.
    params : tree
        The parameters (any backend's tree, or a torch ``nn.Module``).
    score : {"fisher", "saliency"}
        s_i = F_ii, or the optimal-brain-damage saliency s_i = ½ F_ii θ_i² (module docstring).
    backend
        The parameters' backend (name or object); inferred from their type when None.

    Returns
    -------
    Sensitivity

    Notes
    -----
    Layer l's score is S_l = Σ_{i∈l} w_i F_ii with w_i = 1 or ½ θ_i². For an estimate with K ≥ 2
    probes its standard error is the sample standard deviation of the K per-probe sums S_l^(k)
    over √K (the probes are i.i.d.); a one-probe Hutchinson estimate gets the bound √2·S_l
    (Var(Σ_i w_i ĝ_i²) ≤ 2 (Σ_i w_i F_ii)² for Rademacher probes and w ≥ 0, theory.md §5.2).

    Cost: one pass over the P entries; no model evaluation.

    Examples
    --------
    >>> import numpy as np, fisherlib
    >>> from fisherlib.models import Linear
    >>> from fisherlib.uses import sensitivity
    >>> model = Linear(4, 3); params = model.init(seed=0, like=np.zeros(1))
    >>> x = np.random.default_rng(0).normal(size=(32, 4))
    >>> est = fisherlib.fisher(model, params, x, method="exact")
    >>> s = sensitivity(est, params)
    >>> bool(np.isclose(s.layers["weight"], est.value["weight"].sum()))
    True
    """
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    leaves = _trees.split(params, backend)
    diag, errors = _trees.diagonal(fisher, leaves, stderr=True)
    xp = leaves.xp
    weights = [None if score == "fisher" else 0.5 * _trees.detach(t) ** 2 for t in leaves.arrays]
    value = [d if w is None else w * d for d, w in zip(diag, weights)]
    stderr = None if errors is None else [e if w is None else w * e for e, w in zip(errors, weights)]
    layers = {n: float(xp.sum(v)) for n, v in zip(leaves.names, value)}
    if isinstance(fisher, FisherEstimate):
        layer_se = _layer_stderr(fisher, leaves, weights)
    else:
        layer_se = {n: math.nan for n in leaves.names}
    return Sensitivity(score, leaves.build(value), None if stderr is None else leaves.build(stderr),
                       layers, layer_se, {n: _trees.size(a) for n, a in zip(leaves.names, leaves.arrays)})


def saliency(fisher: FisherEstimate | Tree, params: Tree, *, backend: Any = None) -> Tree:
    r"""Optimal-brain-damage saliency ½ F_ii θ_i² of every parameter, as a tree like ``params``.

    The predicted increase of the (sum) cross-entropy, by the Fisher = Gauss–Newton quadratic
    model, of setting θ_i alone to zero (LeCun et al. 1989, eq. 7). See :func:`sensitivity` for
    its error bars.
    """
    leaves = _trees.split(params, backend)
    diag = _trees.diagonal(fisher, leaves)
    return leaves.build([0.5 * _trees.detach(t) ** 2 * d for t, d in zip(leaves.arrays, diag)])


def _layer_stderr(est: FisherEstimate, leaves: _trees.Leaves, weights) -> dict[str, float]:
    kind = est.stderr_kind
    by_name = dict(zip(est.names, est.parts))
    scale = 1.0 / est.n_inputs if est.reduction == "mean" and est.n_inputs else 1.0
    out = {}
    for name, ref, w in zip(leaves.names, leaves.arrays, weights):
        part = by_name[name]
        K = part.shape[0]
        part = _trees._to(part, ref)  # (K, *leaf) in the parameters' namespace
        xp = array_namespace(part)
        flat = xp.reshape(part if w is None else part * w, (K, -1))
        sums = xp.sum(flat, axis=1) * scale  # the layer score each probe alone gives (x K)
        if kind == "probes":
            out[name] = float(xp.std(sums, correction=1)) / math.sqrt(K)
        elif kind == "bound":
            out[name] = math.sqrt(2.0) * abs(float(xp.mean(sums)))
        elif kind == "exact":
            out[name] = 0.0
        else:
            out[name] = math.nan
    return out
