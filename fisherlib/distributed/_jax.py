"""fisher() over the local JAX devices: batches spread over devices, sums reduced across them."""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Iterable, Sequence

from ..estimators import FisherEstimate
from ..estimators import fisher as _fisher
from ..estimators._estimate import _join_draws

__all__ = ["jax_fisher"]


def jax_fisher(model: Any, params: Any, batches: Any, *, stacked: bool = False,
               devices: Sequence[Any] | None = None, batch_indices: Iterable[int] | None = None,
               **kwargs: Any) -> FisherEstimate:
    r"""The Fisher estimate over batches spread over JAX devices, the sums reduced across them.

    Each device d runs :func:`fisherlib.fisher` over its batches (with a replica of ``params``),
    all devices at once (one host thread each, JAX computes asynchronously); the partial sums
    are then joined into one array sharded over a device mesh (``NamedSharding``, one flat
    buffer per device) and summed across devices by one compiled reduction (an all-reduce):
    F̂ = Σ_d Σ_{b on d} F̂_b.

    Parameters
    ----------
    model, params
        A JAX model ``f(params, x)`` and its parameter pytree, as for :func:`fisherlib.fisher`.
    batches
        Either a sequence of batches (arrays or ``(inputs, labels)`` pairs), batch b going to
        device b mod D (the strided rule of :func:`fisherlib.distributed.fisher`); or, with
        ``stacked=True``, batches stacked into a ``jax.Array`` of shape (B, N, ...) (or a pair
        of them, inputs and labels) whose leading axis is sharded over devices, e.g. with
        ``NamedSharding(mesh, P("batch"))``: each device runs the batches it holds, where they
        lie.
    stacked : bool
        Whether ``batches`` is the stacked, sharded form.
    devices
        The devices of the sequence form (default: ``jax.local_devices()``).
    batch_indices
        The global index of each batch (default 0, 1, ...; stacked form: the position along
        the leading axis).
    **kwargs
        Every other argument of :func:`fisherlib.fisher` (``method``, ``probes``, ``seed``, ...).

    Returns
    -------
    FisherEstimate
        On the first device, equal to ``fisherlib.fisher(model, params, batches, ...)`` on one
        device: the draws of batch b depend on (seed, b), not on its device.

    Notes
    -----
    Cost: D concurrent runs of B/D batches, one device-to-mesh assembly without copies, and one
    reduction of the estimate's size. One process: on many hosts, use the torch.distributed
    function or the map-reduce recipe of docs/distributed.md.
    """
    import jax

    if "first_batch" in kwargs:
        raise TypeError("first_batch: pass batch_indices (one global index per batch) instead")
    kwargs.setdefault("backend", "jax")
    work = (_from_shards(params, batches, batch_indices) if stacked
            else _placed(params, batches, devices, batch_indices))  # [(device, params, batches, indices)]

    def run(job):
        device, p, bs, idx = job
        if not bs:
            return None
        with jax.default_device(device):  # arrays the estimator creates land with the batches
            return _fisher(model, p, bs, batch_indices=idx, **kwargs)

    if len(work) == 1:
        results = [run(work[0])]
    else:
        with ThreadPoolExecutor(len(work)) as pool:
            results = list(pool.map(run, work))
    ests = [e for e in results if e is not None]
    if not ests:
        raise ValueError("batches: no batch was given")
    summed = _reduce([e.parts if e is not None else None for e in results], [job[0] for job in work])
    draws: tuple = ()
    for e in ests:
        draws = _join_draws(draws, e.draws)
    return replace(ests[0], parts=summed, n_inputs=sum(e.n_inputs for e in ests), draws=draws)


def _placed(params, batches, devices, batch_indices):
    """Per device: (device, params replica, its batches, their global indices)."""
    import jax

    if hasattr(batches, "shape"):
        batches = [batches]
    batches = list(batches)
    devices = list(devices) if devices is not None else jax.local_devices()
    if not devices:
        raise ValueError("devices: expected at least one device")
    indices = list(range(len(batches))) if batch_indices is None else list(batch_indices)
    if len(indices) != len(batches):
        raise ValueError(f"batch_indices: expected one index per batch ({len(batches)}), got {len(indices)}")
    jobs = []
    for d, device in enumerate(devices):
        mine = list(range(d, len(batches), len(devices)))
        put = [jax.device_put(batches[j], device) for j in mine]
        jobs.append((device, jax.device_put(params, device), put, [indices[j] for j in mine]))
    return jobs


def _from_shards(params, batches, batch_indices):
    """Jobs from a (B, N, ...) array sharded along B: each device's own batches, each once."""
    import jax

    xs, ys = batches if isinstance(batches, (tuple, list)) else (batches, None)
    if not isinstance(xs, jax.Array) or xs.ndim < 2:
        raise TypeError(f"batches: with stacked=True, expected a jax.Array of shape (B, N, ...) or a "
                        f"pair of them, got {type(xs).__name__}")
    if not xs.is_fully_addressable:
        raise ValueError("batches: the array spans several processes; run one call per process "
                         "and merge (docs/distributed.md)")
    if batch_indices is not None:
        raise ValueError("batch_indices: stacked batches take their indices from their position")
    labels = {s.device: s for s in ys.addressable_shards} if ys is not None else {}
    taken: set[int] = set()
    jobs = []
    for s in sorted(xs.addressable_shards, key=lambda s: s.device.id):
        rows = range(*s.index[0].indices(xs.shape[0])) if s.index else range(xs.shape[0])
        new = [i for i, b in enumerate(rows) if b not in taken]  # replicated slices: once
        taken.update(rows[i] for i in new)
        x = s.data
        y = labels[s.device].data if ys is not None else None
        bs = [x[i] if y is None else (x[i], y[i]) for i in new]
        jobs.append((s.device, jax.device_put(params, s.device), bs, [rows[i] for i in new]))
    return jobs


def _reduce(parts_per_device: list, devices: list) -> list:
    """Σ over devices of each part, through one (D, L) array sharded over a device mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    like = next(p for p in parts_per_device if p is not None)
    if len(devices) == 1:
        return like
    sizes = [math.prod(x.shape) for x in like]
    dtype = jnp.result_type(*like)
    bufs = []
    for parts, device in zip(parts_per_device, devices):
        if parts is None:
            buf = jax.device_put(jnp.zeros(sum(sizes), dtype), device)
        else:
            buf = jnp.concatenate([jnp.ravel(x).astype(dtype) for x in parts])
        bufs.append(buf[None, :])
    mesh = Mesh(devices, ("devices",))
    stacked = jax.make_array_from_single_device_arrays(
        (len(devices), sum(sizes)), NamedSharding(mesh, PartitionSpec("devices")), bufs)
    total = _sum_over_devices(mesh)(stacked)
    first = total.addressable_shards[0].data  # replicated: every device holds the sum
    out, at = [], 0
    for x, size in zip(like, sizes):
        out.append(first[at:at + size].reshape(x.shape).astype(x.dtype))
        at += size
    return out


@functools.lru_cache(maxsize=8)
def _sum_over_devices(mesh):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))
