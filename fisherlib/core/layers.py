"""Per-example products from a layer's input and its output cotangents, without per-example VJPs.

An adapter that recognises a layer captures, from ONE forward and ONE batched backward, the
layer's input x and the cotangents g = ∂⟨u_v, z⟩/∂y at its output y for a stack of V logit
cotangents u_v. The gradient of ⟨u_v, z_n⟩ with respect to the layer's parameters, for input n
alone, is then a small product of x_n and g_{v,n}; this module forms the Fisher's reductions of
those products (square sums for the diagonal, per-example gradients for blocks) directly from
(x, g), as BackPACK, nngeometry and ASDL do, with no framework code:

===============  ==========================  ===========================================
kind             captured                    per-example gradient of (v, n)
===============  ==========================  ===========================================
dense            x (N, S, G, I)              weight[g] = Σ_s g[v,n,s,g]ᵀ x[n,s,g] (O × I)
                 g (V, N, S, G, O)           bias[g] = Σ_s g[v,n,s,g]
embedding        x (N, S) integer rows       weight[r] = Σ_{s: x[n,s] = r} g[v,n,s]
                 g (V, N, S, D)
scale_shift      x (N, S, C) normalised x̂   scale = Σ_s g[v,n,s] ⊙ x̂[n,s], shift = Σ_s g[v,n,s]
                 g (V, N, S, C)
===============  ==========================  ===========================================

S counts the positions that share the weights (sequence positions, convolution patches, the
pixels of a normalised feature map; S = 1 for a plain dense layer) and G the groups of a grouped
convolution (G = 1 otherwise). A convolution is a dense layer over its unfolded input patches.

Cost. With S = 1 the diagonal of a dense weight is Σ_n (Σ_v g²)ᵀ x², one (O × N)·(N × I)
matrix product per group, and no per-example gradient is formed. With S > 1 the per-example
gradients are formed in chunks of at most ``_ELEMENTS`` entries and squared, which is what any
exact method must do once positions share a weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ._compat import array_namespace, device
from ._lib import widen

Array = Any

__all__ = ["KINDS", "Layer", "diag", "diag_from_sums", "per_example_grads", "sums_squares"]

KINDS = ("dense", "embedding", "scale_shift")

# Entries of per-example gradients (or of one-hot scatter matrices) formed at once.
_ELEMENTS = 1 << 24


@dataclass
class Layer:
    """What an adapter captured for one layer (see the module docstring for the shapes).

    Attributes
    ----------
    kind : {"dense", "embedding", "scale_shift"}
    leaves : dict
        Role ("weight", "bias", "scale", "shift") to the name of the parameter leaf it is.
    shapes : dict
        Role to the leaf's shape; results are reshaped to it.
    x, g : arrays
        The layer's input and its output cotangents, in the canonical shapes above.
    layout : {"oi", "io"}
        Dense weights: stored (O, I...) as torch does, or (I..., O) as JAX kernels are.
    num : int
        Embedding: the number of rows of the table.
    padding : int or None
        Embedding: a row whose gradient is always zero (torch's ``padding_idx``).
    scan : callable or None
        The adapter's loop over the inputs, ``scan(step, init, arrays) -> acc`` with
        ``acc = step(acc, *[a[n] for a in arrays])`` for n along the arrays' first axis (JAX:
        ``jax.lax.scan``). Given, a shared-position dense layer's diagonal is formed one input at
        a time, each input's gradients by one 2-D matrix product: a compiled batched product of
        many small matrices was 5× slower on a CPU. None: chunks of inputs, batched products.
    add_rows : callable or None
        The adapter's scatter-add, ``add_rows(values, rows, num)``: a (V, num, D) table of zeros
        with ``values[:, k]`` added at row ``rows[k]`` (JAX: ``.at[].add``). Given, an embedding's
        diagonal goes into the table in one pass over the positions, which traces under
        ``jax.jit``; None: the rows present (``unique_values``, whose length depends on the
        values) and a one-hot product, as the Array API allows.
    """

    kind: str
    leaves: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    x: Array
    g: Array
    layout: str = "oi"
    num: int = 0
    padding: int | None = None
    scan: Callable | None = None
    add_rows: Callable | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")


def diag(layer: Layer, *, sum_probes: bool) -> dict[str, Array]:
    """Σ_n (per-example gradient)², per role: arrays (V, *leaf) or (1, *leaf) with ``sum_probes``.

    Exact for every kind; for a dense layer without shared positions it is the matrix product
    (Σ_v g²)ᵀ x² (or one per probe), never forming a per-example gradient.
    """
    xp = array_namespace(layer.g)
    x, g = widen(layer.x, xp=xp), widen(layer.g, xp=xp)
    if layer.kind == "dense" and g.shape[2] == 1:
        out = _dense_diag_unshared(layer, x, g, sum_probes, xp=xp)
    elif layer.kind == "embedding":
        out = _embedding_diag(layer, g, sum_probes, xp=xp)
    elif layer.kind == "dense" and layer.scan is not None:
        out = _dense_diag_scan(layer, x, g, sum_probes, xp=xp)
    else:  # shared positions: per-example gradients in chunks of inputs, squared
        out = {}
        for i, j in _chunks(layer):
            grads = _per_example(layer, x, g, i, j, xp=xp)
            for role, gr in grads.items():
                sq = xp.sum(gr * gr, axis=1)
                sq = xp.sum(sq, axis=0, keepdims=True) if sum_probes else sq
                out[role] = sq if role not in out else out[role] + sq
    return {role: _to_leaf(layer, role, a, xp=xp) for role, a in out.items()}


def per_example_grads(layer: Layer, start: int, stop: int) -> dict[str, Array]:
    """The per-example gradients of inputs ``start:stop``, per role: (V, stop - start, *leaf)."""
    xp = array_namespace(layer.g)
    x, g = widen(layer.x, xp=xp), widen(layer.g, xp=xp)
    if layer.kind == "embedding":
        grads = {"weight": _embedding_grads(layer, g[:, start:stop, ...], x[start:stop, ...], xp=xp)}
    else:
        grads = _per_example(layer, x, g, start, stop, xp=xp)
    return {role: _to_leaf(layer, role, a, xp=xp) for role, a in grads.items()}


def chunk_inputs(layer: Layer) -> int:
    """How many inputs' per-example gradients fit in ``_ELEMENTS`` entries."""
    V = layer.g.shape[0]
    per_input = V * sum(math.prod(s) for s in layer.shapes.values())
    if layer.kind == "embedding":
        per_input += layer.x.shape[1] * layer.num  # its one-hot scatter matrix
    return max(1, _ELEMENTS // max(1, per_input))


# --------------------------------------------------------------------------- dense / scale-shift


def sums_squares(layer: Layer) -> Array | None:
    """Σ_v g² (1, N, G, O) of a dense layer without shared positions; None for other layers.

    The exact diagonal of such a layer is (Σ_v g²)ᵀ x² (:func:`diag_from_sums`), so a caller
    going through the C exact columns in chunks adds these up and multiplies by x² once.
    """
    if layer.kind != "dense" or layer.g.shape[2] != 1:
        return None
    xp = array_namespace(layer.g)
    g = widen(layer.g, xp=xp)[:, :, 0, ...]
    return xp.sum(g * g, axis=0, keepdims=True)


def diag_from_sums(layer: Layer, g2: Array) -> dict[str, Array]:
    """The diagonal (1, *leaf) of a dense layer from its (accumulated) :func:`sums_squares`."""
    xp = array_namespace(g2)
    out = _dense_diag_from_g2(layer, widen(layer.x, xp=xp), g2, xp=xp)
    return {role: _to_leaf(layer, role, a, xp=xp) for role, a in out.items()}


def _dense_diag_unshared(layer, x, g, sum_probes, *, xp):
    g2 = g[:, :, 0, ...] ** 2  # (V, N, G, O)
    if sum_probes:
        g2 = xp.sum(g2, axis=0, keepdims=True)
    return _dense_diag_from_g2(layer, x, g2, xp=xp)


def _dense_diag_from_g2(layer, x, g2, *, xp):
    out = {}
    if "weight" in layer.leaves:
        x2 = xp.permute_dims(x[:, 0, ...] ** 2, (1, 0, 2))  # (G, N, I)
        # (V, G, O, N) @ (G, N, I) -> (V, G, O, I)
        out["weight"] = xp.matmul(xp.permute_dims(g2, (0, 2, 3, 1)), x2[None, ...])
    if "bias" in layer.leaves:
        out["bias"] = xp.sum(g2, axis=1)  # (V, G, O)
    return out


def _dense_diag_scan(layer, x, g, sum_probes, *, xp):
    """:func:`diag` of a shared-position dense layer through the adapter's ``scan`` over inputs:
    input n's weight gradients for all V cotangents as one (V·O × S) @ (S × I) product per group,
    squared into the running sum (no per-example gradients stored)."""
    V, N, S, G, O = g.shape
    out = {}
    if "weight" in layer.leaves:
        I = x.shape[-1]
        gt = xp.reshape(xp.permute_dims(g, (1, 3, 0, 4, 2)), (N, G, V * O, S))
        xt = xp.permute_dims(x, (0, 2, 1, 3))  # (N, G, S, I)
        lead = 1 if sum_probes else V

        def step(acc, gn, xn):
            r = xp.matmul(gn[0, ...], xn[0, ...])[None, ...] if G == 1 else xp.matmul(gn, xn)  # (G, V·O, I)
            r = xp.reshape(r, (G, V, O, I))
            r = r * r
            return acc + (xp.sum(r, axis=1, keepdims=True) if sum_probes else r)

        acc = layer.scan(step, xp.zeros((G, lead, O, I), dtype=g.dtype, device=device(g)), (gt, xt))
        out["weight"] = xp.permute_dims(acc, (1, 0, 2, 3))  # (lead, G, O, I)
    if "bias" in layer.leaves:
        b = xp.sum(g, axis=2)  # (V, N, G, O)
        b = xp.sum(b * b, axis=1)
        out["bias"] = xp.sum(b, axis=0, keepdims=True) if sum_probes else b
    return out


def _per_example(layer, x, g, i, j, *, xp):
    """Per-example gradients (V, j - i, ...) of a dense or scale-shift layer, in core layout."""
    g = g[:, i:j, ...]
    x = x[i:j, ...]
    out = {}
    if layer.kind == "dense":
        if "weight" in layer.leaves:
            # (V, n, G, O, S) @ (n, G, S, I) -> (V, n, G, O, I)
            gt = xp.permute_dims(g, (0, 1, 3, 4, 2))
            xt = xp.permute_dims(x, (0, 2, 1, 3))
            out["weight"] = xp.matmul(gt, xt[None, ...])
        if "bias" in layer.leaves:
            out["bias"] = xp.sum(g, axis=2)  # (V, n, G, O)
    else:  # scale_shift
        if "scale" in layer.leaves:
            out["scale"] = xp.sum(g * x[None, ...], axis=2)  # (V, n, C)
        if "shift" in layer.leaves:
            out["shift"] = xp.sum(g, axis=2)
    return out


# --------------------------------------------------------------------------- embedding


def _embedding_diag(layer, g, sum_probes, *, xp):
    """Σ_n (Σ_{s: x[n,s] = r} g[v,n,s])² for every row r, through the rows present in the batch.

    For each input the square of a row's sum is Σ_s g_s · (Σ_{s' same row} g_s'), so each
    position contributes g_s · h_s with h = E g (E[s, s'] = 1 where the rows agree); the
    contributions are then added per row: by the adapter's ``add_rows`` where it has one, else
    with a one-hot product over the distinct rows present (the Array API has no scatter-add)
    placed into the table.
    """
    idx = layer.x
    V, N, S, D = g.shape
    g = _mask_padding(layer, idx, g, xp=xp)
    same = xp.astype(idx[:, :, None] == idx[:, None, :], g.dtype)  # (N, S, S)
    c = g * xp.matmul(same[None, ...], g)  # (V, N, S, D)
    if sum_probes:
        c = xp.sum(c, axis=0, keepdims=True)
    flat = xp.reshape(idx, (-1,))
    c = xp.reshape(c, (c.shape[0], N * S, D))
    if layer.add_rows is not None:
        return {"weight": layer.add_rows(c, flat, layer.num)}
    rows = xp.unique_values(flat)
    step = max(1, _ELEMENTS // max(1, rows.shape[0]))
    total = None
    for a in range(0, N * S, step):
        b = min(a + step, N * S)
        onehot = xp.astype(rows[:, None] == flat[None, a:b], g.dtype)  # (U, chunk)
        part = xp.matmul(onehot[None, ...], c[:, a:b, :])  # (V', U, D)
        total = part if total is None else total + part
    return {"weight": _place_rows(total, rows, layer.num, xp=xp)}


def _embedding_grads(layer, g, idx, *, xp):
    """Per-example gradients (V, n, num, D) of an embedding table (for small tables and blocks)."""
    g = _mask_padding(layer, idx, g, xp=xp)
    table = xp.arange(layer.num, device=device(idx))
    onehot = xp.astype(table[None, :, None] == idx[:, None, :], g.dtype)  # (n, num, S)
    return xp.matmul(onehot[None, ...], g)


def _mask_padding(layer, idx, g, *, xp):
    if layer.padding is None:
        return g
    keep = xp.astype(idx != layer.padding, g.dtype)
    return g * keep[None, :, :, None]


def _place_rows(values, rows, num, *, xp):
    """A (V, num, D) table holding ``values[:, k]`` at row ``rows[k]`` (sorted) and 0 elsewhere."""
    table = xp.arange(num, dtype=rows.dtype, device=device(rows))
    at = xp.clip(xp.searchsorted(rows, table), max=rows.shape[0] - 1)
    hit = xp.take(rows, at) == table
    placed = xp.take(values, at, axis=1)
    return xp.where(hit[None, :, None], placed, xp.zeros_like(placed))


# --------------------------------------------------------------------------- helpers


def _chunks(layer):
    n = layer.g.shape[1]
    step = chunk_inputs(layer)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _to_leaf(layer, role, a, *, xp):
    """Core layout (lead, G, O, I) / (lead, G, O) / (lead, C) -> (lead, *leaf shape)."""
    lead = a.shape[: a.ndim - _core_ndim(layer, role)]
    shape = layer.shapes[role]
    if layer.kind == "dense" and role == "weight":
        a = xp.reshape(a, (*lead, a.shape[-3] * a.shape[-2], a.shape[-1]))  # (G·O, I)
        if layer.layout == "io":
            a = xp.matrix_transpose(a)  # (I, O): the kernel's own order
    return xp.reshape(a, (*lead, *shape))


def _core_ndim(layer, role):
    if layer.kind == "dense":
        return 3 if role == "weight" else 2
    if layer.kind == "embedding":
        return 2
    return 1
