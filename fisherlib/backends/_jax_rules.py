"""The layer rules of :mod:`fisherlib.backends.jax_layers`, applied to a traced program.

For every parameter leaf: its uses through views (with the index arrays saying where each of
its elements lands), and for a leaf with one use, the rule that matches it, as a :class:`Spec`
holding the variable to perturb, the variable captured as the layer input, and the static
transposes and reshapes that put x and g in the canonical shapes of
:mod:`fisherlib.core.layers`. Kernel layouts are matched by trying axis orders on the index
arrays (concrete NumPy arrays), so any stored layout that is a plain (O, I) or (I, O) matrix
after some ordering of its axes is recognised.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ._jax_rows import batch_axes
from ._jaxpr import VIEWS, Program, arange_like, view_index

__all__ = ["Analysis", "Spec"]

_PERMS = 720  # the most axis orders tried when matching a kernel's layout


class Spec:
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


class Analysis:
    """The rules applied to one traced program (see the module docstring)."""

    def __init__(self, prog: Program, prog2: Program, n_leaves: int, N: int, N2: int):
        self.prog, self.n_leaves, self.N = prog, n_leaves, N
        self.alive = prog.live()
        self.cons = prog.consumers(self.alive)
        self.outs = {r for r in prog.outs if isinstance(r, int)}
        self.batch = batch_axes(prog, prog2, N, N2)  # -1: depends on the batch in a way no rule takes
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

    def match(self, leaf: int, use) -> Spec | None:
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
        return Spec("dense", {"weight": leaf}, node.outs[0], a, canon_x, perm, (self.N, n_s, 1, O), layout)

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
        return Spec("dense", {"weight": leaf}, node.outs[0], a, canon_x, perm, (N, L, G, O // G), layout)

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

        return Spec("scale_shift", {"scale": leaf}, node.outs[0], a, canon_x, perm, shape, coefs=coefs)

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
        spec = Spec("scale_shift", {"shift": leaf}, node.outs[0], None, lambda *_: jnp.zeros(shape, dtype), perm,
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
        return Spec("embedding", {"weight": leaf}, y, ind, canon_x, perm, (N, n_s, table[1]), num=num)

    def specs(self) -> tuple[list[Spec], list[int]]:
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
