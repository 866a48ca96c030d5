"""The Fisher diagonal: fisherlib against BackPACK, nngeometry and curvlinops (torch, CPU).

One table per setting, all measured in one run. Each row runs in a fresh subprocess:

- ``time/batch``: median wall time of one call on one batch (one probe / one MC sample for the
  random rows), after one warm-up call;
- ``peak MB``: the growth of the process's peak resident memory (``ru_maxrss``) over a
  baseline taken after the model, the batch and the reference are set up, so it counts the
  method's own temporaries (and any workspace its first call allocates);
- ``to 10 %``: wall time until the median relative error of diag F over its nonzero entries,
  against the exact float64 diagonal of the same batch, is at most 10 %. Random rows repeat
  calls of 8 probes / MC samples (new seeds) and average them until that holds, or give up at
  a time cap (``>cap``); exact rows reach it with one call. "n/a": the method was not run
  (the reason is printed under the table).

The peers are called through ``tests/peers/peer_calls.py``, whose numbers the agreement tests
check against fisherlib's. Float32 for every timed row; torch uses ONE thread (the machine is
shared). Linear-head settings feed fixed random features (the body's output, computed once)
into a ``Linear(d, C)`` head: only the head's time is measured, and its exact diagonal comes in
closed form, Σ_n p_nc(1 − p_nc) h_nj².

    python benchmarks/peers/bench_diag.py                 # the issue's settings (about an hour)
    python benchmarks/peers/bench_diag.py --settings 0 1  # the MLP and the CNN at C = 10 (the
    python benchmarks/peers/bench_diag.py --settings 2 3  #   full run split into parts of about
    python benchmarks/peers/bench_diag.py --settings 4 5  #   20-30 minutes each)
    python benchmarks/peers/bench_diag.py --quick         # smaller batches and caps (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks._measure import reset_peak, status_kb  # noqa: E402 (after the path)

STEP = 8  # probes / MC samples per call while accumulating towards 10 % error
TARGET = 0.10

# name: (kind, spec); batch sizes by mode
SETTINGS = {
    "MLP 784-512-512-10": ("mlp", (784, 512, 512, 10)),
    "CNN 3x32x32, C=10": ("cnn", 10),
    "CNN 3x32x32, C=100": ("cnn", 100),
    "head 512->1000": ("head", 1000),
    "head 512->10000": ("head", 10000),
    "head 512->32768": ("head", 32768),
}
BATCH = {"full": {"mlp": 128, "cnn": 32, "head": 64}, "quick": {"mlp": 32, "cnn": 8, "head": 16}}
CAP = {"full": 60.0, "quick": 15.0}  # seconds of accumulation per random row
REPEATS = {"full": 5, "quick": 3}

ROWS = [
    "training step (SGD)", "fisherlib hutchinson", "fisherlib hutchinson per-example", "fisherlib exact",
    "fisherlib mc", "fisherlib mc per-example",
    "BackPACK DiagGGNExact", "BackPACK DiagGGNMC", "nngeometry FIM (exact)", "nngeometry FIM_MonteCarlo",
    "curvlinops exact (G @ I)", "curvlinops hutchinson_diag",
]
PEER_OF = {"BackPACK": "backpack", "nngeometry": "nngeometry", "curvlinops": "curvlinops"}
EXACT_ROWS = {"fisherlib exact", "BackPACK DiagGGNExact", "nngeometry FIM (exact)", "curvlinops exact (G @ I)"}


# --------------------------------------------------------------------------- set-up (child)


def build(kind, spec, n, dtype):
    import torch
    from torch import nn

    from tests.peers import models as M

    if kind == "mlp":
        model = M.mlp(spec, seed=0, dtype=dtype)
        x, C = M.inputs((spec[0],), n, seed=1, dtype=dtype), spec[-1]
    elif kind == "cnn":
        model = M.cnn((3, 32, 32), (32, 64), spec, seed=0, dtype=dtype)
        x, C = M.inputs((3, 32, 32), n, seed=1, dtype=dtype), spec
    else:
        C, d = spec, 512
        torch.manual_seed(0)
        model = nn.Linear(d, C).to(dtype).eval()
        with torch.no_grad():
            model.weight.normal_(0, 3.0 / d**0.5)  # logits of spread ~3: p far from uniform
        # fixed body: features of a frozen random ReLU layer on random 784-d inputs
        g = torch.Generator().manual_seed(1)
        body = torch.randn(784, d, generator=g, dtype=torch.float64) / 28.0
        x = torch.relu(torch.randn(n, 784, generator=g, dtype=torch.float64) @ body).to(dtype)
        model = nn.Sequential(model)
    y = M.labels(n, C, seed=2)
    return model, x, y, C


def reference(kind, model, x):
    """The exact float64 diagonal as one vector (closed form for a linear head)."""
    import copy

    import torch

    import fisherlib
    from tests.peers import models as M

    m64, x64 = copy.deepcopy(model).double(), x.double()
    if kind == "head":
        p = torch.softmax(m64(x64), dim=1)
        w = p * (1 - p)  # (N, C)
        return torch.cat([(w.T @ (x64 * x64)).reshape(-1), w.sum(0)])
    return M.flat(fisherlib.fisher(m64, None, x64, method="exact").value)


def infeasible(row, kind, C, n, P):
    """Why a row is not run at this size (None: run it)."""
    if row == "curvlinops exact (G @ I)" and P > 4096:
        return f"P = {P:,} matvecs per batch (timed on min(256, 2^24/P) columns, extrapolated)"
    if row in EXACT_ROWS - {"fisherlib exact"} and kind == "head" and C >= 10000:
        return f"N·C = {n * C:,} per-example gradient rows of {P:,} entries (or a C×C = {C}² factor per input)"
    if row == "BackPACK DiagGGNExact" and n * C * C * 4 > 8e9:
        return f"its N×C×C square-root factor needs {n * C * C * 4 / 1e9:.0f} GB"
    return None


def make_call(row, model, x, y):
    """(call(seed, k) -> flat diag estimate as a sum, random?)."""
    import torch

    import fisherlib
    from tests.peers import models as M
    from tests.peers import peer_calls as P

    def fl(**kw):
        return lambda s, k: M.flat(fisherlib.fisher(model, None, x, seed=s, **kw).value)

    if row == "fisherlib hutchinson":
        return (lambda s, k: M.flat(fisherlib.fisher(model, None, x, probes=k, seed=s).value)), True
    if row == "fisherlib hutchinson per-example":
        return (lambda s, k: M.flat(fisherlib.fisher(model, None, x, probes=k, seed=s, per_example=True).value)), True
    if row == "fisherlib mc":
        return (lambda s, k: M.flat(fisherlib.fisher(model, None, x, method="mc", probes=k, seed=s).value)), True
    if row == "fisherlib mc per-example":
        return (lambda s, k: M.flat(fisherlib.fisher(model, None, x, method="mc", probes=k, seed=s,
                                                     per_example=True).value)), True
    if row == "training step (SGD)":
        def step(s, k):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        return step, None
    if row == "fisherlib exact":
        return fl(method="exact"), False
    if row == "BackPACK DiagGGNExact":
        return (lambda s, k: P.backpack_diag(model, x, y)), False
    if row == "BackPACK DiagGGNMC":
        return (lambda s, k: P.backpack_diag(model, x, y, mc_samples=k, seed=s)), True
    if row == "nngeometry FIM (exact)":
        return (lambda s, k: P.nngeometry_diag(model, x)), False
    if row == "nngeometry FIM_MonteCarlo":
        return (lambda s, k: P.nngeometry_diag(model, x, trials=k, seed=s)), True
    if row == "curvlinops hutchinson_diag":
        return (lambda s, k: P.curvlinops_hutchinson_diag(model, x, y, num_matvecs=k, seed=s)), True
    if row == "curvlinops exact (G @ I)":
        return (lambda s, k: P.curvlinops_exact_diag(model, x, y)), False
    raise ValueError(row)


def mem_baseline():
    """Release freed heap pages and reset the peak-RSS mark (Linux): returns the RSS now, in kB.

    Falls back to ``ru_maxrss`` where /proc/self/clear_refs cannot be written.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    if reset_peak():
        return status_kb("VmRSS")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def mem_peak_mb(base):
    """Peak RSS since ``mem_baseline`` minus the RSS then, in MB."""
    peak = status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, peak - base) / 1024


