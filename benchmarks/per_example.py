"""Per-example methods through layer I/O against the generic vmap path, BackPACK and a training step.

All rows of a setting run interleaved in ONE process (round-robin, median of the repeats), so
that the ratios hold on a shared, loaded machine where separate runs drift apart. torch, one
thread, float32; the models and batches of ``benchmarks/peers/bench_diag.py``.

    python benchmarks/per_example.py            # MLP 784-512-512-10 (N=128), CNNs C=10 / 100 (N=32)
    python benchmarks/per_example.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def settings():
    from tests.peers import models as M

    import torch

    mlp = M.mlp((784, 512, 512, 10), seed=0, dtype=torch.float32)
    yield "MLP 784-512-512-10, N=128", mlp, M.inputs((784,), 128, seed=1, dtype=torch.float32), 10
    for C in (10, 100):
        cnn = M.cnn((3, 32, 32), (32, 64), C, seed=0, dtype=torch.float32)
        yield f"CNN 3x32x32, C={C}, N=32", cnn, M.inputs((3, 32, 32), 32, seed=1, dtype=torch.float32), C


def rows(model, x, y):
    import torch

    import fisherlib
    from fisherlib import backends
    from tests.peers import peer_calls as P

    generic = backends.get("torch", layer_io=False)

    def step():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    out = {
        "training step": step,
        "exact (layer I/O)": lambda: fisherlib.fisher(model, None, x, method="exact"),
        "exact (generic vmap)": lambda: fisherlib.fisher(model, None, x, method="exact", backend=generic),
        "hutchinson per-example K=1": lambda: fisherlib.fisher(model, None, x, per_example=True),
        "mc per-example K=1": lambda: fisherlib.fisher(model, None, x, method="mc", per_example=True),
        "empirical": lambda: fisherlib.fisher(model, None, [(x, y)], method="empirical"),
    }
    if P.available("backpack"):
        out["BackPACK DiagGGNExact"] = lambda: P.backpack_diag(model, x, y)
        out["BackPACK DiagGGNMC (1 sample)"] = lambda: P.backpack_diag(model, x, y, mc_samples=1, seed=0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import warnings

    import torch

    from tests.peers import models as M

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    repeats = 3 if args.quick else 7
    print(f"# torch {torch.__version__}, 1 thread, float32, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"median of {repeats} interleaved rounds\n")
    for name, model, x, C in settings():
        y = M.labels(x.shape[0], C, seed=2)
        fns = rows(model, x, y)
        times = {k: [] for k in fns}
        for f in fns.values():
            f()  # warm-up
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        step = med["training step"]
        bp = {"exact": med.get("BackPACK DiagGGNExact"), "mc": med.get("BackPACK DiagGGNMC (1 sample)")}
        print(f"## {name}\n")
        print("| row | median | × training step | × BackPACK (same method) |")
        print("|---|---:|---:|---:|")
        for k, t in med.items():
            ref = bp["exact"] if k.startswith("exact") else bp["mc"] if k.startswith("mc") else None
            vs = f"{t / ref:.2f}" if ref else "–"
            print(f"| {k} | {t * 1e3:.1f} ms | {t / step:.2f} | {vs} |")
        print()


if __name__ == "__main__":
    main()
