"""Does a traced model keep the inputs of a batch apart? A conservative proof from its jaxpr.

Per-example products from layer I/O need the model to be row-local: row n of every layer
output depends on input n alone (no batch statistics, no attention across the batch), so that
a cotangent at input n's logits reaches only row n of every layer output.
:mod:`fisherlib.backends.jax_layers` checks this numerically, pulling two cotangents back
through the model once per model and shape; that costs a compilation of the forward and a
batched backward (1.4 s of BERT-tiny's 4.3 s first exact call). This module proves it instead
where it can, from the two traces at batch sizes N and N + 1 the layer rules already make:

* every variable computed from the inputs has one axis whose size is N in one trace and
  N + 1 in the other (its input axis);
* every equation on such variables maps input axis to input axis by a rule that keeps rows
  apart: elementwise operations with the axis in the same place, views that keep it
  (transpose, broadcast, reshape that keeps the sizes before it), reductions, cumulative
  sums, sorts, slices, pads and concatenations along other axes, ``dot_general`` with the axis
  free in one operand or a batch dimension of both (attention within an input), convolutions
  over it as their batch, gathers from a parameter table by per-input indices (embeddings)
  or of whole input rows, and ``custom_jvp`` calls whose body does (``jax.nn.relu``, softmax:
  their rules are the body's derivatives).

Anything else — an unknown primitive, control flow, ``custom_vjp`` (its backward is its own),
an axis that changes place in a way no rule names — is not a proof, and the numerical check
decides. ``rows_apart`` is never True for a model that mixes inputs; it may be False for one
that does not.
"""

from __future__ import annotations

import math

from ._jaxpr import Program

__all__ = ["batch_axes", "rows_apart"]

_ELEMENTWISE = {
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil", "clamp",
    "conj", "convert_element_type", "copy", "copy_p", "cos", "cosh", "digamma", "div", "eq", "erf", "erf_inv",
    "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag", "integer_pow", "is_finite", "le", "lgamma", "log",
    "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real",
    "reduce_precision", "rem", "round", "rsqrt", "select_n", "shift_left", "shift_right_arithmetic",
    "shift_right_logical", "sign", "sin", "sinh", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh", "xor",
}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax",
               "argmin"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_RESHAPES = {"reshape", "squeeze", "expand_dims"}


def batch_axes(prog: Program, prog2: Program, N: int, N2: int) -> dict[int, int]:
    """Variable -> its input axis (the one axis of size N here and N2 there); -1 for a variable
    whose shape changes otherwise; variables of equal shapes in both traces are left out."""
    out = {}
    for v, s in prog.shapes.items():
        s2 = prog2.shapes.get(v, ())
        diff = [a for a in range(len(s)) if len(s) == len(s2) and s[a] != s2[a]]
        if len(s) == len(s2) and len(diff) == 1 and s[diff[0]] == N and s2[diff[0]] == N2:
            out[v] = diff[0]
        elif diff or len(s) != len(s2):
            out[v] = -1
    return out


def rows_apart(prog: Program, prog2: Program, inputs: list[int], N: int, N2: int,
               batch: dict[int, int] | None = None) -> bool:
    """True when every live equation on the variables computed from ``inputs`` (variable
    numbers) provably keeps their rows apart (see the module docstring); ``batch``: the
    programs' :func:`batch_axes`, when the caller has them."""
    if N < 2 or prog.signature() != prog2.signature():
        return False
    batch = batch_axes(prog, prog2, N, N2) if batch is None else batch
    data = set(inputs)
    alive = prog.live()
    for i, node in enumerate(prog.nodes):
        ins = [r if isinstance(r, int) and r in data else None for r in node.ins]
        if not any(r is not None for r in ins):
            continue
        data.update(node.outs)
        if not alive[i]:
            continue
        axes = [None if r is None else batch.get(r, -2) for r in ins]
        outs = [batch.get(o, -2) for o in node.outs]
        if any(a is not None and a < 0 for a in axes) or any(o < 0 for o in outs):
            return False  # an input-dependent variable without one clear input axis
        if not _keeps_rows(node, prog, prog2.nodes[i], axes, outs, N, N2):
            return False
    return all(batch.get(r, -2) >= 0 for r in prog.outs if isinstance(r, int) and r in data)


