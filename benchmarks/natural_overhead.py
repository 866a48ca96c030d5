"""What the Fisher costs inside a training loop, in torch: ratios to a plain training step.

On the models of ``benchmarks/estimators.py`` (MLP 784-512-512-10 with 128 inputs; CNN on
3×32×32 with C = 10 and 128 inputs, C = 100 and 32 inputs; the class-count sweep's body
784-256-256 with a head to C = 10 ... 32768, 128 inputs), the median time of

- **train step**: forward, cross-entropy, ``torch.autograd.grad`` (the reference, 1.00);
- **step + 1 probe**: ``RunningFisher("diag", probes=1).step`` — the same forward, the loss
  cotangent and one Hutchinson cotangent pulled back through the step's graph (on a CPU by
  default one ``autograd.grad`` call per row), and the in-place EMA update of the diagonal
  (aim ≤ 1.7×);
- **(batched)**: the same with ``backends.get("torch", batch_probes=True)``: the two rows
  pulled back in one ``is_grads_batched`` call (torch's ``vmap`` of the backward);
- **(no stderr)**: batched, keeping no second moments (``stderr=False``, what the optimizers
  use);
- **floor**: the model's forward and two ``autograd.grad`` calls of ready-made cotangents on
  its graph, with no cotangent or update work: the least any "step + 1 probe" can cost, since a
  second cotangent doubles the backward (each backward's weight and input gradients);
- **standalone probe**: ``fisherlib.fisher(model, params, x, probes=1)`` — its own forward and
  one VJP (aim ≤ 1.05×);
- **adapter only**: ``linearize`` + one ``vjp`` of a fixed cotangent — what the standalone probe
  would cost with free cotangent and accumulation work.

    python benchmarks/natural_overhead.py            # full sizes (a few minutes on 2 busy cores)
    python benchmarks/natural_overhead.py --quick    # small sizes (a smoke test)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from _measure import median_times  # benchmarks/ is the script's directory
from estimators import build, detached, sizes


def rows(quick: bool, repeats: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    import fisherlib
    from fisherlib import backends
    from fisherlib.estimators import RunningFisher

    s = sizes(quick)
    settings = [(f"{label} C={c}", kind, c, n) for label, kind, c, n in s["settings"]]
    w = s["sweep"]
    settings += [(f"sweep C={c}", "sweep", c, w["n"]) for c in w["classes"]]
    be = backends.get("torch")
    batched = backends.get("torch", batch_probes=True)  # the K + 1 rows in one vmap-ed backward
    out = []
    for label, kind, classes, n in settings:
        model, x, y = build(kind, classes, n, s)
        params = [p for p in model.parameters() if p.requires_grad]
        pdict = detached(model)
        rf = RunningFisher("diag", probes=1, decay=0.95)
        rf2 = RunningFisher("diag", probes=1, decay=0.95, backend=batched)
        rf3 = RunningFisher("diag", probes=1, decay=0.95, stderr=False)

        def train():
            loss = F.cross_entropy(model(x), y)
            torch.autograd.grad(loss, params)

        def probe_step():
            rf.step(model, None, x, y)

        def probe_step_batched():
            rf2.step(model, None, x, y)

        def probe_step_lean():
            rf3.step(model, None, x, y)

        def standalone():
            fisherlib.fisher(model, pdict, x, probes=1)

        ct = torch.randn(1, n, classes)
        ct2 = torch.randn(2, n, classes)

        def floor():
            out = model(x)
            torch.autograd.grad(out, params, ct2[0], retain_graph=True)
            torch.autograd.grad(out, params, ct2[1])

        def adapter():
            z, vjp = be.linearize(model, pdict, x)
            vjp(ct)

        t = median_times({"train": train, "probe_step": probe_step, "batched": probe_step_batched,
                          "lean": probe_step_lean, "floor": floor,
                          "standalone": standalone, "adapter": adapter}, repeats, warmup=2)
        out.append({"setting": label, **{k: v for k, v in t.items()}})
        print(f"  {label}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items()), file=sys.stderr)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| setting | train step (ms) | step + 1 probe | (batched) | (no stderr) | floor | standalone probe | "
             "adapter only |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["train"]
        lines.append(f"| {r['setting']} | {t * 1e3:.2f} | {r['probe_step'] / t:.2f}× | {r['batched'] / t:.2f}× | {r['lean'] / t:.2f}× | {r['floor'] / t:.2f}× | "
                     f"{r['standalone'] / t:.2f}× | {r['adapter'] / t:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 21)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    print(f"# Fisher in the training loop: torch {torch.__version__}, {args.threads} threads, "
          f"{platform.machine()}, load {os.getloadavg()[0]:.1f}, allocator settings {malloc or 'default'}; "
          f"medians of {repeats} interleaved repeats\n")
    print(table(rows(args.quick, repeats)))


if __name__ == "__main__":
    main()
