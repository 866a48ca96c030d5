"""JAX layer I/O against the generic per-example VJP and against torch, on the exact diagonal.

    python benchmarks/jax_layers.py [--sizes 784,256,10] [--n 128] [--repeats 5] [--dtype float32]

Prints, for an MLP (tanh) on N random inputs:

* the first call's time (trace, compile and run) of ``fisher(method="exact")`` with the JAX
  layer I/O, on a fresh shape, split into the capture's own compile and the rest;
* medians after compilation: JAX layer I/O, JAX generic (``layer_io=False``), torch layer I/O
  (same weights), and the ratios JAX layers / torch and generic / layers.

All timings come from one run, interleaved (benchmarks/_measure.py). The machine is shared:
quote the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
from _measure import median_times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="784,256,10")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-generic", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    import jax
    import jax.numpy as jnp

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import fisherlib
    from fisherlib import backends

    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((i, o)) / np.sqrt(i), 0.1 * rng.standard_normal(o)) for i, o in zip(sizes, sizes[1:])]
    x = rng.standard_normal((args.n, sizes[0]))
    dt = getattr(jnp, args.dtype)
    p = [{"kernel": jnp.asarray(w, dt), "bias": jnp.asarray(b, dt)} for w, b in ws]
    xj = jnp.asarray(x, dt)

    def mlp(p, x):
        for layer in p[:-1]:
            x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
        return x @ p[-1]["kernel"] + p[-1]["bias"]

    be = backends.get("jax")
    gen = backends.get("jax", layer_io=False)

    def run(backend):
        est = fisherlib.fisher(mlp, p, xj, method="exact", backend=backend)
        jax.block_until_ready(jax.tree_util.tree_leaves(est.value))

    t0 = time.perf_counter()
    _, cap = be.layer_io(mlp, p, xj)
    cap(jnp.ones((sizes[-1], args.n, sizes[-1]), dt))
    t_capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(be)
    t_first = time.perf_counter() - t0 + t_capture  # the capture was compiled just before
    fns = {"jax layers": lambda: run(be)}
    if not args.no_generic:
        fns["jax generic"] = lambda: run(gen)
    if not args.no_torch:
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        tdt = getattr(torch, args.dtype)
        layers = []
        for w, b in ws:
            lin = torch.nn.Linear(w.shape[0], w.shape[1]).to(tdt)
            with torch.no_grad():
                lin.weight.copy_(torch.as_tensor(w.T))
                lin.bias.copy_(torch.as_tensor(b))
            layers += [lin, torch.nn.Tanh()]
        net = torch.nn.Sequential(*layers[:-1])
        xt = torch.as_tensor(x, dtype=tdt)
        fns["torch layers"] = lambda: fisherlib.fisher(net, None, xt, method="exact")
    times = median_times(fns, args.repeats)
    print(f"MLP {args.sizes}, N = {args.n}, {args.dtype}, exact diagonal; jax {jax.__version__}; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'':24s}{'seconds':>10s}")
    print(f"{'jax layers, first call':24s}{t_first:10.3f}   (capture compile {t_capture:.3f})")
    for name, t in times.items():
        print(f"{name:24s}{t:10.4f}")
    if "torch layers" in times:
        print(f"{'jax layers / torch':24s}{times['jax layers'] / times['torch layers']:10.2f}")
    if "jax generic" in times:
        print(f"{'generic / layers':24s}{times['jax generic'] / times['jax layers']:10.2f}")


if __name__ == "__main__":
    main()
