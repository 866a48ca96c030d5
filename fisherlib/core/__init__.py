"""Backend-neutral mathematics of the core (logit) space, written against the Array API.

Imports only the standard library and array-api-compat; the namespace always comes from the
arrays (``xp = array_namespace(z)``).
"""

from . import envelopes, hypercube, simplex, spectrum

__all__ = ["envelopes", "hypercube", "simplex", "spectrum"]
