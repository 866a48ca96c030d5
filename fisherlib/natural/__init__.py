"""Natural-gradient steps from fisherlib's Fisher estimates: preconditioners and optimizers.

- :func:`precondition` turns a gradient tree into (F̃ + λI)⁻¹ g for a structured F̃ (diagonal,
  quasi-diagonal, Ollivier / Amari–Karakida–Oizumi unit blocks, full unit blocks, dense
  per-layer blocks with an optional pseudo-inverse), from a :class:`Curvature`;
  :class:`Preconditioner` factorises the same once (per refresh / λ) and applies it per step;
- the array-level solves (:func:`diagonal`, :func:`arrowhead`, :func:`ollivier`,
  :func:`woodbury`, :func:`unit_blocks`, :func:`dense`) work on any Array API namespace;
- :class:`LevenbergMarquardt` adapts the damping λ from the ratio of actual to predicted decrease;
- :class:`NaturalGradient` (a ``torch.optim.Optimizer``) and :func:`natural_gradient` (an
  ``optax.GradientTransformation``) use the training step's own backward pass for the Fisher
  (:class:`fisherlib.estimators.RunningFisher`). They are loaded on first use, so that importing
  this package imports neither torch nor optax;
- ``NaturalGradient(model, preconditioner="sophia")`` (:class:`FisherSophia`) and :func:`sophia`
  (optax): Sophia's clipped diagonal step with the running Fisher diagonal refreshed every k steps,
  a drop-in after a plain ``loss.backward()``.

See ``docs/natural-gradient.md``.
"""

from __future__ import annotations

from ._cached import Preconditioner
from ._damping import LevenbergMarquardt, lr_from_lambda_max
from ._kronecker import KroneckerCurvature
from ._precondition import KINDS, Curvature, precondition
from ._solve import arrowhead, dense, diagonal, ollivier, unit_blocks, woodbury

# NaturalGradient and FisherSophia (torch), natural_gradient, sophia and value_grad_and_probes (optax) load on first use
# and stay out of __all__, so that a star import needs neither torch nor optax.
__all__ = ["KINDS", "Curvature", "KroneckerCurvature", "LevenbergMarquardt", "arrowhead", "dense", "diagonal",
           "lr_from_lambda_max", "ollivier", "precondition", "Preconditioner", "unit_blocks", "woodbury"]


def __getattr__(name: str):
    if name == "NaturalGradient":
        from ._torch_optim import NaturalGradient

        return NaturalGradient
    if name == "FisherSophia":
        from ._sophia import FisherSophia

        return FisherSophia
    if name == "sophia":
        from ._sophia_optax import sophia

        return sophia
    if name == "kfac_natural_gradient":
        from ._kronecker_optax import kfac_natural_gradient

        return kfac_natural_gradient
    if name in ("natural_gradient", "value_grad_and_probes"):
        from . import _optax

        return getattr(_optax, name)
    raise AttributeError(f"module 'fisherlib.natural' has no attribute {name!r}")
