"""fisher() over a torch.distributed process group: every rank runs its shard, one all-reduce."""

from __future__ import annotations

import itertools
from collections import abc
import math
from dataclasses import replace
from typing import Any, Iterable, Iterator

import numpy as np

from ..estimators import FisherEstimate
from ..estimators import fisher as _fisher
from ..estimators._estimate import _META, _join_draws, _to_numpy
from ..estimators._kfac import KroneckerBlock
from ..estimators._kronecker import _META as _KRONECKER_META
from ..estimators._kronecker import KroneckerEstimate

__all__ = ["Shard", "fisher", "shard"]

# Options every rank must share, or the all-reduce would add unlike things.
_SAME = ("method", "structure", "setting", "likelihood", "bound", "rank", "reduction", "n_probes", "per_example",
         "dist", "seed", "names")


def shard(batches: Iterable[Any], group: Any = None) -> "Shard":
    """This rank's batches of a stream that every rank can read: batches r, r + W, r + 2W, ...

    The strided rule of :func:`fisher`: rank r of W takes global batches b with b mod W = r, so
    that a stream of unknown length is split without a first pass, and shards differ by at
    most one batch. Every rank still iterates the whole stream (skipping others' batches);
    for large data, let each rank load only its own batches and pass their global indices.

    Returns
    -------
    Shard
        An iterable, not an iterator: each ``for`` loop over it (each epoch, each call of
        :func:`fisher`) starts again from the first batch of the shard, as long as ``batches``
        can be iterated again (a list, a ``DataLoader``). Over a one-shot iterator (a
        generator), a second pass raises a ValueError instead of giving no batch.
    """
    dist = _dist()
    return Shard(batches, dist.get_rank(group), dist.get_world_size(group))


