"""Natural-gradient directions (F + λI)⁻¹ g on gradient trees, from a Fisher estimate.

A :class:`Curvature` holds Fisher terms keyed as in :class:`fisherlib.estimators.Layout`
(``"diag:<leaf>"``, ``"cross:<weight>"``, ``"unit:<weight>"``, ``"block:<leaf>"``); it comes
from a :class:`~fisherlib.estimators.RunningFisher` or a :class:`~fisherlib.FisherEstimate`.
:func:`precondition` maps a gradient tree to a tree of the same shape.
"""

from __future__ import annotations

import math
from typing import Any

from .. import backends as _backends
from ..core._compat import array_namespace
from ..estimators._running import Layout, Unit, from_units, layout, to_units
from . import _solve

Array = Any
Tree = Any

__all__ = ["KINDS", "Curvature", "precondition", "structure_for"]

KINDS = ("diag", "quasidiag", "ollivier", "unitwise", "blocks")
UNIT_SOLVES = ("auto", "dense", "woodbury")
DENSE_UNITS = 128  # "auto" solves unit blocks up to this side densely


class Curvature:
    """Fisher terms over named parameter leaves, with accessors for what each solve needs.

    Parameters
    ----------
    layout : Layout
        Leaves' names, shapes and units.
    terms : dict
        ``{term key: array}``; see :class:`~fisherlib.estimators.Layout`.
    groups : dict, optional
        ``{name: leaf indices}``: dense blocks over several leaves (a layer's weight and bias with
        their cross terms), held as ``terms["group:<name>"]`` over the leaves' flattened entries
        concatenated in that order. ``kind="blocks"`` solves each group jointly.
    """

    def __init__(self, layout: Layout, terms: dict[str, Array], groups: dict[str, tuple[int, ...]] | None = None):
        self.layout = layout
        self.terms = dict(terms)
        self.groups = {k: tuple(v) for k, v in (groups or {}).items()}
        for name, ids in self.groups.items():
            if f"group:{name}" not in self.terms:
                raise ValueError(f"groups: group {name!r} has no term 'group:{name}'")
        self._group_of = {i: name for name, ids in self.groups.items() for i in ids}

    @classmethod
    def from_running(cls, running) -> "Curvature":
        """The current estimate of a :class:`~fisherlib.estimators.RunningFisher`."""
        return cls(running.layout, running.value)

    @classmethod
    def from_estimate(cls, estimate, params: Tree, *, backend: Any = None,
                      groups: dict[str, Any] | None = None) -> "Curvature":
        """From a :class:`~fisherlib.FisherEstimate`: ``structure="diag"``, or ``"blocks"`` with
        ``blocks=None`` (a dense block per leaf), ``"unitwise"`` (torch-style (out, in) weights)
        or groups of leaves (``blocks=[["0.weight", "0.bias"], ...]``: a layer's full block,
        weight–bias cross terms included).

        ``params`` gives the leaves' names and shapes (the tree the estimate was made for).
        A group's block is found by its name, the leaves joined by "+" as ``fisher()`` names
        it; ``groups`` (``{block name: leaf names}``) says which leaves a block of another name
        (``fisher(blocks={name: group})``) holds.
        """
        be = _backend(backend, params)
        named = be.leaves(params)
        names, shapes = [n for n, _ in named], [tuple(x.shape) for _, x in named]
        if estimate.structure == "diag":
            value = dict(be.leaves(estimate.value))
            return cls(layout(names, shapes, "diag"), {f"diag:{n}": value[n] for n in names})
        if estimate.structure != "blocks":
            raise ValueError(f"estimate: expected structure 'diag' or 'blocks', got {estimate.structure!r}")
        lay = layout(names, shapes, "unitwise")
        terms, found = {}, {}
        index = {n: i for i, n in enumerate(names)}
        given = dict(groups or {})
        for name, block in estimate.value.items():
            members = given.get(name) or (name.split("+") if "+" in name and name not in index else None)
            if members is not None:
                members = [members] if isinstance(members, str) else list(members)
                unknown = [m for m in members if m not in index]
                size = sum(math.prod(shapes[index[m]]) for m in members if m in index)
                if unknown or tuple(block.shape) != (size, size):
                    raise ValueError(f"estimate: block {name!r} of shape {tuple(block.shape)} does not match the "
                                     f"leaves {members} (unknown: {unknown}, {size} entries)")
                found[name] = tuple(index[m] for m in members)
                terms[f"group:{name}"] = block
                continue
            if block.ndim == 3:  # unit-wise: (U, S, S), rows of an (out, in) weight with its bias
                u = next((u for u in lay.units if u.name == name and u.axis == 0), None)
                if u is None or (u.units, u.size) != tuple(block.shape[:2]):
                    raise ValueError(f"estimate: unit-wise block {name!r} of shape {tuple(block.shape)} does not "
                                     "match a weight leaf with its bias")
                terms[f"unit:{name}"] = block
            elif name in names:
                terms[f"block:{name}"] = block
            else:
                raise ValueError(f"estimate: block {name!r} is neither a parameter leaf nor a group of leaves "
                                 "named 'a+b'; pass groups={name: [leaf names]} for a named group")
        return cls(lay, terms, found)

    # -- accessors ------------------------------------------------------------------------------

    def _unit_block(self, u: Unit) -> Array | None:
        return self.terms.get(f"unit:{u.name}")

    def diag(self, i: int) -> Array:
        """F's diagonal over leaf ``i``, shaped like the leaf."""
        lay = self.layout
        name, shape = lay.names[i], lay.shapes[i]
        if f"diag:{name}" in self.terms:
            return self.terms[f"diag:{name}"]
        if f"block:{name}" in self.terms:
            b = self.terms[f"block:{name}"]
            xp = array_namespace(b)
            return xp.reshape(xp.linalg.diagonal(b), shape)
        if i in self._group_of:
            g = self._group_of[i]
            start, stop = self.group_slice(g, i)
            b = self.terms[f"group:{g}"]
            xp = array_namespace(b)
            return xp.reshape(xp.linalg.diagonal(b)[start:stop], shape)
        for u in lay.units:
            blk = self._unit_block(u)
            if blk is not None and i in (u.weight, u.bias):
                xp = array_namespace(blk)
                d = xp.linalg.diagonal(blk)
                w, b = from_units(u, d, lay.shapes[u.weight])
                return w if i == u.weight else b
        raise ValueError(f"curvature: no Fisher diagonal for leaf {name!r}")

    def group_slice(self, group: str, i: int) -> tuple[int, int]:
        """Where leaf ``i``'s flattened entries sit in group ``group``'s block."""
        start = 0
        for j in self.groups[group]:
            size = math.prod(self.layout.shapes[j])
            if j == i:
                return start, start + size
            start += size
        raise ValueError(f"curvature: leaf {self.layout.names[i]!r} is not in group {group!r}")

    def cross(self, u: Unit) -> Array | None:
        """Bias–weight terms F_{b w_j} (U, n) of a unit, or None when not kept."""
        if f"cross:{u.name}" in self.terms:
            return self.terms[f"cross:{u.name}"]
        blk = self._unit_block(u)
        if blk is not None and u.bias is not None:
            return blk[:, :-1, -1]
        return None


