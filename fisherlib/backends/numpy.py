"""The NumPy adapter: explicit-VJP models on the CPU, the reference for the tests.

NumPy has no automatic differentiation, so the model states its own VJP: ``forward(params, x)``
and ``vjp(params, x, ct)`` (:mod:`fisherlib.models` has a linear model and an MLP). The models
and this adapter use the Array API only, so the same backend also runs them on
``array_api_strict`` arrays; probes are drawn with NumPy's generator and converted.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, device, is_numpy_array

from . import _common
from ._common import check_dist, check_seed, check_shape
from ._explicit import ExplicitBackend

Array = Any

__all__ = ["NumpyBackend"]


class NumpyBackend(ExplicitBackend):
    """Explicit-VJP models on NumPy (or any Array API) arrays; see :class:`ExplicitBackend`.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherlib import backends
    >>> from fisherlib.models import MLP
    >>> be = backends.get("numpy")
    >>> model = MLP([4, 8, 3])
    >>> params = model.init(seed=0)
    >>> logits, vjp = be.linearize(model, params, np.ones((5, 4)))
    >>> ct = be.probes(0, (2, 5, 3), "rademacher", like=logits)   # K = 2 stacked cotangents
    >>> vjp(ct)["0.weight"].shape
    (2, 8, 4)
    """

    name = "numpy"

    def probes(self, seed: int, shape: tuple[int, ...], dist: str, like: Array) -> Array:
        """Rademacher (±1), standard Gaussian or uniform [0, 1) values from ``numpy.random.default_rng(seed)``.

        The values depend on ``seed``, ``shape``, ``dist`` and on whether ``like`` is float64
        (drawn in float64) or not (drawn in float32 and cast to ``like``'s dtype).
        """
        import numpy as np

        seed, shape, dist = check_seed(seed), check_shape(shape), check_dist(dist)
        xp = array_namespace(like)
        if not xp.isdtype(like.dtype, "real floating"):
            raise TypeError(f"like: expected a real floating dtype, got {like.dtype}")
        draw = np.float64 if like.dtype == xp.float64 else np.float32
        out = _common.draw(np.random.default_rng(seed), shape, dist, draw, np.int8)
        if is_numpy_array(like):
            return out.astype(like.dtype, copy=False)
        return xp.astype(xp.asarray(out, device=device(like)), like.dtype)  # e.g. array_api_strict
