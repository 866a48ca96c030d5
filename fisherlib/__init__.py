"""fisherlib: compute, bound and estimate the Fisher information metric of neural classifiers.

The core-space geometry lives in :mod:`fisherlib.simplex` (softmax) and
:mod:`fisherlib.hypercube` (multi-label sigmoid). Importing fisherlib imports no array
framework: torch, jax and cupy are loaded only when you pass their arrays.
"""

from . import backends, hypercube, models, natural, simplex, spectral
from .estimators import CompileFallbackWarning, FisherEstimate, KroneckerEstimate, KroneckerFallbackWarning, RunningFisher, Sketch, fisher

__version__ = "0.1.0"

__all__ = ["CompileFallbackWarning", "FisherEstimate", "KroneckerEstimate", "KroneckerFallbackWarning", "RunningFisher", "Sketch", "__version__", "backends", "fisher", "hypercube",
           "models", "natural", "simplex", "spectral"]