def _keeps_rows(node, prog: Program, node2, axes: list, outs: list[int], N: int, N2: int) -> bool:
    """Does this equation map row n of its input-dependent operands to row n of its outputs only?"""
    name, p = node.name, node.params
    data = [a for a in axes if a is not None]
    if name in _ELEMENTWISE:
        return all(a == outs[0] for a in data)
    if len(outs) != 1 and name not in ("sort", "split", "custom_jvp_call"):
        return False
    if name == "transpose":
        return p["permutation"][outs[0]] == axes[0]
    if name == "broadcast_in_dim":
        return axes[0] is not None and all(a is None for a in axes[1:]) and \
            p["broadcast_dimensions"][axes[0]] == outs[0]
    if name in _RESHAPES:
        if name == "reshape" and (p.get("dimensions") is not None or len(node.ins) != 1):
            return False
        before = math.prod(prog.shapes[node.ins[0]][:axes[0]])
        return before == math.prod(prog.shapes[node.outs[0]][:outs[0]])
    if name in _REDUCTIONS:
        red = tuple(p["axes"])
        return axes[0] not in red and outs[0] == axes[0] - sum(a < axes[0] for a in red)
    if name in _CUMULATIVE:
        return p["axis"] != axes[0] and outs[0] == axes[0]
    if name in ("sort", "split", "concatenate"):
        along = p["dimension"] if name != "split" else p["axis"]
        return all(a == outs[0] for a in data) and along != outs[0] and all(o == outs[0] for o in outs)
    if name == "pad":
        return axes[0] == outs[0] and all(a is None for a in axes[1:]) and \
            tuple(p["padding_config"][axes[0]]) == (0, 0, 0)
    if name == "slice":
        b = axes[0]
        strides = p.get("strides")
        return b == outs[0] and p["start_indices"][b] == 0 and p["limit_indices"][b] == N and \
            (strides is None or strides[b] == 1)
    if name == "dynamic_slice":  # the whole input axis, at a start no input sets
        b = axes[0]
        return b == outs[0] and all(a is None for a in axes[1:]) and p["slice_sizes"][b] == N
    if name == "dot_general":
        return _dot_keeps_rows(node, prog, axes, outs[0])
    if name == "conv_general_dilated":
        dn = p["dimension_numbers"]
        return axes[1] is None and axes[0] == dn.lhs_spec[0] and outs[0] == dn.out_spec[0] and \
            p["batch_group_count"] == 1
    if name == "gather":
        return _gather_keeps_rows(node, prog, axes, outs[0])
    if name == "custom_jvp_call":  # the body decides (its JVP rule is its derivative)
        body, body2 = node.raw.get("call_jaxpr"), node2.raw.get("call_jaxpr")
        if body is None or body2 is None:
            return False
        inner, inner2 = Program(body), Program(body2)
        return rows_apart(inner, inner2, [k for k, a in enumerate(axes) if a is not None], N, N2) and \
            [batch_axes(inner, inner2, N, N2).get(r, -2) for r in inner.outs] == outs
    return False


def _dot_keeps_rows(node, prog: Program, axes: list, out: int) -> bool:
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    lb, rb, lc, rc = list(lb), list(rb), list(lc), list(rc)
    al, ar = axes
    nl, nr = len(prog.shapes[node.ins[0]]), len(prog.shapes[node.ins[1]])
    lfree = [d for d in range(nl) if d not in lc and d not in lb]
    rfree = [d for d in range(nr) if d not in rc and d not in rb]
    if al is not None and ar is not None:  # both from the inputs: the axis must pair row with row
        return al in lb and ar in rb and lb.index(al) == rb.index(ar) == out
    if al is not None:
        return al in lfree and out == len(lb) + lfree.index(al)
    return ar in rfree and out == len(lb) + len(lfree) + rfree.index(ar)


def _gather_keeps_rows(node, prog: Program, axes: list, out: int) -> bool:
    dn = node.params["dimension_numbers"]
    if dn.operand_batching_dims or dn.start_indices_batching_dims:
        return False
    ao, ai = axes
    if ao is None:  # a parameter table gathered by per-input indices: the index axes become the output's
        idx_ndim = len(prog.shapes[node.ins[1]])
        if ai >= idx_ndim - 1:  # the input axis is the index vector's
            return False
        out_ndim = len(prog.shapes[node.outs[0]])
        index_dims = [d for d in range(out_ndim) if d not in dn.offset_dims]
        return index_dims[ai] == out
    if ai is not None:  # input rows gathered by input-dependent indices
        return False
    # input rows sliced by fixed indices: the input axis must be whole and not indexed
    if ao in dn.start_index_map or ao in dn.collapsed_slice_dims:
        return False
    if node.params["slice_sizes"][ao] != prog.shapes[node.ins[0]][ao]:
        return False
    kept = [d for d in range(len(prog.shapes[node.ins[0]])) if d not in dn.collapsed_slice_dims]
    return dn.offset_dims[kept.index(ao)] == out
