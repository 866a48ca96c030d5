"""The softmax core space (public name for :mod:`fisherlib.core.simplex`)."""

from .core.simplex import *  # noqa: F403
from .core.simplex import __all__, __doc__  # noqa: F401
