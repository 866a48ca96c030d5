"""fisher() over the local JAX devices: batches sharded over a mesh, sums reduced across it."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterable, Sequence

import numpy as np

from ..estimators import FisherEstimate
from ..estimators import fisher as _fisher
from ..estimators._fisher import _batch_seed, _record

__all__ = ["jax_fisher"]

_AXIS = "batch"


def jax_fisher(model: Any, params: Any, batches: Any, *, stacked: bool = False,
               devices: Sequence[Any] | None = None, batch_indices: Iterable[int] | None = None,
               **kwargs: Any) -> FisherEstimate:
    r"""The Fisher estimate over batches sharded across JAX devices, the sums reduced across them.

    One compiled SPMD program (``jax.shard_map`` over a 1-D device mesh) runs
    :func:`fisherlib.fisher` on every device's batches at once, each device keeping its running
    sums; one reduction across the mesh at the end gives F̂ = Σ_d Σ_{b on d} F̂_b.

    Parameters
    ----------
    model, params
        A JAX model ``f(params, x)`` and its parameter pytree, as for :func:`fisherlib.fisher`.
    batches
        A sequence of batches (arrays or ``(inputs, labels)`` pairs), run D at a time (one per
        device; batch b on device b mod D). Or, with ``stacked=True``, the batches stacked into
        a ``jax.Array`` of shape (B, N, ...) (or a pair of them, inputs and labels), placed as
        you like (e.g. ``NamedSharding(mesh, P("batch"))``); B must be a multiple of D.
    stacked : bool
        Whether ``batches`` is the stacked form. Device d then runs batches
        [d·B/D, (d+1)·B/D) in one ``lax.scan``.
    devices
        The mesh's devices (default: ``jax.devices()``).
    batch_indices
        The global index of each batch (default 0, 1, ...): seeds come from (seed, index).
    **kwargs
        Every other argument of :func:`fisherlib.fisher` (``method``, ``probes``, ``seed``, ...).

    Returns
    -------
    FisherEstimate
        Equal to ``fisherlib.fisher(model, params, batches, ...)`` on one device, up to the
        rounding of the summation order: batch b's draws depend on (seed, b), not on its device.

    Notes
    -----
    Cost: one compilation per batch shape (then D batches per step, or B/D per device in one
    scan), and one cross-device sum of the estimate's size per call. Batches whose shape differs
    from the first one's (a short last batch), and the last ``len(batches) mod D``, run on the
    first device. The value checks of the logits that one-device runs make are skipped inside
    the compiled program, and labels cannot be searched for ``ignore_index`` there: pass
    ``ignore_index=None`` with labels (when none is ignored). One process: on many hosts, use :func:`fisherlib.distributed.fisher`
    or the map-reduce recipe of docs/distributed.md.
    """
    import jax

    for key in ("first_batch", "backend"):
        if key in kwargs:
            raise TypeError(f"{key}: not an argument of jax_fisher (see batch_indices)")
    be = _backend()
    seed = kwargs.get("seed", 0)
    devices = list(devices) if devices is not None else jax.devices()
    if not devices:
        raise ValueError("devices: expected at least one device")
    if stacked:
        xs, ys = batches if isinstance(batches, (tuple, list)) else (batches, None)
        if not isinstance(xs, jax.Array) or xs.ndim < 2:
            raise TypeError(f"batches: with stacked=True, expected a jax.Array of shape (B, N, ...) "
                            f"or a pair of them, got {type(xs).__name__}")
        groups, rest = [(xs, ys, _indices(batch_indices, xs.shape[0]))], []
        if xs.shape[0] % len(devices):
            raise ValueError(f"batches: {xs.shape[0]} stacked batches do not split over "
                             f"{len(devices)} devices")
    else:
        items = [batches] if hasattr(batches, "shape") else list(batches)
        groups, rest = _groups(items, _indices(batch_indices, len(items)), len(devices))
    if not groups and not rest:
        raise ValueError("batches: no batch was given")

    ests = []
    if rest:
        with jax.default_device(devices[0]):
            ests.append(_fisher(model, params, [b for b, _ in rest], batch_indices=[i for _, i in rest],
                                backend=be, **kwargs))
    if groups:
        ests.append(_sharded(model, params, groups, devices, be, seed, kwargs))
    out = ests[0]
    for e in ests[1:]:
        out = out.merge(e)
    return out


# --------------------------------------------------------------------------- helpers


def _backend():
    from .. import backends

    return backends.get("jax")


def _indices(batch_indices, n: int) -> list[int]:
    idx = list(range(n)) if batch_indices is None else [int(i) for i in batch_indices]
    if len(idx) != n:
        raise ValueError(f"batch_indices: expected one index per batch ({n}), got {len(idx)}")
    if len(set(idx)) != n or min(idx, default=0) < 0:
        raise ValueError("batch_indices: expected distinct non-negative integers")
    return idx


def _groups(items, idx, D):
    """Stack runs of D batches shaped like the first: [(xs, ys, indices)], and the rest."""
    import jax.numpy as jnp

    def shape(item):
        x, y = item if isinstance(item, (tuple, list)) else (item, None)
        return (tuple(x.shape), None if y is None else tuple(np.shape(y)))

    first = shape(items[0]) if items else None
    fit = [k for k, item in enumerate(items) if shape(item) == first]
    n_full = len(fit) - len(fit) % D
    full, rest = fit[:n_full], sorted(set(range(len(items))) - set(fit[:n_full]))
    groups = []
    for g in range(0, n_full, D):
        chunk = [items[k] for k in full[g:g + D]]
        pairs = isinstance(chunk[0], (tuple, list))
        xs = jnp.stack([c[0] if pairs else c for c in chunk])
        ys = jnp.stack([jnp.asarray(c[1]) for c in chunk]) if pairs else None
        groups.append((xs, ys, [idx[k] for k in full[g:g + D]]))
    return groups, [(items[k], idx[k]) for k in rest]


class _DrawWith:
    """The JAX backend with the seed of the one batch being traced (a traced integer)."""

    def __init__(self, be, seed):
        self._be, self._seed, self._used = be, seed, False

    def __getattr__(self, name):
        return getattr(self._be, name)

    def probes(self, seed, shape, dist, like):
        if self._used:  # one draw per batch: a second would repeat the first's key
            raise RuntimeError("jax_fisher: the estimator drew twice for one batch")
        self._used = True
        return self._be.probes(self._seed, shape, dist, like)


def _sharded(model, params, groups, devices, be, seed, kwargs) -> FisherEstimate:
    """The estimate over stacked groups, each (D·S, N, ...) split over the mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(devices), (_AXIS,))
    split, whole = NamedSharding(mesh, P(_AXIS)), NamedSharding(mesh, P())
    skeleton: list[FisherEstimate] = []

    def one(p, x, y, s):  # one batch on one device, its seed traced
        est = _fisher(model, p, [x if y is None else (x, y)], backend=_DrawWith(be, s), **kwargs)
        skeleton[:] = [est]
        return jnp.concatenate([jnp.ravel(v) for v in est.parts])

    def local(p, xs, ys, seeds):  # this device's batches: (S, N, ...)
        def step(acc, xys):
            x, y, s = xys
            return acc + one(p, x, y, s), None
        first = one(p, xs[0], None if ys is None else ys[0], seeds[0])
        if xs.shape[0] > 1:
            rest = (xs[1:], None if ys is None else ys[1:], seeds[1:])
            first, _ = jax.lax.scan(step, first, rest)
        return first[None, :]

    def program(has_labels):
        in_specs = (P(), P(_AXIS), P(_AXIS) if has_labels else None, P(_AXIS))
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(_AXIS),
                                     check_vma=False))

    params = jax.device_put(params, whole)
    acc, n_inputs, n_outputs, run = None, 0, 0, {}
    for xs, ys, idx in groups:
        seeds = np.asarray([_batch_seed(seed, b) for b in idx], dtype=np.uint32)
        key = ys is not None
        if key not in run:
            run[key] = program(key)
        args = [jax.device_put(xs, split), None if ys is None else jax.device_put(ys, split),
                jax.device_put(seeds, split)]
        try:
            out = run[key](params, *args)  # (D, L), row d on device d: no communication
        except jax.errors.ConcretizationTypeError as e:
            raise ValueError(
                "batches: fisher() needed a concrete value that the compiled multi-device program "
                "only has traced (with labels: whether they hold ignore_index; pass ignore_index=None "
                "when none is ignored), or run one fisher() per device and merge") from e
        acc = out if acc is None else acc + out
        n_inputs += skeleton[0].n_inputs * xs.shape[0]
        per_batch = skeleton[0].n_outputs  # a count from masks would be traced: unknown then
        n_outputs = n_outputs + per_batch * xs.shape[0] if isinstance(n_outputs, int) and isinstance(
            per_batch, int) else None
    total = _sum_rows(mesh)(acc)  # the one cross-device reduction, replicated
    total = next(t.data for t in total.addressable_shards if t.device == devices[0])
    est = skeleton[0]
    parts, at = [], 0
    for x in est.parts:
        size = math.prod(x.shape)
        parts.append(jnp.reshape(total[at:at + size], x.shape).astype(x.dtype))
        at += size
    draws = _record([i for _, _, idx in groups for i in idx], est.seed)
    tree = (lambda arrays: be.unflatten(params, arrays)) if est.structure == "diag" else None
    return replace(est, parts=parts, n_inputs=n_inputs, n_outputs=n_outputs, draws=draws, _tree=tree)


def _sum_rows(mesh):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    return jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=NamedSharding(mesh, P()))
