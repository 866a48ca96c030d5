"""The spectrum of the Fisher on the parameter space: F v products, λ_max, moments, density.

Not to be confused with :mod:`fisherlib.core.spectrum`, the spectrum of the C × C core-space
FIM of one output. Here F = Σ_x J_xᵀ I(z_x) J_x is the P × P matrix over the parameters, used
matrix-free: :func:`fisher_operator` gives products F v (also as a scipy ``LinearOperator`` and
a function on pytrees for JAX solvers), :func:`fisher_spectrum` every statistic in one call.
"""

from ._density import SpectralDensity, slq
from ._exact import GramSpectrum, gram_spectrum
from ._lanczos import Eigenpairs, lanczos_block, top_eigenpairs
from ._operator import FisherOperator, fisher_operator
from ._summary import LR_CAVEAT, FisherSpectrum, fisher_spectrum

__all__ = [
    "LR_CAVEAT",
    "Eigenpairs",
    "FisherOperator",
    "FisherSpectrum",
    "GramSpectrum",
    "SpectralDensity",
    "fisher_operator",
    "fisher_spectrum",
    "gram_spectrum",
    "lanczos_block",
    "slq",
    "top_eigenpairs",
]