class Shard:
    """Batches r, r + W, r + 2W, ... of ``batches``, re-iterable (see :func:`shard`)."""

    def __init__(self, batches: Iterable[Any], rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world
        self._one_shot = isinstance(batches, abc.Iterator)
        self._passes = 0

    def __iter__(self) -> Iterator[Any]:
        if self._one_shot and self._passes:
            raise ValueError("batches: shard() was given a one-shot iterator (a generator), and its "
                             "first pass consumed it; pass a list or a DataLoader to iterate the "
                             "shard again")
        self._passes += 1
        return itertools.islice(iter(self.batches), self.rank, None, self.world)

    def __len__(self) -> int:
        n = len(self.batches)  # TypeError for a stream without a length
        return len(range(self.rank, n, self.world))

    def __repr__(self) -> str:
        return f"<Shard rank {self.rank} of {self.world}: batches {self.rank}, {self.rank + self.world}, ...>"


def fisher(model: Any, params: Any, batches: Iterable[Any], *, group: Any = None, dst: int | None = None,
           batch_indices: Iterable[int] | None = None, **kwargs: Any) -> FisherEstimate | None:
    r"""The Fisher estimate over the union of every rank's batches, on every rank (or on ``dst``).

    Call it on every rank of the process group, each with its own batches. Each rank runs
    :func:`fisherlib.fisher` over its shard; the partial sums of all ranks are then added by
    one all-reduce (one flat buffer, whatever the number of batches and parameter leaves):
    F̂ = Σ_ranks Σ_{b ∈ shard} F̂_b.

    Parameters
    ----------
    model, params
        As for :func:`fisherlib.fisher`. A ``DistributedDataParallel`` model is unwrapped
        (``.module``): the Fisher needs no gradient synchronization.
    batches
        This rank's batches. By default, local batch j of rank r is global batch r + j·W (W
        ranks): the strided rule of :func:`shard`, which makes the union the single-process
        stream in its order.
    group
        The process group (default: the world). Gloo on CPU; NCCL with CUDA models (set each
        rank's device, ``torch.cuda.set_device``, first).
    dst
        None: every rank gets the estimate (all-reduce). A global rank: only ``dst`` gets it
        (reduce) and the others get None.
    batch_indices
        The global index of each local batch, when the shards follow another rule (e.g.
        contiguous blocks: ``range(start, stop)``). Indices must be distinct across ranks.
    **kwargs
        Every other argument of :func:`fisherlib.fisher` (``method``, ``structure``, ``probes``,
        ``seed``, ...), the same on every rank.

    Returns
    -------
    FisherEstimate or None
        The estimate over all ranks' inputs, with their draws (:attr:`FisherEstimate.draws`).

    Notes
    -----
    Random draws depend on (seed, global batch index), never on the rank, so the result equals
    a single-process ``fisherlib.fisher(model, params, all_batches, ...)``: exactly, up to the
    rounding of a different summation order, for every method. Cost: the local estimate, one
    ``all_gather_object`` of a few hundred bytes of metadata (to agree on options, batch
    records and errors: a rank that fails makes every rank raise instead of hanging), and one
    all-reduce of the estimate's size (P floats for a diagonal, K·P with K probes). A rank
    with no batch contributes zeros.
    """
    dist = _dist()
    if "first_batch" in kwargs:
        raise TypeError("first_batch: not an argument of the distributed fisher (ranks' batches are "
                        "placed by the strided rule or by batch_indices)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    index = itertools.count(rank, world) if batch_indices is None else batch_indices
    counted = _Counted(batches)
    local, error = None, None
    try:
        local = _fisher(_unwrap(model), params, counted, batch_indices=index, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported to every rank below, then raised
        empty = counted.n == 0 and isinstance(e, ValueError) and "no batch" in str(e)
        if not empty:
            error = e
    metas: list[Any] = [None] * world
    dist.all_gather_object(metas, _describe(local, error), group=group)
    if error is not None:
        raise error
    failed = [(r, m["error"]) for r, m in enumerate(metas) if m["error"]]
    if failed:
        raise RuntimeError("; ".join(f"rank {r} failed: {msg}" for r, msg in failed))
    ref = next((m for m in metas if m["n_inputs"]), None)
    if ref is None:
        raise ValueError("batches: no rank was given a batch")
    for r, m in enumerate(metas):
        for key in _SAME:
            if m["n_inputs"] and m["est"].get(key) != ref["est"].get(key):
                raise ValueError(f"ranks disagree on {key}: {ref['est'][key]!r} and {m['est'][key]!r} "
                                 f"(rank {r}); call fisher with the same options on every rank")
    draws: tuple = ()
    for m in metas:
        draws = _join_draws(draws, m["draws"])  # overlapping batch_indices raise here, on all ranks

    buf = _flatten(local, ref, dist.get_backend(group))
    if dst is None:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    else:
        dist.reduce(buf, dst=dst, op=dist.ReduceOp.SUM, group=group)
        if dist.get_rank() != dst:
            return None
    n_inputs = sum(m["n_inputs"] for m in metas)
    outs = [m["est"]["n_outputs"] for m in metas if m["n_inputs"]]
    n_outputs = None if None in outs else sum(outs)
    if local is None and ref.get("kronecker"):  # no batch here: K-FAC blocks from another rank's description
        lay = ref["kronecker"]
        local = KroneckerEstimate(names=ref["est"]["names"], shapes=[tuple(s) for s in lay["shapes"]],
                                  blocks=[KroneckerBlock.from_dict(b) for b in lay["blocks"]],
                                  fallback=lay["fallback"], basis=lay["basis"],
                                  parts=[np.zeros(s, ref["dtype"]) for s in ref["shapes"]],
                                  **{k: ref["est"][k] for k in _KRONECKER_META})
    if local is None:  # this rank had no batch: an estimate from another rank's description
        local = FisherEstimate(names=ref["est"]["names"], parts=[np.zeros(s, ref["dtype"]) for s in ref["shapes"]],
                               **{k: ref["est"][k] for k in _META if k != "names"},
                               block_shapes=ref["block_shapes"])
    return replace(local, parts=_unflatten(buf, local.parts), n_inputs=n_inputs, n_outputs=n_outputs,
                   draws=draws)


# --------------------------------------------------------------------------- helpers


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: torch.distributed has no process group; call "
                           "torch.distributed.init_process_group on every rank first")
    return dist


def _unwrap(model):
    """The module inside DistributedDataParallel (or DataParallel)."""
    from torch import nn

    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class _Counted:
    """Iterate batches, counting them (an empty shard is not an error here)."""

    def __init__(self, batches):
        self.batches, self.n = batches, 0

    def __iter__(self):
        batches = self.batches
        if hasattr(batches, "shape") and hasattr(batches, "dtype"):  # one array: one batch
            batches = [batches]
        for item in batches:
            self.n += 1
            yield item


def _describe(est, error) -> dict:
    if error is not None:
        return {"error": f"{type(error).__name__}: {error}", "n_inputs": 0, "draws": ()}
    if est is None:
        return {"error": None, "n_inputs": 0, "draws": ()}
    kron = isinstance(est, KroneckerEstimate)
    out = {"error": None, "n_inputs": est.n_inputs, "draws": est.draws,
           "est": {**{k: getattr(est, k) for k in (_KRONECKER_META if kron else _META)}, "names": est.names},
           "block_shapes": getattr(est, "block_shapes", {}), "shapes": [tuple(x.shape) for x in est.parts],
           "dtype": str(est.parts[0].dtype).replace("torch.", "")}
    if kron:  # what a rank without batches needs to hold the same blocks
        basis = None if est.basis is None else [[None if q is None else _to_numpy(q) for q in pair]
                                                for pair in est.basis]
        out["kronecker"] = {"shapes": [list(s) for s in est.shapes], "blocks": [b.to_dict() for b in est.blocks],
                            "fallback": list(est.fallback), "basis": basis}
    return out


def _flatten(est, ref, backend: str):
    """All parts in one 1-D tensor on the collective's device (CUDA for NCCL, else CPU)."""
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    if est is None:
        size = sum(math.prod(s) for s in ref["shapes"])
        return torch.zeros(size, dtype=getattr(torch, ref["dtype"]), device=device)
    flat = [x if isinstance(x, torch.Tensor) else torch.as_tensor(_to_numpy(x)) for x in est.parts]
    return torch.cat([x.reshape(-1) for x in flat]).to(device)


def _unflatten(buf, like: list) -> list:
    """Split ``buf`` into arrays shaped, typed and placed like ``like``."""
    import torch

    out, at = [], 0
    for x in like:
        size = math.prod(x.shape)
        piece = buf[at:at + size].reshape(tuple(x.shape))
        at += size
        if isinstance(x, torch.Tensor):
            out.append(piece.to(device=x.device, dtype=x.dtype))
        elif type(x).__module__.startswith("numpy"):
            out.append(piece.cpu().numpy().astype(x.dtype, copy=False))
        else:  # another framework's array (JAX, CuPy): through NumPy, into its namespace
            from ..estimators._estimate import _like

            out.append(_like(piece.cpu().numpy(), x))
    return out
