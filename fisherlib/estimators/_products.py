"""Per-probe contributions of pulled-back gradients, and the per-example driver.

Per-example methods (exact, empirical, ``per_example=True``) need Σ_n over inputs of squared
per-input products J_nᵀ u. Two routes give them, chosen per parameter leaf:

* **layer rules**, where the adapter offers ``layer_io`` and recognises the layer owning the
  leaf: one forward, one batched backward to every layer output, and the reductions of
  :mod:`fisherlib.core.layers` (no per-example gradient is formed for a dense diagonal);
* **the generic per-example VJP** (``per_example_vjp``, a ``vmap`` of whole-model VJPs) for
  every other leaf, in chunks of inputs.

Both give the same numbers to rounding; ``backends.get("torch", layer_io=False)`` forces the
generic route.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from ..core import cotangents
from ..core import layers as core_layers
from ..core._compat import array_namespace, device
from ..core._lib import widen
from . import _blocks
from ._batches import slice_tree

Array = Any

# Elements of per-example gradients (probes x inputs x parameters) held at once.
ELEMENTS = 1 << 24

# Cotangent entries (columns x every captured layer output) one chunk of exact columns pulls back:
# about a CPU's cache. A 10-class CNN's ten columns at once (3M entries) took twice as long on
# JAX as chunks of three, and 1.2x as long on torch (benchmarks/jax_compiled.py, docs/benchmarks.md).
COLUMN_ELEMENTS = 1 << 20


def forward(be, model, params, inputs):
    """(logits, capture) through the adapter's layer I/O, or None when it has none."""
    layer_io = getattr(be, "layer_io", None)
    if not callable(layer_io):
        return None
    return layer_io(model, params, inputs)


