"""What each of fisherlib's estimators costs, and how accurate it is for the same time, in torch.

Two tables, all numbers from one run:

1. **Methods.** For an MLP on MNIST-size inputs (784-512-512-10) and a CNN on CIFAR-size inputs
   (3×32×32, two 3×3 conv + max-pool layers with 32 and 64 channels; C = 10 with 128 inputs per
   batch, C = 100 with 32, since its exact diag is slow), each ``fisherlib.fisher`` method on
   diag F (the module's parameters passed as a dict of detached tensors) — Hutchinson with
   K = 1 probe per batch, Hutchinson ``per_example``, Monte-Carlo, empirical, the Hutchinson
   estimators of the bounds F_UB and F_LB, and exact — and a plain training step for scale:

   - time per batch (median of interleaved repeats);
   - peak memory: in a fresh subprocess per row, after one warm-up call, the peak resident set
     size during one more call (VmHWM, reset through ``/proc/self/clear_refs``) minus the
     resident size before it (``ru_maxrss`` where the peak cannot be reset);
   - accuracy for the same time: the budget is the time of one exact batch; a random method
     averages as many calls (K = 1 each, seeds 1, 2, ...) as fit in it (budget / median time),
     and the table gives the median over parameters of |diag F̂ − diag F| / diag F for one call
     and for the budget. The bound estimators are compared with the exact diag of their own
     bound (F_UB or F_LB), the empirical Fisher with F (its error is its bias).

2. **Class-count sweep.** A fixed body (784-256-256, tanh) with a linear head to C classes,
   C = 10 ... 32768: one Hutchinson probe per batch (``fisher(..., probes=1)``) against one
   training step (forward, cross-entropy, backward), aim ≤ 1.05×, and the exact diag where it
   fits in memory (it grows with C: N·C per-example VJPs and C·P gradient entries per input),
   timed on 4 inputs and scaled to the batch above C = 100.

The models are seeded, in eval mode, with the head rescaled so that the logits have standard
deviation 3 (neither uniform nor one-hot); the labels (used by the empirical Fisher only) are
the model's own argmax, as for a model that fits its training set.

    python benchmarks/estimators.py            # full sizes (about 15 minutes on 2 busy CPU cores)
    python benchmarks/estimators.py --quick    # small sizes, few repeats (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

from _measure import median_times, reset_peak, status_kb  # benchmarks/ is the script's directory

# ------------------------------------------------------------------------------------ sizes


def sizes(quick: bool) -> dict:
    if quick:
        return dict(
            settings=[("MLP", "mlp", 10, 16), ("CNN", "cnn", 10, 8), ("CNN", "cnn", 100, 4)],
            d_in=64, hidden=64, img=8, ch=4,
            sweep=dict(classes=[10, 100, 1000], n=16, d_in=64, hidden=32, exact_max_classes=100,
                       exact_inputs=4),
        )
    return dict(
        # (label, kind, classes, batch size); the CNN's exact diag is N·C per-example VJPs, hence
        # its smaller batches.
        settings=[("MLP", "mlp", 10, 128), ("CNN", "cnn", 10, 128), ("CNN", "cnn", 100, 32)],
        d_in=784, hidden=512, img=32, ch=32,
        sweep=dict(classes=[10, 100, 1000, 10000, 32768], n=128, d_in=784, hidden=256,
                   exact_max_classes=32768, exact_inputs=4),
    )


# ------------------------------------------------------------------------------------ models

LOGIT_STD = 3.0  # the head is rescaled so that logits have this spread: a partly confident model


def build(kind: str, classes: int, n: int, s: dict):
    """A model in eval mode, a batch x and labels y (the model's own argmax), all seeded.

    ``kind="sweep"``: the sweep's fixed body (the same weights for every C) and a head to C.
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "sweep":
        w = s["sweep"]
        h = w["hidden"]
        body = nn.Sequential(nn.Linear(w["d_in"], h), nn.Tanh(), nn.Linear(h, h), nn.Tanh())
        x = torch.randn(n, w["d_in"])
        torch.manual_seed(classes)
        model = nn.Sequential(*body, nn.Linear(h, classes))
    elif kind == "mlp":
        h = s["hidden"]
        model = nn.Sequential(nn.Linear(s["d_in"], h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, classes))
        x = torch.randn(n, s["d_in"])
    else:
        ch, img = s["ch"], s["img"]
        model = nn.Sequential(
            nn.Conv2d(3, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(ch, 2 * ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * ch * (img // 4) ** 2, classes),
        )
        x = torch.randn(n, 3, img, img)
    model.eval()
    with torch.no_grad():
        head = model[-1]
        scale = LOGIT_STD / model(x).std().item()
        head.weight.mul_(scale)
        head.bias.mul_(scale)
        y = model(x).argmax(dim=1)  # labels the model fits, as at the end of training
    return model, x, y


# The rows of the methods table: name -> keyword arguments of fisherlib.fisher (None: train step).
METHODS = {
    "train step": None,
    "hutchinson": dict(method="hutchinson"),
    "hutchinson per_example": dict(method="hutchinson", per_example=True),
    "mc": dict(method="mc"),
    "empirical": dict(method="empirical"),
    "upper (hutchinson)": dict(method="hutchinson", bound="upper"),
    "lower (hutchinson)": dict(method="hutchinson", bound="lower"),
    "exact": dict(method="exact"),
}


def target_of(kwargs: dict) -> str | None:
    """Which exact diag a method is compared with: F, F_UB or F_LB."""
    return kwargs.get("bound")


def make_call(name: str, model, x, y):
    """call(seed) -> FisherEstimate (None for the training step).

    ``fisher`` gets the module with its parameters as an explicit dict of detached tensors
    (``functional_call``). ``params=None`` costs one extra VJP per call (the sweep's last
    column), and a dict of tensors that require grad makes the per-example methods keep an
    autograd graph across chunks (about 10× the memory of the exact diag here).
    """
    import torch
    import torch.nn.functional as F

    import fisherlib

    if name == "hutchinson, params=None":
        return lambda seed=0: fisherlib.fisher(model, None, x, seed=seed)
    params = detached(model)
    kwargs = METHODS[name]
    if kwargs is None:
        params = [p for p in model.parameters() if p.requires_grad]

        def train(seed=0):
            loss = F.cross_entropy(model(x), y, reduction="sum")
            torch.autograd.grad(loss, params)

        return train
    batches = [(x, y)] if kwargs["method"] == "empirical" else x

    def call(seed=0):
        return fisherlib.fisher(model, params, batches, seed=seed, **kwargs)

    return call


def detached(model) -> dict:
    return {k: v.detach() for k, v in model.named_parameters()}


def flat(est) -> np.ndarray:
    return np.concatenate([np.asarray(v.detach(), np.float64).ravel() for v in est.value.values()])


def rel_err(est: np.ndarray, ref: np.ndarray) -> float:
    """Median over parameters of |est − ref| / ref, over the entries where ref > 0."""
    mask = ref > 1e-12 * ref.max()
    return float(np.median(np.abs(est[mask] - ref[mask]) / ref[mask]))


# ------------------------------------------------------------------------------------ timing


def child(spec: dict) -> None:
    """Measure one row's peak extra memory in this (fresh) process and print it as JSON.

    After one warm-up call, the peak RSS is reset to the current RSS and one more call is made;
    the result is the new peak minus the RSS before it. The parent sets MALLOC_MMAP_THRESHOLD_
    so that large blocks are returned to the system when freed, and the warm-up's freed memory
    does not hide in the baseline.
    """
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    s = sizes(spec["quick"])
    model, x, y = build(spec["kind"], spec["classes"], spec["n"], s)
    call = make_call(spec["method"], model, x, y)
    call(0)  # warm-up: lazy imports and one-time set-up are not the method's memory
    gc.collect()
    base = status_kb("VmRSS")
    if base is not None and reset_peak():
        how = "VmHWM"
        call(1)
        peak = status_kb("VmHWM") - base
    else:  # ru_maxrss: the peak since the process started, so earlier peaks hide below it
        how = "ru_maxrss"
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call(1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(json.dumps({"peak_mb": peak / 1024, "how": how}))


def memory_row(kind, classes, n, method, quick, threads) -> tuple[float, str]:
    spec = dict(kind=kind, classes=classes, n=n, method=method, quick=quick, threads=threads)
    # Large blocks straight from mmap, so that freed memory leaves the RSS and the peak is exact.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                         capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["peak_mb"], res["how"]


# ------------------------------------------------------------------------------------ part 1


def bench_methods(s, repeats, quick, threads, memory):
    import fisherlib

    rows = []
    for label, kind, classes, n in s["settings"]:
        model, x, y = build(kind, classes, n, s)
        params = detached(model)
        P = sum(p.numel() for p in model.parameters())
        refs = {b: flat(fisherlib.fisher(model, params, x, method="exact", bound=b)) for b in (None, "upper", "lower")}
        calls = {name: make_call(name, model, x, y) for name in METHODS}
        slow = {"exact", "hutchinson per_example", "empirical"}
        t = median_times(calls, {name: max(3, repeats // 3) if name in slow else repeats for name in calls})
        budget = t["exact"]
        setting = dict(model=label, classes=classes, params=P, batch="×".join(map(str, x.shape)),
                       train=t["train step"], budget=budget,
                       gap_upper=rel_err(refs["upper"], refs[None]), gap_lower=rel_err(refs["lower"], refs[None]))
        for name, kwargs in METHODS.items():
            row = dict(setting, method=name, time=t[name])
            if kwargs is not None:
                ref = refs[target_of(kwargs)]
                random = kwargs["method"] in ("hutchinson", "mc")
                count = max(1, math.floor(budget / t[name])) if random else 1
                acc = flat(calls[name](1))
                row["err1"] = rel_err(acc, ref)
                for seed in range(2, count + 1):
                    acc = acc + flat(calls[name](seed))
                row.update(count=count, err=rel_err(acc / count, ref))
            if memory:
                row["mem"], row["mem_how"] = memory_row(kind, classes, n, name, quick, threads)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ part 2


def bench_sweep(s, repeats, quick, threads, memory):
    import torch

    from fisherlib import backends

    be = backends.get("torch")
    w = s["sweep"]
    n = w["n"]
    rows = []
    rate = None
    for C in w["classes"]:
        model, x, y = build("sweep", C, n, s)
        P = sum(p.numel() for p in model.parameters())
        ct = torch.randn(n, C)

        def adapter(model=model, x=x, ct=ct):  # linearize + one vjp: no cotangent, no accumulation
            _, vjp = be.linearize(model, detached(model), x)
            return vjp(ct)

        fns = {"train": make_call("train step", model, x, y), "probe": make_call("hutchinson", model, x, y),
               "adapter": adapter, "probe_none": make_call("hutchinson, params=None", model, x, y)}
        reps = dict.fromkeys(fns, repeats)
        # exact: the C columns of the factor, in chunks, through the body's layers (the head's
        # diagonal in closed form). Timed on a sub-batch above C = 100 (its cost is linear in the
        # inputs); beyond exact_max_classes, estimated from the last rate.
        n_exact = n if C <= 100 else min(n, w["exact_inputs"])
        if C <= w["exact_max_classes"]:
            xe, ye = x[:n_exact], y[:n_exact]
            fns["exact"] = make_call("exact", model, xe, ye)
            reps["exact"] = max(3, repeats // 5)
        t = median_times(fns, reps)
        row = dict(classes=C, params=P, n=n, n_exact=n_exact if "exact" in t else None,
                   exact=t["exact"] * n / n_exact if "exact" in t else None,
                   **{k: v for k, v in t.items() if k != "exact"})
        if "exact" in t:
            rate = row["exact"] / (n * C * P)  # seconds per per-example gradient entry
        elif rate is not None:
            row["exact_estimate"] = rate * n * C * P
        if memory and "exact" in t:
            row["exact_mem"], _ = memory_row("sweep", C, n_exact, "exact", quick, threads)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ report


def methods_table(rows) -> str:
    head = ("| model | C | params | batch | method | time / batch (ms) | × train step | peak memory (MB) "
            "| calls in the budget | median rel. err., 1 call | median rel. err., budget |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        mem = f"{r['mem']:,.0f}" if "mem" in r else "–"
        err1 = f"{r['err1']:.3f}" if "err1" in r else "–"
        err = f"{r['err']:.3f}" if "err" in r else "–"
        count = f"{r['count']:,}" if "count" in r else "–"
        lines.append(f"| {r['model']} | {r['classes']} | {r['params']:,} | {r['batch']} | {r['method']} | "
                     f"{1e3 * r['time']:,.1f} | {r['time'] / r['train']:.2f} | {mem} | {count} | {err1} | {err} |")
    return "\n".join(lines)


def gaps_table(rows) -> str:
    lines = ["| model | C | budget = one exact batch (ms) | median (F_UB − F) / F | median (F − F_LB) / F |",
             "|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        key = (r["model"], r["classes"])
        if key not in seen:
            seen.add(key)
            lines.append(f"| {r['model']} | {r['classes']} | {1e3 * r['budget']:,.1f} | {r['gap_upper']:.3f} "
                         f"| {r['gap_lower']:.3f} |")
    return "\n".join(lines)


def sweep_table(rows) -> str:
    head = ("| C | params | train step (ms) | 1 Hutchinson probe (ms) | ratio (aim ≤ 1.05) "
            "| of which linearize + vjp (ms) | exact diag (ms) | exact / probe | exact peak memory (MB) "
            "| probe with params=None (ms) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r["exact"] is None:
            est = r.get("exact_estimate")
            est = "" if est is None else f"~{est / 3600:,.1f} h" if est >= 3600 else f"~{est:,.0f} s"
            exact, ratio, mem = f"not run: {est} at the rate above" if est else "not run", "–", "–"
        else:
            sub = "" if r["n_exact"] == r["n"] else f" ({r['n_exact']} inputs ×{r['n'] // r['n_exact']})"
            exact = f"{1e3 * r['exact']:,.0f}{sub}"
            ratio = f"{r['exact'] / r['probe']:,.0f}"
            mem = f"{r['exact_mem']:,.0f}" if "exact_mem" in r else "–"
        lines.append(f"| {r['classes']:,} | {r['params']:,} | {1e3 * r['train']:.2f} | {1e3 * r['probe']:.2f} | "
                     f"{r['probe'] / r['train']:.2f} | {1e3 * r['adapter']:.2f} | {exact} | {ratio} | {mem} | "
                     f"{1e3 * r['probe_none']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of the fast rows")
    parser.add_argument("--parts", default="methods,sweep", help="comma-separated subset of methods,sweep")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure peak memory, one subprocess per row (default: on, off with --quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: stable timings on a shared machine)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return
    import torch

    torch.set_num_threads(args.threads)
    s = sizes(args.quick)
    repeats = args.repeats or (3 if args.quick else 15)
    memory = (not args.quick) if args.memory is None else args.memory
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}, float32, medians of interleaved repeats "
          f"({repeats}; slow rows fewer)")
    if "methods" in parts:
        rows = bench_methods(s, repeats, args.quick, args.threads, memory)
        print("\n## methods\n")
        print(methods_table(rows))
        how = {r["mem_how"] for r in rows if "mem_how" in r}
        if how:
            print(f"\npeak memory: {', '.join(sorted(how))} over the set-up state, one call after a warm-up, "
                  "fresh process per row")
        print("\n## bound gaps (exact)\n")
        print(gaps_table(rows))
    if "sweep" in parts:
        w = s["sweep"]
        print(f"\n## class-count sweep (body {w['d_in']}-{w['hidden']}-{w['hidden']}, batch {w['n']})\n")
        print(sweep_table(bench_sweep(s, repeats, args.quick, args.threads, memory)))
    print(f"\n# total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