def _backend(backend, tree):
    if backend is None:
        return _backends.infer(tree)
    return _backends.get(backend) if isinstance(backend, str) else backend


def precondition(grads: Tree, curvature: Curvature, kind: str = "diag", damping: float = 1e-3, *,
                 unit_solve: str = "auto", pinv: bool = False, rtol: float | None = None,
                 backend: Any = None) -> Tree:
    """The damped natural-gradient direction (F̃ + λI)⁻¹ g for a structured F̃, as a tree like ``grads``.

    Parameters
    ----------
    grads : tree
        Gradients (a dict by parameter name for a torch module).
    curvature : Curvature
        Fisher terms (:meth:`Curvature.from_running`, :meth:`Curvature.from_estimate`).
    kind : {"diag", "quasidiag", "ollivier", "unitwise", "blocks"}
        F̃: the diagonal; per unit the diagonal plus the bias row (exact arrowhead solve,
        :func:`~fisherlib.natural.arrowhead`, where that matrix is positive definite; units
        where it is not get Ollivier's step); Ollivier's quasi-diagonal step
        (:func:`~fisherlib.natural.ollivier`); the unit-wise blocks (see ``unit_solve``); a
        dense block per leaf. Leaves outside any unit use the diagonal.
    unit_solve : {"auto", "dense", "woodbury"}
        ``kind="unitwise"``: a batched dense solve of each unit's (n+1)² block (needs
        ``RunningFisher("unitwise")``), or Amari–Karakida–Oizumi's diagonal + rank-one block
        inverted in O(n) (:func:`~fisherlib.natural.woodbury`; needs only the quasi-diagonal
        terms; exact when the unit's inputs are uncorrelated given its signal). "auto": dense
        where the blocks are kept and n + 1 <= 128, Woodbury elsewhere.
    damping : float
        λ >= 0.
    pinv : bool
        ``kind="blocks"`` (and "unitwise"): the pseudo-inverse of F̃ + λI (``rtol`` cut-off)
        instead of a solve, so that λ = 0 works for singular blocks.

    Notes
    -----
    Cost per unit of fan-in n: O(n) for "diag", "quasidiag", "ollivier" and "unitwise" by
    Woodbury; O(n³) for dense "unitwise"; O(P³) per leaf of P entries for "blocks".
    """
    check_options(kind, unit_solve, curvature)
    be = _backend(backend, grads)
    named = be.leaves(grads)
    lay = curvature.layout
    if [n for n, _ in named] != list(lay.names):
        raise ValueError(f"grads: leaves {[n for n, _ in named]} differ from the curvature's {list(lay.names)}")
    g = [x for _, x in named]
    out: list[Array | None] = [None] * len(g)
    if kind == "blocks":
        for gname, ids in curvature.groups.items():  # a layer's full block: its leaves solved jointly
            xp = array_namespace(*[g[i] for i in ids])
            flat = xp.concat([xp.reshape(g[i], (-1,)) for i in ids])
            v = _solve.dense(flat, curvature.terms[f"group:{gname}"], damping, pinv=pinv, rtol=rtol)
            for i in ids:
                a, b = curvature.group_slice(gname, i)
                out[i] = xp.reshape(v[a:b], tuple(g[i].shape))
        for i, name in enumerate(lay.names):
            if out[i] is not None:
                continue
            blk = leaf_block(curvature, name)
            xp = array_namespace(g[i])
            flat = xp.reshape(g[i], (-1,))
            out[i] = xp.reshape(_solve.dense(flat, blk, damping, pinv=pinv, rtol=rtol), tuple(g[i].shape))
    elif kind != "diag":
        for u in lay.units:
            how, term = unit_term(curvature, u, kind, unit_solve)
            if how == "dense":
                gb = None if u.bias is None else g[u.bias]
                v = _solve.dense(to_units(u, g[u.weight], gb), term, damping, pinv=pinv, rtol=rtol)
                out[u.weight], b = from_units(u, v, lay.shapes[u.weight])
                if u.bias is not None:
                    out[u.bias] = b
                continue
            if how == "diagonal":
                continue  # no bias row: the diagonal below
            c = term
            dw = to_units(u, curvature.diag(u.weight), None)
            gw = to_units(u, g[u.weight], None)
            solve = {"quasidiag": _solve.arrowhead, "ollivier": _solve.ollivier, "unitwise": _solve.woodbury}[kind]
            db = curvature.diag(u.bias)
            dW, dB = solve(gw, g[u.bias], dw, db, c, damping)
            if kind == "quasidiag":  # an indefinite arrowhead matrix: Ollivier's (psd) step instead
                xp = array_namespace(dW)
                ok = _solve.arrowhead_definite(dw, db, c, damping)
                oW, oB = _solve.ollivier(gw, g[u.bias], dw, db, c, damping)
                dW, dB = xp.where(ok[..., None], dW, oW), xp.where(ok, dB, oB)
            out[u.weight], _ = from_units(u, dW, lay.shapes[u.weight], bias=False)
            out[u.bias] = dB
    for i in range(len(g)):
        if out[i] is None:
            out[i] = _solve.diagonal(g[i], curvature.diag(i), damping)
    return be.unflatten(grads, out)


