"""Parameter trees and Fisher diagonals as aligned lists of named leaves, in any framework.

The uses of the Fisher work leaf by leaf: the parameters' backend (inferred from their type, as
:func:`fisherlib.fisher` does) names the leaves and rebuilds trees, and the diagonal of F comes
from a :class:`~fisherlib.FisherEstimate` (or a plain tree of the same shape), matched to the
parameters by leaf name and moved into their namespace and device. Nothing here imports a
framework.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import backends as _backends
from ..core._compat import array_namespace, device, is_eager  # noqa: F401 (re-exported)
from ..estimators import FisherEstimate
from ..estimators._estimate import _like

Array = Any
Tree = Any


@dataclass
class Leaves:
    """A parameter tree taken apart: its backend, leaf names and arrays, and how to rebuild it."""

    backend: Any
    tree: Tree
    names: list[str]
    arrays: list[Array]

    @property
    def xp(self):
        return array_namespace(*self.arrays)

    def build(self, arrays: list[Array]) -> Tree:
        """A tree shaped like the parameters holding ``arrays`` (a module gives a dict)."""
        return self.backend.unflatten(self.tree, list(arrays))

    def select(self, leaves: Any, argname: str = "leaves") -> list[bool]:
        """Which leaves take part: all for None, else those named in ``leaves``."""
        if leaves is None:
            return [True] * len(self.names)
        if isinstance(leaves, str) or not hasattr(leaves, "__iter__"):
            raise TypeError(f"{argname}: expected an iterable of leaf names or None, got {leaves!r}")
        chosen = set(leaves)
        unknown = sorted(chosen - set(self.names))
        if unknown:
            raise ValueError(f"{argname}: no parameter leaves named {unknown}; the leaves are {self.names}")
        return [n in chosen for n in self.names]


def split(params: Tree, backend: Any = None, argname: str = "params") -> Leaves:
    """Take ``params`` apart with its backend (inferred from the leaves' type when None)."""
    if params is None:
        raise TypeError(f"{argname}: expected a parameter tree (or a torch module), got None")
    be = _backends.get(backend) if backend is not None else _backends.infer(params)
    named = be.leaves(params)
    if not named:
        raise ValueError(f"{argname}: found no parameter leaves")
    return Leaves(be, params, [n for n, _ in named], [x for _, x in named])


def diagonal(fisher: Any, leaves: Leaves, argname: str = "fisher",
             stderr: bool = False) -> list[Array] | tuple[list[Array], list[Array] | None]:
    """diag F per leaf (and its standard error), in the parameters' order, namespace and device.

    ``fisher`` is a diagonal :class:`FisherEstimate` or a tree / ``{name: array}`` dict shaped
    like the parameters (then the standard error is None).
    """
    if isinstance(fisher, FisherEstimate):
        if fisher.structure != "diag":
            raise ValueError(f"{argname}: expected a FisherEstimate of structure 'diag', got "
                             f"structure={fisher.structure!r}")
        by_name = dict(zip(fisher.names, range(len(fisher.names))))
        missing = [n for n in leaves.names if n not in by_name]
        if missing:
            raise ValueError(f"{argname}: the estimate has no leaves {missing}; it has {fisher.names}")
        order = [by_name[n] for n in leaves.names]
        values = fisher._read("value")
        out = [_to(values[i], ref) for i, ref in zip(order, leaves.arrays)]
        if not stderr:  # the standard errors only when asked for: a read costs a pass over F
            return out
        errors = fisher._read("stderr")
        return out, [_to(errors[i], ref) for i, ref in zip(order, leaves.arrays)]
    if isinstance(fisher, Mapping) and set(leaves.names) <= set(fisher):
        values = [fisher[n] for n in leaves.names]
    else:
        try:
            values = [x for _, x in leaves.backend.leaves(fisher)]
        except Exception as e:  # a tree the backend cannot walk
            raise TypeError(f"{argname}: expected a diagonal FisherEstimate or a tree shaped like "
                            f"params, got {type(fisher).__name__}") from e
        if len(values) != len(leaves.names):
            raise ValueError(f"{argname}: expected a tree with the {len(leaves.names)} leaves of "
                             f"params, got {len(values)} leaves")
    out = []
    for name, v, ref in zip(leaves.names, values, leaves.arrays):
        v = _to(v, ref)
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(f"{argname}: leaf {name!r} has shape {tuple(v.shape)}, the parameter "
                             f"{tuple(ref.shape)}")
        out.append(v)
    return (out, None) if stderr else out


def _to(x: Array, ref: Array) -> Array:
    """``x`` detached, in the namespace, device and floating dtype of ``ref``."""
    x = detach(x)
    xp = array_namespace(ref)
    if not (_namespace(x) is xp and device(x) == device(ref)):
        x = _like(x, ref)
    dtype = ref.dtype if xp.isdtype(ref.dtype, "real floating") else x.dtype
    return xp.astype(x, dtype) if x.dtype != dtype else x


def _namespace(x):
    try:
        return array_namespace(x)
    except TypeError:  # not an array (a list, a number)
        return None


def detach(x: Array) -> Array:
    """``x`` cut from any autograd graph (torch tensors have ``detach``; other arrays are values)."""
    return x.detach() if hasattr(x, "detach") else x


def copy(x: Array) -> Array:
    """A detached copy of ``x`` in its own namespace and device."""
    xp = array_namespace(x)
    return xp.asarray(detach(x), copy=True, device=device(x))


def size(x: Array) -> int:
    return math.prod(x.shape)


def check_fraction(value: Any, name: str, *, closed: bool = True) -> float:
    """A number in [0, 1] (or [0, 1) when not ``closed``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0) or (not closed and value == 1.0):
        raise ValueError(f"{name}: expected a number in [0, 1{']' if closed else ')'}, got {value}")
    return value
