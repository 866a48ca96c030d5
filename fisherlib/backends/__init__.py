"""Adapters from array frameworks to fisherlib, and the registry that finds them.

An adapter (:class:`Backend`) runs the user's model to logits and pulls cotangents back to
parameter space with one vector-Jacobian product; it also draws seeded probes and names the
leaves of parameter trees. It does no mathematics. Built in:

========  ==============================================  ==================================
name      models                                          install
========  ==============================================  ==================================
numpy     explicit-VJP models (:mod:`fisherlib.models`)   always
torch     ``nn.Module``, dict + module, ``f(params, x)``  ``pip install 'fisherlib[torch]'``
jax       pure ``f(params, x)`` over any pytree           ``pip install 'fisherlib[jax]'``
cupy      explicit-VJP models; torch/JAX via DLPack       ``pip install 'fisherlib[cupy]'``
========  ==============================================  ==================================

>>> from fisherlib import backends
>>> be = backends.get("numpy")                 # by name
>>> import numpy as np
>>> backends.infer({"w": np.zeros(3)}).name    # from the parameters' array type
'numpy'

Importing this package imports no framework and no adapter; each is loaded on first use.
Third parties add adapters with :func:`register` or the entry-point group
``"fisherlib.backends"`` (see ``docs/write-your-own-adapter.md``).
"""

from __future__ import annotations

from ._common import BatchNormWarning
from ._protocol import VJP, Backend
from ._registry import ENTRY_POINT_GROUP, available, get, infer, register, unregister

__all__ = [
    "ENTRY_POINT_GROUP",
    "VJP",
    "Backend",
    "BatchNormWarning",
    "available",
    "get",
    "infer",
    "register",
    "unregister",
]