def check_options(kind: str, unit_solve: str, curvature: Any) -> None:
    """The arguments shared by :func:`precondition` and :class:`~fisherlib.natural.Preconditioner`."""
    if unit_solve not in UNIT_SOLVES:
        raise ValueError(f"unit_solve: expected one of {UNIT_SOLVES}, got {unit_solve!r}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if not isinstance(curvature, Curvature):
        raise TypeError(f"curvature: expected a Curvature, got {type(curvature).__name__}")


def leaf_block(curvature: Curvature, name: str) -> Array:
    """The dense block of leaf ``name`` (``kind="blocks"``), or a clear error."""
    blk = curvature.terms.get(f"block:{name}")
    if blk is None:
        raise ValueError(f"curvature: kind='blocks' needs dense per-leaf or group blocks; leaf {name!r} has "
                         "none (use RunningFisher('blocks') or fisher(structure='blocks'))")
    return blk


def unit_term(curvature: Curvature, u: Any, kind: str, unit_solve: str) -> tuple[str, Array | None]:
    """How unit ``u`` is solved: ("dense", its block), ("coupled", its bias–weight terms) for the
    arrowhead, Ollivier and Woodbury steps, or ("diagonal", None) for a unit without a bias."""
    blk = curvature._unit_block(u)
    fast = unit_solve == "woodbury" or (unit_solve == "auto" and (blk is None or u.size > DENSE_UNITS))
    if kind == "unitwise" and not fast:
        if blk is None:
            raise ValueError(f"curvature: unit_solve='dense' needs unit blocks; {u.name!r} has none "
                             "(use RunningFisher('unitwise'), or unit_solve='woodbury')")
        return "dense", blk
    if u.bias is None:
        return "diagonal", None
    c = curvature.cross(u)
    if c is None:
        raise ValueError(f"curvature: kind={kind!r} needs bias–weight terms; {u.name!r} has none "
                         "(use RunningFisher with structure 'quasidiag' or 'unitwise')")
    return "coupled", c


def structure_for(preconditioner: str, unit_solve: str = "auto") -> str:
    """The :class:`RunningFisher` structure that holds the terms a preconditioner needs."""
    if preconditioner == "diag":
        return "diag"
    if preconditioner in ("quasidiag", "ollivier") or (preconditioner == "unitwise" and unit_solve == "woodbury"):
        return "quasidiag"
    return preconditioner  # "unitwise", "blocks"
