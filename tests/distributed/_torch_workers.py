"""Worker of tests/distributed/test_torch_distributed.py: runs on every rank of a gloo group."""

from __future__ import annotations

import os
import sys

N_BATCHES, B, D, H, C = 7, 3, 4, 6, 3


def data():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)).double()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(N_BATCHES)]
    ys = [torch.randint(0, C, (B,), generator=g) for _ in range(N_BATCHES)]
    return model, xs, ys


# name -> (fisher kwargs, batches as pairs?)
CASES = {
    "hutchinson": (dict(probes=3, seed=4), False),
    "mc-blocks": (dict(method="mc", probes=2, seed=1, structure="blocks"), False),
    "exact": (dict(method="exact"), False),
    "empirical-trace": (dict(method="empirical", structure="trace"), True),
    "kfac": (dict(structure="kfac", probes=2, seed=5), False),
}


def run(rank: int, world: int, init_file: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import fisherlib.distributed as fd

    model, xs, ys = data()
    batches = [(x, y) for x, y in zip(xs, ys)]
    for name, (kw, pairs) in CASES.items():
        mine = fd.shard(batches if pairs else xs)
        fd.fisher(model, None, mine, **kw).save(os.path.join(out, f"{name}-{world}-{rank}.npz"))
    # DistributedDataParallel is unwrapped; contiguous shards through batch_indices.
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    lo, hi = rank * N_BATCHES // world, (rank + 1) * N_BATCHES // world
    est = fd.fisher(ddp, None, xs[lo:hi], batch_indices=range(lo, hi), probes=3, seed=4)
    est.save(os.path.join(out, f"ddp-contiguous-{world}-{rank}.npz"))
    # Only dst gets the result; a rank without batches contributes zeros.
    est = fd.fisher(model, None, xs[:2] if rank == 1 else [], batch_indices=[5, 6] if rank == 1 else [],
                    dst=0, probes=3, seed=4)
    assert (est is None) == (rank != 0), est
    if est is not None:
        est.save(os.path.join(out, f"dst-{world}.npz"))
    # K-FAC on a rank without batches: the blocks come from another rank's description.
    est = fd.fisher(model, None, xs[:2] if rank == 1 else [], batch_indices=[5, 6] if rank == 1 else [],
                    structure="kfac", method="exact")
    est.save(os.path.join(out, f"kfac-tail-{world}-{rank}.npz"))
    # An error on one rank reaches every rank instead of hanging the others.
    try:
        fd.fisher(model, None, xs[:1], method="empirical" if rank == world - 1 else "exact")
    except (RuntimeError, ValueError) as e:
        open(os.path.join(out, f"error-{world}-{rank}.txt"), "w").write(str(e))
    dist.destroy_process_group()
    # Leave at once: about one exit in three aborted in C++ static destructors after this point
    # ("terminate called without an active exception", torch's DDP/gloo threads), which failed
    # or hung the test although every result was written.
    os._exit(0)


if __name__ == "__main__":
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    run(rank, world, init_file, out)
