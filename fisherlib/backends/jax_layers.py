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

This covers flax.linen / flax.nnx ``Dense``, ``DenseGeneral``, ``Conv``, ``Embed``,
``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm`` (``use_running_average=True``: the
scale and bias; the running statistics, if passed as parameters, are not covered), and
equinox ``Linear``, ``Conv``, ``Embedding``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` under
``jax.vmap``; also additive parameters such as a positional embedding. A leaf used twice (tied
weights), through anything that is not a view (a slice, an arithmetic expression, inside a
``scan`` or a ``custom_jvp``), or on an axis mixing inputs is *uncovered*: the estimators give
it the generic per-example VJP.

The layer inputs and cotangents come from re-evaluating the jaxpr with zero perturbations added
at every recognised output: ``jax.vjp`` with respect to the perturbations, ``jax.vmap`` of its
pullback over the V logit cotangents (one batched backward), all compiled with ``jax.jit`` per
model and shape.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import OrderedDict
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..core.layers import Layer
from ._jaxpr import VIEWS, Lit, Program, arange_like, view_index

__all__ = ["LayerCapture", "MixedInputsWarning", "RECOGNISED", "capture"]

RECOGNISED = {
    "dense": "dot_general, conv_general_dilated (+ bias add)",
    "scale_shift": "mul / add by a broadcast parameter",
    "embedding": "gather of whole rows",
}
"""The jaxpr patterns the layer rules cover, by kind."""

_PERMS = 720  # the most axis orders tried when matching a kernel's layout


class _Spec:
    """One recognised layer: kind, roles (role -> leaf index), the perturbed and the input variable."""

    def __init__(self, kind, roles, out, x, canon_x, perm, gshape, layout="oi", num=0, coefs=()):
        self.kind, self.roles, self.out, self.x = kind, roles, out, x
        self.canon_x, self.perm, self.gshape = canon_x, perm, gshape
        self.layout, self.num, self.coefs = layout, num, coefs
        self.bias = None  # a shift: (node, position, index array), for a dense layer to take

    def canon_g(self, g):
        """(V, *out) -> the canonical (V, N, S, ...) of core.layers."""
        return jnp.reshape(jnp.transpose(g, (0, *[1 + a for a in self.perm])), (g.shape[0], *self.gshape))


def _arranged(idx: np.ndarray, perm, shape) -> np.ndarray:
    return np.transpose(idx, perm).reshape(shape)


def _layout(idx: np.ndarray, o_axes, i_axes):
    """Axis orders (o, i) and "oi"/"io" under which the view ``idx`` is the leaf's own flat order."""
    O = math.prod(idx.shape[a] for a in o_axes)
    I = math.prod(idx.shape[a] for a in i_axes)
    flat = np.arange(O * I)
    tries = 0
    for po in itertools.permutations(o_axes):
        for pi in itertools.permutations(i_axes):
            tries += 1
            if tries > _PERMS:
                return None
            m = _arranged(idx, (*po, *pi), (O, I))
            if np.array_equal(m.ravel(), flat):
                return po, pi, "oi"
            if np.array_equal(m.T.ravel(), flat):
                return po, pi, "io"
    return None


def _bijective(idx: np.ndarray, size: int) -> bool:
    return idx.size == size and np.array_equal(np.sort(idx.ravel()), np.arange(size))


class _Analysis:
    """The rules applied to one traced program (see the module docstring)."""

    def __init__(self, prog: Program, prog2: Program, n_leaves: int, N: int, N2: int):
        self.prog, self.n_leaves, self.N = prog, n_leaves, N
        self.alive = prog.live()
        self.cons = prog.consumers(self.alive)
        self.outs = {r for r in prog.outs if isinstance(r, int)}
        self.batch = {}
        for v, s in prog.shapes.items():
            s2 = prog2.shapes.get(v, ())
            diff = [a for a in range(len(s)) if len(s) == len(s2) and s[a] != s2[a]]
            if len(s) == len(s2) and len(diff) == 1 and s[diff[0]] == N and s2[diff[0]] == N2:
                self.batch[v] = diff[0]
            elif diff or len(s) != len(s2):
                self.batch[v] = -1  # depends on the batch in a way no rule takes
        # Variables computed from any parameter leaf or input: constants are the rest.
        self.varying = set(range(prog.n_in))
        for node in prog.nodes:
            if any(isinstance(r, int) and r in self.varying for r in node.ins):
                self.varying.update(node.outs)

    def _constant(self, r) -> bool:
        return not isinstance(r, int) or r not in self.varying

    def uses(self, leaf: int) -> list:
        """Every non-view use of the leaf: (node, operand position, index array, coefficients).

        Views carry the index array along; a product with a constant (flax's BatchNorm folds
        ``rsqrt(running_var + eps)`` into its scale) is carried as a coefficient.
        """
        found, stack = [], [(leaf, arange_like(self.prog.shapes[leaf]), ())]
        while stack:
            v, idx, coefs = stack.pop()
            if v in self.outs:
                found.append(None)
            for i, pos in self.cons.get(v, []):
                node = self.prog.nodes[i]
                if node.name in VIEWS and pos == 0:
                    nxt = view_index(node, idx)
                    if nxt is not None:
                        stack.append((node.outs[0], nxt, coefs))
                        continue
                if node.name == "mul" and self._constant(node.ins[1 - pos]):
                    try:
                        nxt = np.broadcast_to(idx, self.prog.shapes[node.outs[0]])
                    except ValueError:
                        nxt = None
                    if nxt is not None:
                        stack.append((node.outs[0], nxt, (*coefs, node.ins[1 - pos])))
                        continue
                found.append((i, pos, idx, coefs))
        return found

    def _b(self, r):
        """The input axis of operand ``r``, or None (constants, parameters, mixed axes)."""
        b = self.batch.get(r) if isinstance(r, int) else None
        return None if b is None or b < 0 else b

    def match(self, leaf: int, use) -> _Spec | None:
        i, pos, idx, coefs = use
        node = self.prog.nodes[i]
        if node.name in ("mul", "add"):
            return (self._scale if node.name == "mul" else self._shift)(leaf, node, pos, idx, coefs)
        rule = {"dot_general": self._dense, "conv_general_dilated": self._conv, "gather": self._embedding}.get(node.name)
        if rule is None or coefs or len(node.outs) != 1 or self._b(node.outs[0]) is None:
            return None
        return rule(leaf, node, pos, idx)

    def _dense(self, leaf, node, pos, idx):
        (lc, rc), (lb, rb) = node.params["dimension_numbers"]
        a = node.ins[1 - pos]
        bA = self._b(a)
        size = math.prod(self.prog.shapes[leaf])
        if lb or rb or bA is None or not _bijective(idx, size):
            return None
        cP, cA = (list(lc), list(rc)) if pos == 0 else (list(rc), list(lc))
        if bA in cA:
            return None
        fP = [d for d in range(idx.ndim) if d not in cP]
        fA = [d for d in range(len(self.prog.shapes[a])) if d not in cA]
        found = _layout(idx, fP, cP)
        if found is None:
            return None
        po, pi, layout = found
        ypos = {("A", d): (k if pos == 1 else len(fP) + k) for k, d in enumerate(fA)}
        ypos.update({("P", d): (k if pos == 0 else len(fA) + k) for k, d in enumerate(fP)})
        S = [d for d in fA if d != bA]
        sA = self.prog.shapes[a]
        n_s = math.prod(sA[d] for d in S)
        I = math.prod(idx.shape[d] for d in cP)
        O = size // I
        xperm = (bA, *S, *[cA[cP.index(d)] for d in pi])

        def canon_x(x, _=()):
            return jnp.reshape(jnp.transpose(x, xperm), (self.N, n_s, 1, I))

        perm = (ypos[("A", bA)], *[ypos[("A", d)] for d in S], *[ypos[("P", d)] for d in po])
        return _Spec("dense", {"weight": leaf}, node.outs[0], a, canon_x, perm, (self.N, n_s, 1, O), layout)

    def _conv(self, leaf, node, pos, idx):
        p = node.params
        a = node.ins[0]
        dn = p["dimension_numbers"]
        lhs, rhs, out = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        size = math.prod(self.prog.shapes[leaf])
        if pos != 1 or p["batch_group_count"] != 1 or self._b(a) != lhs[0] or not _bijective(idx, size):
            return None
        i_axes = [rhs[1], *rhs[2:]]
        found = _layout(idx, [rhs[0]], i_axes)
        if found is None:
            return None
        _, pi, layout = found
        G = p["feature_group_count"]
        d = len(rhs) - 2
        ksz = [idx.shape[k] for k in rhs[2:]]
        Cg = idx.shape[rhs[1]]
        I = Cg * math.prod(ksz)
        O = idx.shape[rhs[0]]
        sy = self.prog.shapes[node.outs[0]]
        L = math.prod(sy[k] for k in out[2:])
        order = [i_axes.index(k) for k in pi]  # positions in (Cg, k_1 .. k_d)
        N = self.N

        def canon_x(x, _=()):
            pt = jax.lax.conv_general_dilated_patches(
                x, tuple(ksz), p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"], dn,
                precision=p.get("precision"))
            pt = jnp.transpose(pt, (out[0], *out[2:], out[1]))
            pt = jnp.reshape(pt, (N, L, G, Cg, *ksz))
            pt = jnp.transpose(pt, (0, 1, 2, *[3 + k for k in order]))
            return jnp.reshape(pt, (N, L, G, I))

        perm = (out[0], *out[2:], out[1])
        return _Spec("dense", {"weight": leaf}, node.outs[0], a, canon_x, perm, (N, L, G, O // G), layout)

    def _elementwise(self, node, pos, idx, leaf):
        """(perm, (N, S, C)) arranging the output so that the parameter varies along C as its own order."""
        y = node.outs[0]
        shape = self.prog.shapes[y]
        try:
            idx = np.broadcast_to(idx, shape)
        except ValueError:
            return None
        b = self._b(y)
        varies = [k for k in range(len(shape)) if k != b and not np.all(idx == idx.take([0], axis=k))]
        S = [k for k in range(len(shape)) if k != b and k not in varies]
        n_s = math.prod(shape[k] for k in S)
        C = math.prod(shape[k] for k in varies)
        if C != math.prod(self.prog.shapes[leaf]):
            return None
        for tries, pc in enumerate(itertools.permutations(varies)):
            if tries >= _PERMS:
                return None
            perm = (b, *S, *pc)
            if np.array_equal(_arranged(idx, perm, (self.N, n_s, C)), np.broadcast_to(np.arange(C), (self.N, n_s, C))):
                return perm, (self.N, n_s, C)
        return None

    def _scale(self, leaf, node, pos, idx, coefs, shift=False):
        """y = a ⊙ (c ⊙ P): the scale rule with x̂ = a ⊙ c; y = a + c ⊙ P (``shift``): x̂ = c."""
        a = None if shift else node.ins[1 - pos]
        if len(node.outs) != 1 or self._b(node.outs[0]) is None or not (isinstance(a, int) or shift):
            return None
        got = self._elementwise(node, pos, idx, leaf)
        if got is None:
            return None
        perm, shape = got
        y_shape = self.prog.shapes[node.outs[0]]

        def canon_x(x, cs=()):
            vals = ([x] if x is not None else []) + list(cs)
            out = vals[0]
            for c in vals[1:]:
                out = out * c
            return jnp.reshape(jnp.transpose(jnp.broadcast_to(out, y_shape), perm), shape)

        return _Spec("scale_shift", {"scale": leaf}, node.outs[0], a, canon_x, perm, shape, coefs=coefs)

    def _shift(self, leaf, node, pos, idx, coefs):
        if coefs:  # y = a + c ⊙ P: a scale whose x̂ is c
            return self._scale(leaf, node, pos, idx, coefs, shift=True)
        if len(node.outs) != 1 or self._b(node.outs[0]) is None:
            return None
        got = self._elementwise(node, pos, idx, leaf)
        if got is None:
            return None
        perm, shape = got
        dtype = self.prog.dtypes[node.outs[0]]
        spec = _Spec("scale_shift", {"shift": leaf}, node.outs[0], None, lambda *_: jnp.zeros(shape, dtype), perm,
                     shape)
        spec.bias = (node, pos, idx)  # a dense layer right before may take it as its bias
        return spec

    def _embedding(self, leaf, node, pos, idx):
        p = node.params
        dn = p["dimension_numbers"]
        table = self.prog.shapes[leaf]
        ind = node.ins[1]
        if (pos != 0 or len(table) != 2 or not np.array_equal(idx, arange_like(table)) or dn.operand_batching_dims
                or tuple(p["slice_sizes"]) != (1, table[1]) or 0 not in dn.start_index_map
                or not set(dn.collapsed_slice_dims) <= {0}):
            return None
        mode = str(p["mode"])
        if 1 in dn.start_index_map and "FILL_OR_DROP" in mode:
            return None
        y = node.outs[0]
        sy = self.prog.shapes[y]
        bdims = [k for k in range(len(sy)) if k not in dn.offset_dims]
        b = self._b(y)
        if b not in bdims:
            return None
        k_row = list(dn.start_index_map).index(0)
        S = [k for k in bdims if k != b]
        n_s = math.prod(sy[k] for k in S)
        iperm = (bdims.index(b), *[bdims.index(k) for k in S])
        num, N = table[0], self.N
        clip = "CLIP" in mode

        def canon_x(ix, _=()):
            rows = jnp.reshape(jnp.transpose(ix[..., k_row], iperm), (N, n_s))
            return jnp.clip(rows, 0, num - 1) if clip else rows

        perm = (b, *S, *dn.offset_dims)
        return _Spec("embedding", {"weight": leaf}, y, ind, canon_x, perm, (N, n_s, table[1]), num=num)

    def specs(self) -> tuple[list[_Spec], list[int]]:
        """The recognised layers and the uncovered leaves (used by the outputs, owned by no rule)."""
        specs, uncovered = [], []
        for leaf in range(self.n_leaves):
            uses = self.uses(leaf)
            spec = self.match(leaf, uses[0]) if len(uses) == 1 and uses[0] is not None else None
            if spec is not None:
                specs.append(spec)
            elif uses:
                uncovered.append(leaf)
        return self._biases(specs), uncovered

    def _biases(self, specs):
        """A shift added to a dense layer's output used only there becomes that layer's bias."""
        dense = {s.out: s for s in specs if s.kind == "dense"}
        keep = []
        for s in specs:
            if s.bias is not None:
                node, pos, idx = s.bias
                y = node.ins[1 - pos]
                d = dense.get(y)
                if d is not None and "bias" not in d.roles and y not in self.outs and len(self.cons.get(y, [])) == 1:
                    O = d.gshape[-1] * d.gshape[-2]
                    leaf = s.roles["shift"]
                    arr = np.broadcast_to(idx, self.prog.shapes[y])
                    arr = _arranged(arr, d.perm, (*d.gshape[:2], O))
                    if math.prod(self.prog.shapes[leaf]) == O and np.array_equal(
                            arr, np.broadcast_to(np.arange(O), arr.shape)):
                        d.roles["bias"] = leaf
                        continue
            keep.append(s)
        return keep


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
    specs, uncovered = _Analysis(prog, prog2, len(leaves), N, N2).specs()
    return prog, specs, uncovered, arrays


def _compile(prog: Program, specs: list[_Spec], jit: bool):
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
        hit = cache[key] = [model, plan, compiled, None]
        if len(cache) > backend._CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    _, plan, compiled, separate = hit
    if compiled is None:  # nothing recognised: every leaf takes the generic per-example VJP
        logits, _ = backend.linearize(model, params, inputs)
        return logits, LayerCapture([], names, None, None, 0, backend.batch_probes)
    prog, specs, uncovered, arrays = plan
    fwd, pull, pull_one = compiled
    logits, xs, pullback = fwd(leaves, [flat[k] for k in arrays])
    if separate is None:  # once per model and shape
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

    __module__ = "fisherlib.backends"


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
        return [Layer(s.kind, leaves, shapes, x, gs[k], layout=s.layout, num=s.num)
                for s, x, leaves, shapes, k in self.calls]
