"""Layer I/O capture for JAX functions ``f(params, x)``: layers found in the jaxpr.

The model is traced once to a jaxpr over its flattened parameter leaves and inputs (and once
more at another batch size, which tells every variable's input axis: the one whose size
changed). Each parameter leaf is followed through *views* (reshape, transpose, squeeze,
expand_dims, broadcast_in_dim, convert_element_type, copy) to the equations that use it, and
a leaf with exactly one use that matches a rule below is *covered*:

====================================  ============  =============================================
equation using the leaf (a view P)    kind          captured x; cotangent g taken at
====================================  ============  =============================================
``dot_general(A, P)`` / ``(P, A)``,   dense         A (its input axis free, other free axes are
no batch dimensions, P a permutation                shared positions); g at the product
of the leaf's elements
``conv_general_dilated(A, P)``        dense         A's patches (``conv_general_dilated_patches``,
(strides, padding, dilations,                       in the kernel's order); g at the convolution
feature groups)
``add(Y, P)`` right after one of      dense         the layer's bias (same g)
those, Y used only there
``mul(A, P)``                         scale_shift   x̂ = A broadcast ("scale"); g at the product
``add(A, P)``                         scale_shift   "shift"; g at the sum
``gather(P, idx)`` of whole rows of   embedding     the row indices; g at the gathered rows
a 2-D table (``jnp.take``, ``W[i]``)
====================================  ============  =============================================

A product of the leaf with a constant on the way (flax's BatchNorm folds ``rsqrt(var + eps)``
into its scale) is carried along and multiplied into x̂; such a shift becomes a scale whose x̂
is the constant. This covers flax.linen / flax.nnx ``Dense``, ``DenseGeneral``, ``Conv``, ``Embed``,
``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm`` (``use_running_average=True``: the
scale and bias; the running statistics, if passed as parameters, are not covered), and
equinox ``Linear``, ``Conv``, ``Embedding``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` under
``jax.vmap``; also additive parameters such as a positional embedding. A leaf used twice (tied
weights), through anything that is not a view (a slice, an arithmetic expression, inside a
``scan`` or a ``custom_jvp``), or on an axis mixing inputs is *uncovered*: the estimators give
it the generic per-example VJP.

A model must keep its inputs apart. Where the jaxpr proves it (:mod:`._jax_rows`) nothing is
run; otherwise, once per model and shape, a cotangent at input 0 (and at input N - 1) is pulled
back: if it reaches other inputs' rows of any layer output, the model mixes its inputs (batch
statistics) and the whole model takes the generic path, with a :class:`MixedInputsWarning`.

The layer inputs and cotangents come from re-evaluating the jaxpr with zero perturbations added
at every recognised output: ``jax.vjp`` with respect to the perturbations, ``jax.vmap`` of its
pullback over the V logit cotangents (one batched backward), all compiled with ``jax.jit`` per
model and shape.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..core.layers import Layer
from ._jax_rows import rows_apart
from ._jax_rules import Analysis, Spec
from ._jaxpr import Lit, Program

__all__ = ["LayerCapture", "MixedInputsWarning", "RECOGNISED", "capture"]

RECOGNISED = {
    "dense": "dot_general, conv_general_dilated (+ bias add)",
    "scale_shift": "mul / add by a broadcast parameter",
    "embedding": "gather of whole rows",
}
"""The jaxpr patterns the layer rules cover, by kind."""

# --------------------------------------------------------------------------- capture


def _split_inputs(inputs):
    flat, tree = jax.tree_util.tree_flatten(inputs)
    arrays = [k for k, a in enumerate(flat) if hasattr(a, "shape") and hasattr(a, "dtype")]
    return flat, tree, arrays


def _plan(model: Callable, leaves: list, treedef, inputs: Any):
    """(program, specs, uncovered leaf indices) for this model and these shapes, or None."""
    flat, in_tree, arrays = _split_inputs(inputs)
    if not arrays or any(np.ndim(flat[k]) == 0 for k in arrays):
        return None
    N = flat[arrays[0]].shape[0]
    if any(flat[k].shape[0] != N for k in arrays):
        return None

    def fn(ls, xs):
        full = list(flat)
        for k, x in zip(arrays, xs):
            full[k] = x
        return model(jax.tree_util.tree_unflatten(treedef, ls), jax.tree_util.tree_unflatten(in_tree, full))

    spec = [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in leaves]
    xs = [jax.ShapeDtypeStruct(flat[k].shape, flat[k].dtype) for k in arrays]
    N2 = N + 1
    xs2 = [jax.ShapeDtypeStruct((N2, *flat[k].shape[1:]), flat[k].dtype) for k in arrays]
    try:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(spec, xs)
        closed2 = jax.make_jaxpr(fn)(spec, xs2)
    except Exception:  # noqa: BLE001 -- a model that does not trace: the generic path decides
        return None
    if not isinstance(out_shape, jax.ShapeDtypeStruct):
        return None
    prog, prog2 = Program(closed), Program(closed2)
    if prog.signature() != prog2.signature():
        return None
    try:
        analysis = Analysis(prog, prog2, len(leaves), N, N2)
        specs, uncovered = analysis.specs()
    except Exception as err:  # noqa: BLE001 -- a jaxpr the rules did not foresee must not stop the estimate
        warnings.warn(f"model: the JAX layer rules failed on this model ({type(err).__name__}: {err}); "
                      "per-example methods take the generic per-example VJP", stacklevel=4)
        return None
    try:
        apart = rows_apart(prog, prog2, list(range(len(leaves), len(leaves) + len(arrays))), N, N2, analysis.batch)
    except Exception:  # noqa: BLE001 -- no proof: the numerical check decides
        apart = False
    return prog, specs, uncovered, arrays, apart


def _compile(prog: Program, specs: list[Spec], jit: bool):
    pert = list(dict.fromkeys(s.out for s in specs))  # one perturbation per output, however many layers
    at = [pert.index(s.out) for s in specs]
    keep = {s.x for s in specs if s.x is not None} | {c for s in specs for c in s.coefs if isinstance(c, int)}

    def fwd(leaves, xs):
        args = list(leaves) + list(xs)

        def f(eps):
            outs, rec = prog.evaluate(args, dict(zip(pert, eps)), keep)
            return outs[0], rec

        zeros = [jnp.zeros(prog.shapes[v], prog.dtypes[v]) for v in pert]
        logits, pullback, rec = jax.vjp(f, zeros, has_aux=True)
        xs = [s.canon_x(rec.get(s.x), [c.val if isinstance(c, Lit) else rec[c] for c in s.coefs]) for s in specs]
        return jax.lax.stop_gradient(logits), xs, pullback

    def pull(pullback, ct):
        gs = jax.vmap(pullback)(ct)[0]
        return [s.canon_g(gs[k]) for s, k in zip(specs, at)]

    def pull_one(pullback, ct):
        gs = pullback(ct)[0]
        return [s.canon_g(gs[k][None]) for s, k in zip(specs, at)]

    if jit:
        return jax.jit(fwd), jax.jit(pull), jax.jit(pull_one)
    return fwd, pull, pull_one


def capture(backend, model: Callable, params: Any, inputs: Any):
    """One forward: (detached logits, :class:`LayerCapture`). See the module docstring."""
    if not callable(model):
        raise TypeError(f"model: expected a function f(params, x), got {type(model).__name__}")
    named = backend.leaves(params)
    names = [n for n, _ in named]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    flat, _, arrays = _split_inputs(inputs)
    key = (id(getattr(model, "__self__", None)), id(getattr(model, "__func__", model)), treedef,
           tuple((np.shape(a), str(jnp.result_type(a))) for a in leaves), jax.tree_util.tree_structure(inputs),
           tuple((np.shape(a), str(a.dtype)) if hasattr(a, "dtype") else a for a in flat))
    cache = backend.__dict__.setdefault("_layer_cache", OrderedDict())
    hit = cache.get(key)
    if hit is None or not (hit[0] is model or _same(hit[0], model)):
        plan = _plan(model, leaves, treedef, inputs)
        compiled = None
        if plan is not None and plan[1]:
            compiled = _compile(plan[0], plan[1], backend.jit)
        # Inputs kept apart, proven from the jaxpr (_jax_rows); else checked numerically below.
        hit = cache[key] = [model, plan, compiled, True if plan is not None and plan[4] else None]
        if len(cache) > backend._CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    _, plan, compiled, separate = hit
    if compiled is None:  # nothing recognised: every leaf takes the generic per-example VJP
        logits, _ = backend.linearize(model, params, inputs)
        return logits, LayerCapture([], names, None, None, 0, backend.batch_probes)
    prog, specs, uncovered, arrays, _ = plan
    fwd, pull, pull_one = compiled
    logits, xs, pullback = fwd(leaves, [flat[k] for k in arrays])
    if separate is None:  # once per model and shape
        if isinstance(logits, jax.core.Tracer):  # inside jit: decide on concrete stand-ins now
            with jax.ensure_compile_time_eval():
                _, _, concrete = fwd([_stand_in(a, i) for i, a in enumerate(leaves)],
                                     [_stand_in(flat[k], i) for i, k in enumerate(arrays)])
                separate = hit[3] = _separate(pull, concrete, logits)
        else:
            separate = hit[3] = _separate(pull, pullback, logits)
        if not separate:
            warnings.warn(
                f"model: {getattr(model, '__name__', type(model).__name__)} mixes the inputs of a batch "
                "(batch statistics, or attention across the batch): a cotangent at one input reaches other "
                "inputs' rows of a layer output, so the layer rules do not apply; per-example methods take "
                "the generic per-example VJP, which runs each input as a batch of one", MixedInputsWarning,
                stacklevel=4)
    if not separate:
        return logits, LayerCapture([], names, None, None, 0, backend.batch_probes)
    shapes = [tuple(np.shape(a)) for a in leaves]
    calls = [(s, x, {r: names[i] for r, i in s.roles.items()}, {r: shapes[i] for r, i in s.roles.items()}, k)
             for k, (s, x) in enumerate(zip(specs, xs))]
    elements = sum(math.prod(prog.shapes[s.out]) for s in specs)
    return logits, LayerCapture(calls, [names[i] for i in uncovered], pullback, (pull, pull_one), elements,
                                backend.batch_probes)


class MixedInputsWarning(UserWarning):
    """The model mixes the inputs of a batch, so per-example products take the generic path."""


def _separate(pull, pullback, logits) -> bool:
    """Does a cotangent at input 0 (at input N - 1) reach only row 0 (N - 1) of every layer output?

    Where it reaches other rows the model mixes inputs after that layer, and g_n x_n is not the
    per-example product. Checked once per model and shape, with random cotangents.
    """
    N = logits.shape[0]
    if N == 1:
        return True
    rng = np.random.default_rng(0)
    ct = np.zeros((2, *logits.shape))
    ct[0, 0] = rng.standard_normal(logits.shape[1:])
    ct[1, N - 1] = rng.standard_normal(logits.shape[1:])
    for g in pull(pullback, jnp.asarray(ct, logits.dtype)):
        g = np.asarray(g)
        if not (np.all(g[0, 1:] == 0) and np.all(g[1, :-1] == 0)):
            return False
    return True


def _stand_in(a, i: int) -> jax.Array:
    """A concrete array shaped like ``a`` for :func:`_separate` under a trace: seeded normal
    floats (whether inputs mix is a property of the model's data flow, not of the values),
    ones for integers and booleans (valid token ids and masks)."""
    dt = jnp.result_type(a)
    if jnp.issubdtype(dt, jnp.floating):
        return jnp.asarray(np.random.default_rng(i).standard_normal(np.shape(a)) * 0.5, dt)
    return jnp.ones(np.shape(a), dt)


def _same(a, b) -> bool:
    return (getattr(a, "__func__", None) is not None and getattr(a, "__func__", None) is getattr(b, "__func__", None)
            and getattr(a, "__self__", None) is getattr(b, "__self__", None))


class LayerCapture:
    """The records of one forward; :meth:`__call__` pulls cotangents back to every layer output.

    Attributes
    ----------
    calls : list
        The recognised layers (empty when none: then every leaf is generic).
    uncovered : list of str
        Leaves the logits use that no recognised layer owns.
    elements : int
        Cotangent entries per logit column, summed over the layer outputs.
    """

    def __init__(self, calls, uncovered, pullback, pulls, elements, batch_probes):
        self.calls = calls
        self.uncovered = uncovered
        self.elements = elements
        self._pullback, self._pulls, self._batch = pullback, pulls, batch_probes

    def __call__(self, ct: jax.Array) -> list[Layer]:
        """Layers for a stack ``ct`` (V, *logits.shape) of logit cotangents, one batched backward."""
        if not self.calls:
            return []
        pull, pull_one = self._pulls
        if self._batch:
            gs = pull(self._pullback, ct)
        else:
            rows = [pull_one(self._pullback, ct[k]) for k in range(ct.shape[0])]
            gs = [jnp.concatenate(r, axis=0) for r in zip(*rows)]
        # The loop over inputs inside a compiled program only: run eagerly, lax.scan would compile
        # its body anew on every call, and the batched products are the faster eager route.
        scan = _scan if gs and isinstance(gs[0], jax.core.Tracer) else None
        return [Layer(s.kind, leaves, shapes, x, gs[k], layout=s.layout, num=s.num, scan=scan, add_rows=_add_rows)
                for s, x, leaves, shapes, k in self.calls]


def _add_rows(values, rows, num):
    """The core's scatter-add (:class:`~fisherlib.core.layers.Layer`'s ``add_rows``): a (V, num, D)
    table with ``values[:, k]`` added at row ``rows[k]``; it traces, where ``unique_values`` does not."""
    return jnp.zeros((values.shape[0], num, values.shape[-1]), values.dtype).at[:, rows].add(values)


def _scan(step, init, arrays):
    """The core's loop over inputs (:class:`~fisherlib.core.layers.Layer`'s ``scan``): ``jax.lax.scan``
    (a Python loop for arrays of another namespace, e.g. a record's arrays copied to NumPy)."""
    if not all(isinstance(a, jax.Array) for a in arrays):
        acc = init
        for n in range(arrays[0].shape[0]):
            acc = step(acc, *(a[n, ...] for a in arrays))
        return acc
    return jax.lax.scan(lambda acc, xs: (step(acc, *xs), None), init, tuple(arrays))[0]
