"""K-FAC as a natural-gradient preconditioner: running factors and their damped inverse.

:class:`KroneckerCurvature` keeps an exponential moving average of the factors A, G of
successive :class:`~fisherlib.KroneckerEstimate` s (one per refresh, each a per-input mean over
its batch) and of the fallback leaves' diagonals, and applies (F̃ + λI)⁻¹ through the factors'
eigendecompositions, computed once per refresh and cached (:meth:`KroneckerEstimate.solve`).
It is what ``NaturalGradient(preconditioner="kfac")`` and ``natural_gradient(preconditioner="kfac")``
(optax) run; any array namespace works.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..core._compat import array_namespace, device
from ..estimators._kronecker import KroneckerEstimate

Array = Any

__all__ = ["KroneckerCurvature"]


class KroneckerCurvature:
    r"""Running K-FAC factors F̃ ≈ ⊕_l A_l ⊗ G_l (⊕ the fallback diagonals) and (F̃ + λI)⁻¹ g.

    Parameters
    ----------
    decay : float or None
        EMA decay of the factors: A ← decay·A + (1 − decay)·A_batch (likewise G and the
        diagonals); None keeps a running mean over the refreshes.
    split : bool
        Martens & Grosse's π-split damping, (A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹, as K-FAC optimizers
        apply it (default); else the exact inverse of A ⊗ G + λI.

    Notes
    -----
    **Cost** per refresh: one ``fisher(structure="kfac")`` batch (a forward and one batched
    backward to the layer outputs), then an eigendecomposition of each factor, O(Σ_l I_l³ + O_l³).
    Per step: two small matrix products per layer, O(Σ_l O_l I_l (O_l + I_l)).
    """

    def __init__(self, decay: float | None = 0.95, *, split: bool = True):
        if decay is not None and not 0 <= decay < 1:
            raise ValueError(f"decay: expected a number in [0, 1) or None, got {decay!r}")
        self.decay, self.split = decay, bool(split)
        self.estimate: KroneckerEstimate | None = None
        self.refreshes = 0

    @property
    def names(self) -> list[str]:
        return [] if self.estimate is None else list(self.estimate.names)

    def update(self, batch: KroneckerEstimate) -> None:
        """Fold in one batch's estimate (its per-input mean: ``reduction="mean"`` or divided here)."""
        if not isinstance(batch, KroneckerEstimate) or batch.structure != "kfac":
            raise TypeError(f"batch: expected the KroneckerEstimate of fisher(..., structure='kfac'), "
                            f"got {type(batch).__name__}")
        new = _unit_parts(batch)
        old = self.estimate
        if old is not None and (old.names != batch.names or old.fallback != batch.fallback
                                or [b.to_dict() for b in old.blocks] != [b.to_dict() for b in batch.blocks]):
            old = None  # other parameters (frozen or thawed since): start afresh
            self.refreshes = 0
        if old is None:
            parts = new
        else:
            w = self.decay if self.decay is not None else self.refreshes / (self.refreshes + 1)
            parts = [w * a + (1 - w) * b for a, b in zip(old.parts, new)]
        self.refreshes += 1
        self.estimate = replace(batch, parts=parts, reduction="sum", n_inputs=1, n_probes=0, stderr_kind="exact",
                                moments=False, draws=(), seed=None)

    def apply(self, grads: list[Array], damping: float) -> list[Array]:
        """(F̃ + λI)⁻¹ g for gradients in the order of :attr:`names`."""
        if self.estimate is None:
            raise RuntimeError("apply: no K-FAC factors yet; update() with a batch's estimate first")
        names = self.names
        out = self.estimate.solve(dict(zip(names, grads)), damping, split=self.split)
        return [out[n] for n in names]

    def mean_diagonal(self) -> float:
        """tr F̃ / P: the scale a relative damping is a fraction of."""
        return self.estimate.trace() / max(1, self.estimate.n_params)


def _unit_parts(est: KroneckerEstimate) -> list[Array]:
    """The estimate's parts as one unit of data: A (count 1), the mean G, the fallback diagonals."""
    xp = array_namespace(est.parts[0])
    scale = 1.0 if est.reduction == "mean" else 1.0 / max(1, est.n_inputs)
    f = est.factors
    parts = []
    for b in est.blocks:
        A = f[b.name]["A"]
        parts += [A, xp.ones((1,), dtype=A.dtype, device=device(A)), f[b.name]["G"][None, ...] * scale]
    diag = est._fallback_values()
    parts += [diag[n][None, ...] * scale for n in est.fallback]
    return parts
