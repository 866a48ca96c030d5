"""Choosing the damping λ and the learning rate of a natural-gradient step."""

from __future__ import annotations

import math

__all__ = ["LevenbergMarquardt", "lr_from_lambda_max", "predicted_change"]


def predicted_change(g_dot_direction: float, lr: float) -> float:
    """M(δ) − M(0) for the step δ = −lr·d, d = (F̃ + λI)⁻¹ g, under the damped quadratic model.

    M(δ) = gᵀδ + ½ δᵀ(F̃ + λI)δ, and δᵀ(F̃ + λI)δ = lr² gᵀd, so M(δ) − M(0) = −lr (1 − lr/2) gᵀd.
    """
    return -lr * (1.0 - lr / 2.0) * float(g_dot_direction)


class LevenbergMarquardt:
    """Levenberg–Marquardt adaptation of the damping λ (Martens 2010, §4.1; K-FAC §6.5).

    After a step, ρ = (L(θ + δ) − L(θ)) / (M(δ) − M(0)) compares the loss change with the
    quadratic model's prediction (:func:`predicted_change`). ρ > 3/4: the model is trusted, λ
    shrinks by ``factor``; ρ < 1/4 (or the loss rose): λ grows by ``factor``; otherwise it stays.

    Parameters
    ----------
    damping : float
        Initial λ > 0.
    factor : float
        Multiplicative change ω > 1 (Martens: 3/2).
    minimum, maximum : float
        Bounds on λ.
    """

    def __init__(self, damping: float = 1e-3, *, factor: float = 1.5, minimum: float = 1e-8,
                 maximum: float = 1e4):
        for name, v in (("damping", damping), ("minimum", minimum), ("maximum", maximum)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name}: expected a positive number, got {v!r}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise ValueError(f"factor: expected a number > 1, got {factor!r}")
        if minimum > maximum:
            raise ValueError(f"minimum: expected <= maximum={maximum}, got {minimum}")
        self.damping, self.factor, self.minimum, self.maximum = float(damping), float(factor), minimum, maximum
        self.rho = math.nan

    def update(self, actual: float, predicted: float) -> float:
        """Fold in one step's actual and predicted loss change; return the new λ."""
        actual, predicted = float(actual), float(predicted)
        self.rho = actual / predicted if predicted < 0 else -math.inf
        if not math.isfinite(actual) or self.rho < 0.25:
            self.damping = min(self.damping * self.factor, self.maximum)
        elif self.rho > 0.75:
            self.damping = max(self.damping / self.factor, self.minimum)
        return self.damping

    def state_dict(self) -> dict:
        return {"damping": self.damping, "factor": self.factor, "minimum": self.minimum,
                "maximum": self.maximum, "rho": self.rho}

    def load_state_dict(self, state: dict) -> None:
        self.damping, self.factor = float(state["damping"]), float(state["factor"])
        self.minimum, self.maximum, self.rho = state["minimum"], state["maximum"], state["rho"]

    def __repr__(self) -> str:
        return f"LevenbergMarquardt(damping={self.damping:.3g}, rho={self.rho:.3g})"


def lr_from_lambda_max(lambda_max: float, *, damping: float | None = None, safety: float = 0.5) -> float:
    """A learning rate from the Fisher's largest eigenvalue λ_max (F as the loss's curvature).

    On the quadratic model with Hessian F, gradient descent is stable for lr < 2/λ_max; the
    natural step with (F + λI)⁻¹ has preconditioned curvature ≤ λ_max/(λ_max + λ), stable for
    lr < 2(λ_max + λ)/λ_max. Returns ``safety`` times the limit: the first with
    ``damping=None``, the second otherwise. ``lambda_max`` may be a number or a zero-argument
    callable (e.g. from :mod:`fisherlib.spectral`), evaluated now.
    """
    lam = float(lambda_max() if callable(lambda_max) else lambda_max)
    if not lam > 0 or not math.isfinite(lam):
        raise ValueError(f"lambda_max: expected a positive finite number, got {lam!r}")
    if isinstance(safety, bool) or not 0 < safety <= 1:
        raise ValueError(f"safety: expected a number in (0, 1], got {safety!r}")
    if damping is None:
        return safety * 2.0 / lam
    if not damping >= 0:
        raise ValueError(f"damping: expected a number >= 0, got {damping!r}")
    return safety * 2.0 * (lam + damping) / lam