def column_chunks(z: Array, shape: tuple[int, ...], opts: dict, per_column: int) -> Iterator[Array]:
    """The exact method's cotangent columns, (m, *shape) at a time, never all C at once.

    ``shape`` is the logits' shape (N, ..., C); ``per_column`` the entries one column costs
    downstream (its cotangents at every captured layer). With positions (N, T, C) every output
    distribution needs its own columns: column (t, k) is the factor's column k at position t
    and zero elsewhere, so that per-example products never mix two outputs' terms.
    """
    xp = array_namespace(z)
    N, C = shape[0], shape[-1]
    T = math.prod(shape[1:-1])
    M, columns = cotangents.column_source(z, opts["likelihood"], opts["bound"], opts["rank"])
    step = max(1, min(M, COLUMN_ELEMENTS // max(1, per_column, z.shape[0] * C)))
    for t in range(T):
        at = xp.astype(xp.arange(T, device=device(z)) == t, z.dtype)[None, None, :, None] if T > 1 else None
        for k in range(0, M, step):
            cols = xp.reshape(columns(k, min(k + step, M)), (-1, N, T, C))
            yield xp.reshape(cols if at is None else cols * at, (cols.shape[0], *shape))


def exact_cotangents(z: Array, shape: tuple[int, ...], opts: dict, capture, structure: str) -> Iterator[Array]:
    """The exact method's cotangents: :func:`column_chunks`, or one column when that suffices.

    When every recognised layer's output is the logits themselves (a linear head on fixed
    features) and no leaf is uncovered, g = u for every column u, and a diagonal needs only
    Σ_k u_k² = diag of the kernel (``cotangents.exact_diagonal``): one column √diag gives it,
    whatever C (at C = 10⁴ the columns one by one take minutes). With positions (N, T, C) — a
    language model's output projection — the same holds once the capture records every
    position as its own input (``positions_as_inputs``, where the adapter offers it): the
    diagonal Σ_nt diag I(z_nt) ⊗ h_nt² in one matrix product, instead of C·T columns.
    """
    if (structure in ("diag", "trace") and capture is not None and getattr(capture, "logits_only", False)
            and not capture.uncovered and (len(shape) == 2 or hasattr(capture, "positions_as_inputs"))):
        xp = array_namespace(z)
        if len(shape) > 2:
            capture.positions_as_inputs = True
        d = cotangents.exact_diagonal(z, opts["likelihood"], opts["bound"], opts["rank"])
        return iter([xp.reshape(xp.sqrt(xp.clip(d, min=0.0)), (1, *shape))])
    return column_chunks(z, shape, opts, capture.elements if capture else 0)


def per_example(be, model, params, inputs, cts, capture, *, structure, plan, shapes, names, summed,
                chunk_size):
    """Σ_n of per-example contributions for every stack in ``cts`` (each (V, *logits.shape)).

    ``summed``: add the V rows (exact columns, empirical) instead of keeping one per probe.
    """
    total = None
    # Summed diagonals of unshared dense layers: Σ_v g² is added over column chunks and
    # multiplied by x² once at the end, instead of once per chunk.
    deferred: dict[int, Any] = {} if summed and structure in ("diag", "trace") else None
    layers = None
    for ct in cts:
        if capture is not None and capture.calls:
            layers = capture(ct)
            c = _by_layers(be, model, params, inputs, ct, capture, layers, structure, plan, shapes, names, summed,
                           chunk_size, deferred)
        else:
            c = _generic(be, model, params, inputs, ct, structure, plan, sum(map(math.prod, shapes)), summed,
                         chunk_size)
        total = c if total is None else [a + x for a, x in zip(total, c)]
    if deferred:
        index = {n: i for i, n in enumerate(names)}
        diag: list[Any] = [None] * len(names)
        for pos, g2 in deferred.items():
            for role, a in core_layers.diag_from_sums(layers[pos], g2).items():
                diag[index[layers[pos].leaves[role]]] = a
        xp = array_namespace(*total)
        extra = [a if a is not None else 0 for a in diag] if structure == "diag" else \
            [sum(xp.sum(xp.reshape(a, (1, -1)), axis=1) for a in diag if a is not None)]
        total = [t + e for t, e in zip(total, extra)]
    return total


def _by_layers(be, model, params, inputs, ct, capture, layers, structure, plan, shapes, names, summed, chunk_size,
               deferred):
    index = {n: i for i, n in enumerate(names)}
    uncovered = [index[n] for n in capture.uncovered]
    xp = array_namespace(ct)
    V = 1 if summed else ct.shape[0]
    if structure in ("diag", "trace"):
        diag: list[Array | None] = [None] * len(names)
        for pos, layer in enumerate(layers):
            g2 = core_layers.sums_squares(layer) if deferred is not None else None
            if g2 is not None:  # finished by per_example once every chunk is in
                deferred[pos] = g2 if pos not in deferred else deferred[pos] + g2
                continue
            for role, a in core_layers.diag(layer, sum_probes=summed).items():
                diag[index[layer.leaves[role]]] = a
        if uncovered:
            rest = _generic(be, model, params, inputs, ct, "diag", None, sum(map(math.prod, shapes)), summed,
                            chunk_size)
            for i in uncovered:
                diag[i] = rest[i]
        diag = [a if a is not None else _zeros(xp, ct, (V, *s)) for a, s in zip(diag, shapes)]
        if structure == "diag":
            return diag
        return [sum(xp.sum(xp.reshape(a, (V, -1)), axis=1) for a in diag)]
    # Blocks need whole per-example gradients: formed from the layers in chunks of inputs.
    n = ct.shape[1]
    P = sum(map(math.prod, shapes))
    step = chunk_size or max(1, ELEMENTS // max(1, ct.shape[0] * P))
    total = None
    for i in range(0, n, step):
        j = min(i + step, n)
        grads: list[Array | None] = [None] * len(names)
        for layer in layers:
            for role, a in core_layers.per_example_grads(layer, i, j).items():
                grads[index[layer.leaves[role]]] = a
        if uncovered:
            tree = be.per_example_vjp(model, params, slice_tree(inputs, i, j), ct[:, i:j, ...])
            rest = [g for _, g in be.leaves(tree)]
            for u in uncovered:
                grads[u] = rest[u]
        grads = [a if a is not None else _zeros(xp, ct, (ct.shape[0], j - i, *s)) for a, s in zip(grads, shapes)]
        c = accumulate(grads, structure, plan, sum_probes=summed)
        total = c if total is None else [a + x for a, x in zip(total, c)]
    return total


def _generic(be, model, params, inputs, ct, structure, plan, P, summed, chunk_size):
    """Per-example VJPs of the whole model, in chunks of inputs (and of rows when summed)."""
    K, n = ct.shape[0], ct.shape[1]
    chunk = chunk_size or max(1, ELEMENTS // max(1, K * P))
    # Summed rows (exact: K = C of them) are also split along K when even one input's K
    # gradients exceed the budget (at C = 1000 and P = 5e5 one input held 2 GB at once).
    kchunk = K if not summed or chunk_size else max(1, min(K, ELEMENTS // max(1, P)))
    total = None
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        for k in range(0, K, kchunk):
            tree = be.per_example_vjp(model, params, slice_tree(inputs, i, j), ct[k:k + kchunk, i:j, ...])
            grads = [g for _, g in be.leaves(tree)]
            c = accumulate(grads, structure, plan, sum_probes=summed)
            total = c if total is None else [a + x for a, x in zip(total, c)]
    return total


def accumulate(grads, structure, plan, *, sum_probes):
    """Per-probe contributions from gradients (K, M, *leaf): sum over the M rank-one terms."""
    xp = array_namespace(*grads)
    grads = [widen(g, xp=xp) for g in grads]
    if structure == "diag":
        out = [xp.sum(g * g, axis=1) for g in grads]
    elif structure == "sketch":
        out = [xp.sum(g, axis=1) for g in grads]
    elif structure == "trace":
        out = [sum(xp.sum(xp.reshape(g * g, (g.shape[0], -1)), axis=1) for g in grads)]
    else:
        out = []
        for blk in plan:
            u = xp.permute_dims(_blocks.vectors(blk, grads, xp=xp), (0, 2, 3, 1))  # (K, U, S, M)
            m = xp.matmul(u, xp.matrix_transpose(u))
            out.append(m[:, 0, ...] if blk.units == 1 else m)
    if sum_probes:
        out = [xp.sum(x, axis=0, keepdims=True) for x in out]
    return out


def _zeros(xp, like, shape):
    return xp.zeros(shape, dtype=widen(like, xp=xp).dtype, device=device(like))
