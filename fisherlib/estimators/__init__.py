"""Fisher estimators on the parameter space: Hutchinson, exact, Monte-Carlo, empirical."""

from ._estimate import FisherEstimate
from ._fisher import fisher
from ._running import Layout, RunningFisher
from ._sketch import Sketch

__all__ = ["FisherEstimate", "Layout", "RunningFisher", "Sketch", "fisher"]
