"""Scale-out benchmark: fisherlib.distributed.fisher on 1, 2, 3 gloo processes on this machine.

Two tables (medians of repeats, all measured in one run):

1. The cost of the reduction alone: one ``all_gather_object`` of the metadata and one
   all-reduce of a flat float32 buffer of P entries, against 2 processes, for P from 1e4 to 1e7
   (a diagonal estimate has P entries, K·P with K probes kept).
2. Scaling: the wall time of one estimate over the same B batches of an MLP (Hutchinson, K
   probes, diagonal) by one process and by W processes of one thread each (each over B/W
   batches, then the all-reduce), the speed-up T1/TW, the parallel efficiency T1/(W·TW),
   and the share of the all-reduce in TW.

Run: ``python benchmarks/distributed.py`` (``--quick`` for a smoke run). Every rank uses one
thread; the single process is also timed with all cores' threads (torch's default), the fair
comparison for a user who has one process anyway.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

SIZES = (10_000, 100_000, 1_000_000, 10_000_000)


def mlp(D, H, C):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, H), torch.nn.Tanh(),
                               torch.nn.Linear(H, C))


def data(cfg):
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randn(cfg["N"], cfg["D"], generator=g) for _ in range(cfg["B"])]


def _median(fn, repeats, barrier=None, cpu=False):
    """Median wall time of ``fn`` (and, with ``cpu``, median CPU time of this process)."""
    times, cpus = [], []
    fn()  # warm-up
    for _ in range(repeats):
        if barrier:
            barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return (statistics.median(times), statistics.median(cpus)) if cpu else statistics.median(times)


def rank_main(rank, world, init, cfg, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import fisherlib.distributed as fd

    model, batches = mlp(cfg["D"], cfg["H"], cfg["C"]), data(cfg)
    mine = batches[rank::world]
    kw = dict(probes=cfg["K"], seed=0)
    rows = {}
    rows["total"], my_cpu = _median(lambda: fd.fisher(model, None, mine, **kw), cfg["repeats"], dist.barrier,
                                    cpu=True)
    cpus = [None] * world
    dist.all_gather_object(cpus, my_cpu)
    rows["cpu"] = sum(cpus)  # CPU seconds of all ranks: the work, whatever the machine's load
    est = fd.fisher(model, None, mine, **kw)
    buf = torch.cat([x.reshape(-1) for x in est.parts])

    rows["reduce"] = _median(lambda: reduce_only_of(dist, buf, world, est), cfg["repeats"], dist.barrier)
    if world == 2 and cfg["sizes"]:
        for P in cfg["sizes"]:
            x = torch.ones(P, dtype=torch.float32)
            rows[f"allreduce-{P}"] = _median(lambda: reduce_only_of(dist, x, world, est), cfg["repeats"],
                                             dist.barrier)
    if rank == 0:
        import json

        with open(out, "w") as f:
            json.dump({**rows, "P": buf.numel()}, f)
    dist.destroy_process_group()


def reduce_only_of(dist, x, world, est):
    """What fisherlib.distributed.fisher adds to the local estimate: one gather, one all-reduce."""
    meta = [None] * world
    dist.all_gather_object(meta, {"n": 1, "draws": est.draws})
    dist.all_reduce(x.clone())


def run_world(world, cfg):
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        mp.start_processes(rank_main, args=(world, os.path.join(d, "init"), cfg, out), nprocs=world,
                           join=True, start_method="forkserver")
        with open(out) as f:
            return json.load(f)


def single(cfg, threads):
    import torch

    import fisherlib

    torch.set_num_threads(threads)
    model, batches = mlp(cfg["D"], cfg["H"], cfg["C"]), data(cfg)
    return _median(lambda: fisherlib.fisher(model, None, batches, probes=cfg["K"], seed=0), cfg["repeats"],
                   cpu=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    p.add_argument("--worlds", default="2,3")
    args = p.parse_args(argv)
    if args.quick:
        cfg = dict(D=16, H=32, C=10, N=32, B=6, K=2, repeats=1, sizes=(10_000,))
    else:
        cfg = dict(D=256, H=512, C=10, N=256, B=24, K=4, repeats=5, sizes=SIZES)
    import multiprocessing

    import torch

    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "fisherlib.distributed"])
    load = os.getloadavg()[0]
    print(f"# torch {torch.__version__}, {os.cpu_count()} cores, load average {load:.1f} at start; "
          f"MLP {cfg['D']}-{cfg['H']}-{cfg['H']}-{cfg['C']}, {cfg['B']} batches of {cfg['N']}, "
          f"Hutchinson diag K={cfg['K']}; medians of {cfg['repeats']}\n")
    worlds = [int(w) for w in args.worlds.split(",")]
    t1, c1 = single(cfg, 1)
    t1_all, c1_all = single(cfg, os.cpu_count() or 1)
    results = {w: run_world(w, cfg) for w in worlds}
    if 2 in results:
        r = results[2]
        print("| P (float32 entries) | gather + all-reduce, 2 processes (ms) | GB/s |")
        print("|---:|---:|---:|")
        for P in cfg["sizes"]:
            t = r[f"allreduce-{P}"]
            print(f"| {P:.0e} | {t * 1e3:.2f} | {4 * P / t / 1e9:.3f} |")
        print()
    print("| processes | wall (s) | speed-up T1/TW | efficiency T1/(W TW) | all-reduce share of TW "
          "| CPU s, all ranks | CPU / CPU of 1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| 1 (1 thread) | {t1:.3f} | 1.00 | 1.00 | - | {c1:.3f} | 1.00 |")
    print(f"| 1 ({os.cpu_count()} threads) | {t1_all:.3f} | {t1 / t1_all:.2f} | - | - | {c1_all:.3f} | "
          f"{c1_all / c1:.2f} |")
    for w, r in results.items():
        print(f"| {w} | {r['total']:.3f} | {t1 / r['total']:.2f} | {t1 / (w * r['total']):.2f} | "
              f"{r['reduce'] / r['total']:.1%} | {r['cpu']:.3f} | {r['cpu'] / c1:.2f} |")
    print(f"\n# estimate size P = {results[worlds[0]]['P']} floats; load average "
          f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    sys.exit(main())
