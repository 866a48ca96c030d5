"""A flat program from a jaxpr, to find layers in and to re-evaluate with perturbed outputs.

:mod:`fisherlib.backends.jax_layers` reads a model ``f(params, x)`` as the jaxpr JAX traces
from it. Calls that only group equations (``jit``/``pjit``, ``closed_call``, ``remat``) are
inlined, so that ``x @ W`` written through a jitted ``jnp`` function is one ``dot_general``
like any other; equations with their own differentiation rules (``custom_jvp_call``,
``custom_vjp_call``) and control flow (``scan``, ``cond``, ``while``) are kept whole, so the
model's derivatives are exactly JAX's. Variables are numbered in order of appearance, so that
two traces of the same model at two batch sizes number them alike.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from jax.extend import core as jcore

__all__ = ["Program", "view_index", "VIEWS"]

# Call-like primitives whose body is inlined (the parameter holding the body differs).
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint"}
# Primitives that only rearrange (or broadcast, or re-type) their operand's elements.
VIEWS = {"reshape", "transpose", "convert_element_type", "broadcast_in_dim", "squeeze", "expand_dims",
         "copy", "copy_p", "reduce_precision"}


class Lit:
    """A constant operand: a jaxpr literal, or a constant of an inlined call."""

    __slots__ = ("val",)

    def __init__(self, val):
        self.val = val


class Node:
    """One equation: primitive, bind parameters, operands (variable numbers or :class:`Lit`),
    outputs; ``raw`` holds the equation's own parameters (a ``custom_jvp_call``'s body)."""

    __slots__ = ("prim", "params", "ins", "outs", "ctx", "raw")

    def __init__(self, prim, params, ins, outs, ctx, raw=None):
        self.prim, self.params, self.ins, self.outs, self.ctx = prim, params, ins, outs, ctx
        self.raw = raw if raw is not None else {}

    @property
    def name(self) -> str:
        return self.prim.name


def _body(eqn) -> tuple[Any, list] | None:
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.ClosedJaxpr):
            return sub.jaxpr, list(sub.consts)
        if isinstance(sub, jcore.Jaxpr):
            return sub, []
    return None


class Program:
    """The equations of a closed jaxpr with call bodies inlined.

    Attributes
    ----------
    nodes : list of Node
    n_in : int
        Variables ``0 .. n_in - 1`` are the jaxpr's inputs, in order.
    outs : list
        The outputs (variable numbers or :class:`Lit`).
    shapes, dtypes : dict
        Every variable's shape and dtype.
    """

    def __init__(self, closed: Any):
        self.nodes: list[Node] = []
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.dtypes: dict[int, Any] = {}
        self._n = 0
        ins = [self._new(v) for v in closed.jaxpr.invars]
        self.n_in = len(ins)
        self.outs = self._inline(closed.jaxpr, list(closed.consts), ins)

    def _new(self, var) -> int:
        i = self._n
        self._n += 1
        self.shapes[i] = tuple(getattr(var.aval, "shape", ()))
        self.dtypes[i] = getattr(var.aval, "dtype", None)
        return i

    def _inline(self, jaxpr, consts, ins) -> list:
        env: dict[Any, Any] = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = Lit(c)
        for v, r in zip(jaxpr.invars, ins):
            env[v] = r

        def read(a):
            return Lit(a.val) if isinstance(a, jcore.Literal) else env[a]

        for eqn in jaxpr.eqns:
            args = [read(a) for a in eqn.invars]
            body = _body(eqn)
            if body is not None:
                outs = self._inline(body[0], body[1], args)
            else:
                outs = [self._new(v) for v in eqn.outvars]
                self.nodes.append(Node(eqn.primitive, eqn.primitive.get_bind_params(eqn.params), args, outs,
                                       eqn.ctx, eqn.params))
            for v, r in zip(eqn.outvars, outs):
                env[v] = r
        return [read(a) for a in jaxpr.outvars]

    def signature(self) -> list[str]:
        """The primitives in order: two traces of one model agree on it."""
        return [n.name for n in self.nodes]

    def live(self) -> list[bool]:
        """Which nodes the outputs depend on."""
        need = {r for r in self.outs if isinstance(r, int)}
        alive = [False] * len(self.nodes)
        for i in range(len(self.nodes) - 1, -1, -1):
            node = self.nodes[i]
            if any(o in need for o in node.outs):
                alive[i] = True
                need.update(r for r in node.ins if isinstance(r, int))
        return alive

    def consumers(self, alive: list[bool]) -> dict[int, list[tuple[int, int]]]:
        """Variable -> the (node, operand position) pairs of live nodes that read it."""
        out: dict[int, list[tuple[int, int]]] = {}
        for i, node in enumerate(self.nodes):
            if alive[i]:
                for pos, r in enumerate(node.ins):
                    if isinstance(r, int):
                        out.setdefault(r, []).append((i, pos))
        return out

    def evaluate(self, args: list, eps: dict[int, Any], keep: set[int]) -> tuple[list, dict[int, Any]]:
        """Run the program on ``args``, adding ``eps[v]`` to variable ``v`` where it is computed.

        Returns the outputs and the values of the variables in ``keep``.
        """
        env: dict[int, Any] = dict(enumerate(args))
        for v, e in eps.items():
            if v < self.n_in:
                env[v] = env[v] + e

        def read(r):
            return r.val if isinstance(r, Lit) else env[r]

        for node in self.nodes:
            with node.ctx.manager:
                ans = node.prim.bind(*[read(r) for r in node.ins], **node.params)
            ans = ans if node.prim.multiple_results else [ans]
            for o, a in zip(node.outs, ans):
                env[o] = a + eps[o] if o in eps else a
        return [read(r) for r in self.outs], {v: env[v] for v in keep}


def view_index(node: Node, idx: np.ndarray) -> np.ndarray | None:
    """Where a view node puts each element of its operand: ``idx`` rearranged as the node does.

    ``idx`` holds, for every element of the operand, the flat index of the parameter element
    it is; the result holds the same for the node's output (``None`` for an unknown view).
    """
    p = node.params
    name = node.name
    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
        return idx
    if name == "reshape":
        if p.get("dimensions") is not None or len(node.ins) != 1:
            return None
        return idx.reshape(p["new_sizes"])
    if name == "transpose":
        return idx.transpose(p["permutation"])
    if name == "squeeze":
        return np.squeeze(idx, axis=tuple(int(d) for d in p["dimensions"]))
    if name == "expand_dims":
        return np.expand_dims(idx, tuple(int(d) for d in p["dimensions"]))
    if name == "broadcast_in_dim":
        if len(node.ins) != 1:
            return None
        shape, dims = tuple(p["shape"]), [int(d) for d in p["broadcast_dimensions"]]
        if dims != sorted(dims):
            return None
        ones = [1] * len(shape)
        for j, d in enumerate(dims):
            ones[d] = idx.shape[j]
        return np.broadcast_to(idx.reshape(ones), shape)
    return None


def arange_like(shape: tuple[int, ...]) -> np.ndarray:
    """Flat indices of a parameter of ``shape``, in its own shape."""
    return np.arange(math.prod(shape)).reshape(shape)
