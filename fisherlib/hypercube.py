"""The multi-label sigmoid core space (public name for :mod:`fisherlib.core.hypercube`)."""

from .core.hypercube import *  # noqa: F403
from .core.hypercube import __all__, __doc__  # noqa: F401
