"""Secular-equation spectrum of I_Δ = diag(p) - p pᵀ against batched dense eigensolvers.

For each number of classes C, draws ``rows`` rows of logits z ~ N(0, 2²) in float64, builds
the dense Fisher matrices once (not timed), and times, in the same run:

* ``fisherlib.simplex.eigh`` / ``eigvalsh`` / ``top_eigpair`` on NumPy arrays (and on torch
  tensors when torch is installed): O(C² · steps) elementwise work, O(C · steps) for the top pair;
* ``numpy.linalg.eigh`` / ``eigvalsh`` and ``torch.linalg.eigh`` / ``eigvalsh`` on the batched
  dense (rows, C, C) matrices: O(C³) each. The top pair has no cheaper dense route, so
  ``top_eigpair`` is compared with the full dense ``eigh``.

Each time is the median of ``--repeats`` runs after one warm-up call; the speed-up is dense
time / fisherlib time on the same backend (> 1: fisherlib is faster). Accuracy, relative to
max p per row (the scale of I_Δ, since ‖I_Δ‖₂ <= max p): the largest eigenvalue difference
from ``numpy.linalg.eigh`` of the dense float64 matrix, and the largest residual ‖F v − λ v‖₂
of fisherlib's and of numpy's own eigenpairs.

Usage::

    python benchmarks/core_spectrum.py            # C = 10, 100, 1000; 256 rows; 3 repeats
    python benchmarks/core_spectrum.py --quick    # C = 10, 100; 64 rows; 2 repeats (seconds)
    # against an earlier solver, timed in the same run (interleaved with the current one):
    git show a92d398:fisherlib/core/spectrum.py > /tmp/spectrum_old.py
    python benchmarks/core_spectrum.py --baseline /tmp/spectrum_old.py

Prints one Markdown table (pasted into docs/benchmarks.md); with ``--baseline``, a second one
with the baseline's times and current / baseline speed-ups.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time

import numpy as np

from fisherlib import simplex


def _median_time(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _warm(f):
    f()


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _load_baseline(path):
    """Another version of fisherlib/core/spectrum.py, loaded as a module of fisherlib.core."""
    spec = importlib.util.spec_from_file_location("fisherlib.core._baseline_spectrum", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _errors(F, pmax, lam, V, lam_ref):
    """(max |λ - λ_ref| / max p, max ‖F v - λ v‖ / max p) over rows and eigenpairs."""
    err = np.max(np.abs(lam - lam_ref) / pmax)
    if V is None:
        return err, None
    if V.ndim == F.ndim - 1:  # one vector per row
        V, lam = V[..., None], lam[..., None]
    res = np.linalg.norm(F @ V - V * lam[..., None, :], axis=-2) / pmax
    return err, float(np.max(res))


def bench(C: int, rows: int, repeats: int, seed: int, torch, baseline=None) -> list[dict]:
    rng = np.random.default_rng(seed + C)
    z = rng.normal(size=(rows, C)) * 2.0
    F = simplex.fim(z)  # dense (rows, C, C), built once, not timed
    pmax = simplex.probs(z).max(axis=-1, keepdims=True)
    w_ref, U_ref = np.linalg.eigh(F)
    _, np_res = _errors(F, pmax, w_ref, U_ref, w_ref)
    zt = Ft = None
    if torch is not None:
        zt, Ft = torch.from_numpy(z), torch.from_numpy(F)

    small = slice(0, min(rows, 4))  # warm-up on a few rows: loads code paths, not the full cost
    results = []
    for op in ("eigh", "eigvalsh", "top_eigpair"):
        f_np = getattr(simplex, op)
        _warm(lambda: f_np(z[small]))
        t_fl = _median_time(lambda: f_np(z), repeats)
        out = f_np(z)
        if op == "eigh":
            lam, V = out
            err, res = _errors(F, pmax, lam, V, w_ref)
        elif op == "eigvalsh":
            err, res = _errors(F, pmax, out, None, w_ref)
        else:
            lam, v = out
            err, res = _errors(F, pmax[..., 0], lam, v, w_ref[..., -1])
        dense_np = np.linalg.eigvalsh if op == "eigvalsh" else np.linalg.eigh
        _warm(lambda: dense_np(F[small]))
        t_np = _median_time(lambda: dense_np(F), repeats)
        row = {"C": C, "op": op, "fisherlib_numpy": t_fl, "numpy_dense": t_np, "err": err, "res": res, "np_res": np_res}
        if torch is not None:
            f_t = getattr(simplex, op)
            _warm(lambda: f_t(zt[small]))
            row["fisherlib_torch"] = _median_time(lambda: f_t(zt), repeats)
            dense_t = torch.linalg.eigvalsh if op == "eigvalsh" else torch.linalg.eigh
            _warm(lambda: dense_t(Ft[small]))
            row["torch_dense"] = _median_time(lambda: dense_t(Ft), repeats)
        if baseline is not None:  # current and baseline alternate, so both see the same load
            f_b = getattr(baseline, op)
            for key, zz in (("numpy", z), ("torch", zt)):
                if zz is None:
                    continue
                _warm(lambda: f_b(zz[small]))
                cur, base = [], []
                for _ in range(repeats):
                    cur.append(_median_time(lambda: f_np(zz), 1))
                    base.append(_median_time(lambda: f_b(zz), 1))
                row[f"current_{key}"] = statistics.median(cur)
                row[f"baseline_{key}"] = statistics.median(base)
        results.append(row)
        print(f"  C={C:<5} {op:<12} done", flush=True)
    return results


def _fmt_t(t):
    if t is None:
        return "–"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _fmt_e(e):
    return "–" if e is None else f"{e:.1e}"


def table(results: list[dict], with_torch: bool) -> str:
    head = ["C", "operation", "fisherlib (numpy)", "numpy.linalg (dense)", "speed-up"]
    if with_torch:
        head += ["fisherlib (torch)", "torch.linalg (dense)", "speed-up"]
    head += ["λ error / max p", "residual / max p (fisherlib, numpy)"]
    rule = "|" + "|".join(":---" if i == 1 else "---:" for i in range(len(head))) + "|"
    lines = ["| " + " | ".join(head) + " |", rule]
    for r in results:
        dense_name = "eigvalsh" if r["op"] == "eigvalsh" else "eigh"
        cells = [str(r["C"]), f"`{r['op']}` vs `{dense_name}`", _fmt_t(r["fisherlib_numpy"]), _fmt_t(r["numpy_dense"])]
        cells.append(f"{r['numpy_dense'] / r['fisherlib_numpy']:.1f}x")
        if with_torch:
            cells += [_fmt_t(r["fisherlib_torch"]), _fmt_t(r["torch_dense"])]
            cells.append(f"{r['torch_dense'] / r['fisherlib_torch']:.1f}x")
        res = "–" if r["res"] is None else f"{_fmt_e(r['res'])}, {_fmt_e(r['np_res'])}"
        cells += [_fmt_e(r["err"]), res]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def baseline_table(results: list[dict], with_torch: bool) -> str:
    head = ["C", "operation", "baseline (numpy)", "current (numpy)", "speed-up"]
    if with_torch:
        head += ["baseline (torch)", "current (torch)", "speed-up"]
    rule = "|" + "|".join(":---" if i == 1 else "---:" for i in range(len(head))) + "|"
    lines = ["| " + " | ".join(head) + " |", rule]
    for r in results:
        cells = [str(r["C"]), f"`{r['op']}`"]
        for key in ("numpy", "torch") if with_torch else ("numpy",):
            b, c = r[f"baseline_{key}"], r[f"current_{key}"]
            cells += [_fmt_t(b), _fmt_t(c), f"{b / c:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(torch) -> str:
    parts = [
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
        f"Python {platform.python_version()}, NumPy {np.__version__}",
    ]
    if torch is not None:
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    return "; ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="C = 10, 100; 64 rows; 2 repeats")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="values of C (default 10 100 1000)")
    parser.add_argument("--rows", type=int, default=None, help="rows of logits (default 256)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method, median reported (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the torch columns")
    parser.add_argument("--baseline", default=None, help="path of an earlier spectrum.py to time beside this one")
    args = parser.parse_args(argv)
    classes = args.classes or ([10, 100] if args.quick else [10, 100, 1000])
    rows = args.rows or (64 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 3)
    torch = None if args.no_torch else _torch()

    print(f"# fisherlib core spectrum benchmark: {rows} rows, float64, median of {repeats}", flush=True)
    print(f"# {machine(torch)}", flush=True)
    baseline = None if args.baseline is None else _load_baseline(args.baseline)
    results = []
    for C in classes:
        results += bench(C, rows, repeats, args.seed, torch, baseline)
    print()
    print(table(results, torch is not None))
    if baseline is not None:
        print()
        print(f"Against the baseline {args.baseline} (same run, alternating calls):")
        print()
        print(baseline_table(results, torch is not None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