def median_rel_error(est, ref, mask):
    return float(((est[mask].detach().double() - ref[mask]).abs() / ref[mask]).median())


def child(setting, row, mode, ref_path):
    import torch

    from tests.peers import peer_calls as PC

    torch.set_num_threads(1)
    kind, spec = SETTINGS[setting]
    n = BATCH[mode][kind]
    model, x, y, C = build(kind, spec, n, torch.float32)
    P = sum(p.numel() for p in model.parameters())
    out = {"P": P, "C": C, "N": n}
    peer = PEER_OF.get(row.split()[0])
    if peer and not PC.available(peer):
        return {**out, "note": f"{peer} not installed"}
    why = infeasible(row, kind, C, n, P)
    if why and row != "curvlinops exact (G @ I)":
        return {**out, "note": why}
    ref = torch.load(ref_path)  # computed once by the parent: its memory is not this row's
    mask = ref > ref.max() * 1e-6
    call, random = make_call(row, model, x, y)
    if why:  # curvlinops exact: time one chunk of identity columns and extrapolate to P
        cols = PC.column_step(P)

        base = mem_baseline()
        PC.curvlinops_exact_diag(model, x, y, columns=[0])
        t0 = time.perf_counter()
        PC.curvlinops_exact_diag(model, x, y, columns=[0])
        t = (time.perf_counter() - t0) * P / cols
        mem = mem_peak_mb(base)
        return {**out, "time": t, "mem": mem, "t10": t, "note": why, "extrapolated": True}
    base = mem_baseline()
    t0 = time.perf_counter()
    est = call(10_000, 1)  # warm-up; a call of over 20 s is timed by it alone
    times = [time.perf_counter() - t0]
    repeats = 0 if times[0] > 20 else REPEATS[mode] if random else max(1, REPEATS[mode] - 2)
    times = times if repeats == 0 else []
    for r in range(repeats):
        t0 = time.perf_counter()
        est = call(r, 1)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    if random is None:  # the training step: a time to compare with, no estimate
        return {**out, "time": t, "mem": mem_peak_mb(base), "t10": None, "note": "one SGD step (forward + backward)"}
    if not random:
        err = median_rel_error(est, ref, mask)
        mem = mem_peak_mb(base)
        return {**out, "time": t, "mem": mem, "t10": t if err <= TARGET else None, "err": err}
    acc, k, spent, err = None, 0, 0.0, float("inf")
    s = 100
    while spent < CAP[mode]:
        t0 = time.perf_counter()
        e = call(s, STEP)
        spent += time.perf_counter() - t0
        s += 1
        acc = e if acc is None else acc + e
        k += STEP
        err = median_rel_error(acc / (k // STEP), ref, mask)
        if err <= TARGET:
            break
    mem = mem_peak_mb(base)
    return {**out, "time": t, "mem": mem, "t10": spent if err <= TARGET else None, "probes": k, "err": err,
            "cap": CAP[mode]}


# --------------------------------------------------------------------------- table (parent)


def fmt_t(t):
    return "–" if t is None else (f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s")


def render(setting, results):
    """Print one setting's table (markdown) from the rows' results."""
    first = next(iter(r for r in results.values() if "P" in r), {})
    print(f"## {setting} (P = {first.get('P', 0):,}, N = {first.get('N')} per batch)\n")
    print("| method | time/batch | × training step | peak MB | to 10 % | probes to 10 % | vs fisherlib hutchinson (to 10 %) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = results.get("fisherlib hutchinson", {}).get("t10")
    step = results.get("training step (SGD)", {}).get("time")
    notes = []
    for row, r in results.items():
        if "time" not in r:
            print(f"| {row} | n/a | | n/a | n/a | | |")
            notes.append(f"{row}: {r.get('note')}")
            continue
        extra = " (extrapolated)" if r.get("extrapolated") else ""
        t10 = fmt_t(r["t10"]) if r.get("t10") is not None else (
            f">{r.get('cap', 0):.0f} s (err {r.get('err', 0):.0%})" if "err" in r else "–")
        ratio = f"{r['t10'] / base:.3g}×" if base and r.get("t10") else "–"
        probes = str(r.get("probes", "exact")) if r.get("t10") is not None or "probes" in r else ""
        steps = f"{r['time'] / step:.2f}" if step else "–"
        print(f"| {row} | {fmt_t(r['time'])}{extra} | {steps} | {r['mem']:.0f} | {t10}{extra} | {probes} | {ratio} |")
        if r.get("note"):
            notes.append(f"{row}: {r['note']}")
    for nt in notes:
        print(f"\n- {nt}", end="")
    print("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--settings", nargs="*", default=None, help="a subset of the settings, by index (0-5)")
    ap.add_argument("--rows", nargs="*", default=None, help="a subset of the rows, by name")
    ap.add_argument("--child", nargs=4, metavar=("SETTING", "ROW", "MODE", "REF"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)))
        return
    mode = "quick" if args.quick else "full"
    import torch

    names = list(SETTINGS)
    chosen = [names[int(i)] for i in args.settings] if args.settings else names
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__} (1 thread), float32, mode={mode}\n")
    import tempfile

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    for setting in chosen:
        results = {}
        kind, spec = SETTINGS[setting]
        model, x, _, _ = build(kind, spec, BATCH[mode][kind], torch.float32)
        ref_path = os.path.join(tmp, "ref.pt")
        torch.save(reference(kind, model, x), ref_path)
        for row in args.rows or ROWS:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            proc = subprocess.run([sys.executable, __file__, "--child", setting, row, mode, ref_path], capture_output=True,
                                  text=True, env=env, cwd=ROOT)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            results[row] = json.loads(line[-1][7:]) if line else {"note": "failed: " + proc.stderr.strip()[-300:]}
            print(f"  {setting} | {row}: {results[row]}", file=sys.stderr, flush=True)
        render(setting, results)


if __name__ == "__main__":
    main()
