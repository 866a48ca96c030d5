"""Parameter units: weight leaves split per output unit and paired with their bias.

A unit is one output unit of a weight matrix: its incoming weights (a row of a torch
``(out, in)`` weight, a column of a flax ``(in, out)`` kernel; convolutions flatten
``in × kh × kw``) and its bias. :class:`Layout` says which Fisher terms a running estimate keeps
over them (:mod:`fisherlib.estimators._running`, :mod:`fisherlib.natural`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..core._compat import array_namespace
from . import _blocks

Array = Any

__all__ = ["STRUCTURES", "Layout", "Unit", "from_units", "layout", "to_units", "units"]

STRUCTURES = ("diag", "quasidiag", "unitwise", "blocks")


@dataclass(frozen=True)
class Unit:
    """A weight leaf split per output unit along ``axis`` (0: torch's (out, in); -1: flax's
    (in, out) kernels), with the index of its bias leaf (shape (units,)) or None."""

    name: str
    weight: int
    bias: int | None
    axis: int
    units: int
    fan_in: int

    @property
    def size(self) -> int:
        return self.fan_in + (self.bias is not None)


@dataclass(frozen=True)
class Layout:
    """Which terms a running estimate keeps, from the parameter leaves' names and shapes.

    ``units`` are the weight leaves (two or more axes) split per output unit, each with its bias
    leaf when one is found (:func:`units`); ``keys`` name the state's term arrays:
    ``"diag:<leaf>"``, ``"cross:<weight>"`` (U, n), ``"unit:<weight>"`` (U, S, S),
    ``"block:<leaf>"`` (P, P).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    structure: str
    units: tuple[Unit, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        s = self.structure
        if s == "blocks":
            return tuple(f"block:{n}" for n in self.names)
        if s in ("diag", "quasidiag"):
            out = [f"diag:{n}" for n in self.names]
        else:
            in_units = {i for u in self.units for i in (u.weight, u.bias) if i is not None}
            out = [f"diag:{n}" for i, n in enumerate(self.names) if i not in in_units]
        if s == "quasidiag":
            out += [f"cross:{u.name}" for u in self.units if u.bias is not None]
        if s == "unitwise":
            out += [f"unit:{u.name}" for u in self.units]
        return tuple(out)

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)


def units(names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> tuple[Unit, ...]:
    """Split every leaf with two or more axes into output units and pair it with its bias.

    The bias is a 1-D leaf named like the weight ("weight"→"bias", "kernel"→"bias",
    "w"→"b" in the last name component), else the next leaf of the same layer; it decides the unit axis: its
    length equals the weight's first axis (torch ``Linear``/``Conv``: (out, in, ...)) or last
    axis (flax ``Dense``/``Conv`` kernels: (..., in, out)). Without a bias the first axis is
    the unit axis.
    """
    out, taken = [], set()
    for i, (n, s) in enumerate(zip(names, shapes)):
        if len(s) < 2:
            continue
        head, _, last = n.rpartition(".")
        guesses = {last.replace("weight", "bias"), last.replace("kernel", "bias"), last.replace("w", "b")} - {last}
        cands = [j for j, m in enumerate(names) if j not in taken and len(shapes[j]) == 1
                 and m.rpartition(".")[0] == head and m.rpartition(".")[2] in guesses]
        # Else the next leaf of the same layer only: a convolution without bias is followed by
        # a batch norm's weight, which is not its bias.
        if (not cands and i + 1 < len(names) and len(shapes[i + 1]) == 1 and (i + 1) not in taken
                and names[i + 1].rpartition(".")[0] == head):
            cands = [i + 1]
        bias, axis = None, 0
        for j in cands:
            if shapes[j][0] == s[0]:
                bias, axis = j, 0
            elif shapes[j][0] == s[-1]:
                bias, axis = j, -1
            if bias is not None:
                break
        if bias is not None:
            taken.add(bias)
        U = s[axis]
        out.append(Unit(n, i, bias, axis, U, math.prod(s) // U))
    return tuple(out)


def to_units(u: Unit, weight: Array, bias: Array | None, *, lead: int = 0) -> Array:
    """(..., U, S): each unit's weights (flattened), then its bias; ``lead`` leading axes kept."""
    xp = array_namespace(weight)
    w = weight if u.axis == 0 else xp.moveaxis(weight, -1, lead)
    w = xp.reshape(w, (*weight.shape[:lead], u.units, u.fan_in))
    return w if bias is None else xp.concat([w, bias[..., None]], axis=-1)


def from_units(u: Unit, v: Array, shape: tuple[int, ...], *, bias: bool = True) -> tuple[Array, Array | None]:
    """Inverse of :func:`to_units` (no leading axes): (weight shaped ``shape``, bias or None).

    ``bias=False``: ``v`` holds the weights only (U, n)."""
    xp = array_namespace(v)
    w, b = (v[..., :-1], v[..., -1]) if (u.bias is not None and bias) else (v, None)
    if u.axis == 0:
        return xp.reshape(w, shape), b
    return xp.moveaxis(xp.reshape(w, (shape[-1], *shape[:-1])), 0, -1), b


def layout(names: Sequence[str], shapes: Sequence[tuple[int, ...]], structure: str = "diag") -> Layout:
    """The :class:`Layout` of a running estimate of ``structure`` over these leaves."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure: expected one of {STRUCTURES}, got {structure!r}")
    names, shapes = tuple(names), tuple(tuple(int(d) for d in s) for s in shapes)
    found = units(names, shapes) if structure != "blocks" else ()
    for u in found if structure == "unitwise" else ():
        if u.size > _blocks.MAX_BLOCK:
            raise ValueError(f"structure: unit blocks of {u.name!r} have size {u.size} > {_blocks.MAX_BLOCK}")
    for n, s in zip(names, shapes) if structure == "blocks" else ():
        if math.prod(s) > _blocks.MAX_BLOCK:
            raise ValueError(f"structure: leaf {n!r} has {math.prod(s)} entries; dense blocks larger than "
                             f"{_blocks.MAX_BLOCK} are refused (use 'unitwise' or 'quasidiag')")
    return Layout(names, shapes, structure, found)
