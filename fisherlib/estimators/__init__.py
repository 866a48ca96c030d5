"""Fisher estimators on the parameter space: Hutchinson, exact, Monte-Carlo, empirical."""

from ._compiled import CompileFallbackWarning
from ._estimate import FisherEstimate
from ._fisher import fisher
from ._kfac import KroneckerBlock, KroneckerFallbackWarning
from ._kronecker import KroneckerEstimate
from ._running import Layout, RunningFisher
from ._sketch import Sketch

__all__ = ["CompileFallbackWarning", "FisherEstimate", "KroneckerBlock", "KroneckerEstimate", "KroneckerFallbackWarning", "Layout", "RunningFisher", "Sketch", "fisher"]
