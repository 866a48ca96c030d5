"""Fisher merging on the digits: two models fine-tuned from one initialisation on different class
splits, merged into one 10-way classifier; accuracy on the union against plain averaging and
task arithmetic, with each Fisher estimator.

Per seed: a base MLP 64-100-100-10 (ReLU) is trained briefly on a few images of every class (the
"pre-trained" initialisation: ``--base`` images, one epoch); model A is fine-tuned from it on
digits 0–4, model B on digits 5–9 (all their training images, the whole 10-way head, so each
forgets the other split). The merges, evaluated on all 500 held-out images (10-way argmax):

- average: (θ_A + θ_B)/2;
- task arithmetic: θ_0 + λ (θ_A − θ_0 + θ_B − θ_0), λ chosen from a grid on 200 validation
  images taken from the training set (Ilharco et al. 2023);
- Fisher merge: Σ_j F_j θ_j / Σ_j F_j (floor 1e-6), F_j = diag F of model j on its own
  fine-tuning images, reduction "sum" (Matena & Raffel 2022), for each estimator; and with the
  exact Fisher and the floor raised to the mean entry of F (entries below it weigh alike).

References beside them: each model alone, the base, and the ensemble of A and B (mean of the
two softmax outputs, or each model's own head side by side: two forward passes, what merging
tries to reach with one).

Two settings: a shared 10-way head that both models train (each forgets the other's digits),
and two heads on one trunk (A trains logits 0–4, B logits 5–9; the Fisher of each model is its
own head's, so the other head's rows get none and the merge takes them from the other model —
Matena & Raffel's multi-task setting, where the heads are task-specific).

    .venv/bin/python benchmarks/uses/merging.py            # 5 seeds, writes docs/figures + results
    .venv/bin/python benchmarks/uses/merging.py --quick    # smoke run
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _setup as S  # noqa: E402

import fisherlib  # noqa: E402
from fisherlib.uses import average_merge, fisher_merge, task_arithmetic_merge  # noqa: E402

# label, fisher() options: the three kinds (exact, Hutchinson, empirical) and MC.
MERGE_ESTIMATORS = {
    "exact": ("exact", {"method": "exact"}),
    "hutch1": ("Hutchinson, batch, K=1", {"method": "hutchinson", "probes": 1}),
    "hutch8": ("Hutchinson, batch, K=8", {"method": "hutchinson", "probes": 8}),
    "hutch_pe": ("Hutchinson, per example, K=1", {"method": "hutchinson", "per_example": True}),
    "mc": ("Monte-Carlo, per example, K=1", {"method": "mc", "per_example": True}),
    "empirical": ("empirical Fisher", {"method": "empirical"}),
}
LAMBDAS = (0.3, 0.5, 0.7, 0.9, 1.1, 1.3)


@torch.no_grad()
def _ensemble_accuracy(nets, x, y, heads: str) -> float:
    if heads == "own":  # each model's own five logits, side by side
        logits = torch.cat([nets[0](x)[:, :5], nets[1](x)[:, 5:]], dim=1)
        return float((logits.argmax(1) == y).float().mean())
    p = sum(torch.softmax(n(x), dim=1) for n in nets) / len(nets)
    return float((p.argmax(1) == y).float().mean())


def run_seed(seed: int, epochs: int, base_images: int, heads: str = "shared") -> dict:
    """One seed. ``heads="shared"``: A and B train the whole 10-way head on their digits;
    ``"own"``: A trains logits 0–4 only and B logits 5–9 only (two heads on one trunk), each
    Fisher is that of the model's own head (the other head's rows get none)."""
    split = S.digits(seed)
    xval, yval = split.x_train[:200], split.y_train[:200]
    xtr, ytr = split.x_train[200:], split.y_train[200:]
    base = S.mlp(seed)
    S.train(base, xtr[:base_images], ytr[:base_images], epochs=1, seed=seed)
    theta0 = {k: v.detach().clone() for k, v in base.named_parameters()}
    models, data, spans = [], [], []
    for j, task in enumerate((ytr < 5, ytr >= 5)):
        lo, hi = (0, None) if heads == "shared" else ((0, 5) if j == 0 else (5, None))
        net = S.mlp(seed)
        net.load_state_dict(base.state_dict())
        S.train(net, xtr[task], ytr[task], epochs=epochs, seed=seed + 1 + j, lo=lo, hi=hi)
        models.append(net)
        data.append((xtr[task], ytr[task] - lo))
        spans.append((lo, hi))
    params = [{k: v.detach().clone() for k, v in n.named_parameters()} for n in models]

    def acc(theta, x=split.x_test, y=split.y_test):
        return S.accuracy(base, x, y, params=theta)

    def task_acc(theta):  # task-incremental: each task's digits among its own five logits
        a = S.accuracy(base, split.x_test[split.y_test < 5], split.y_test[split.y_test < 5], hi=5, params=theta)
        b = S.accuracy(base, split.x_test[split.y_test >= 5], split.y_test[split.y_test >= 5], lo=5, params=theta)
        return (a + b) / 2

    def score(theta):
        return {"union": acc(theta), "task": task_acc(theta)}

    out = {"base": score(theta0), "A": score(params[0]), "B": score(params[1]),
           "ensemble": {"union": _ensemble_accuracy(models, split.x_test, split.y_test, heads), "task": float("nan")},
           "average": score(average_merge(params))}
    val = {lam: acc(task_arithmetic_merge(theta0, params, lam), xval, yval) for lam in LAMBDAS}
    best = max(LAMBDAS, key=lambda lam: (val[lam], -abs(lam - 0.5)))
    out["task_arithmetic"] = score(task_arithmetic_merge(theta0, params, best))
    out["task_lambda"] = best
    out["fisher"], out["secs"] = {}, {}
    for key, (_, opts) in MERGE_ESTIMATORS.items():
        fishers, t0 = [], time.perf_counter()
        for net, (x, y), (lo, hi) in zip(models, data, spans):
            batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, len(y), 100)]
            fishers.append(fisherlib.fisher(S.Sliced(net, lo, hi), None, batches, seed=seed, **opts))
        out["secs"][key] = time.perf_counter() - t0
        out["fisher"][key] = score(fisher_merge(params, fishers))
        if key == "exact":  # a floor at the mean Fisher entry: small entries count as that mean
            mean = float(np.mean([float(v.mean()) for f in fishers for v in f.value.values()]))
            out["floor_mean"] = score(fisher_merge(params, fishers, floor=mean))
    return out


def _table(runs: list, heads: str, epochs: int) -> tuple[str, list]:
    rows = [("base (pre-trained initialisation)", "base"), ("model A alone (digits 0–4)", "A"),
            ("model B alone (digits 5–9)", "B"), ("ensemble of A and B (2 forwards)", "ensemble"),
            ("average (θ_A + θ_B)/2", "average"), ("task arithmetic, λ from validation", "task_arithmetic")]
    rows = [(label, [r[k] for r in runs], None) for label, k in rows]
    rows += [(f"Fisher merge, {label}", [r["fisher"][k] for r in runs], k) for k, (label, _) in MERGE_ESTIMATORS.items()]
    rows.append(("Fisher merge, exact, floor = mean entry of F", [r["floor_mean"] for r in runs], None))
    what = ("A and B each train the whole 10-way head" if heads == "shared" else
            "two heads on one trunk: A trains logits 0–4, B logits 5–9; each Fisher is its own head's")
    lines = [f"Digits, {what}; {len(runs)} seed(s), {epochs} epochs of fine-tuning; held-out accuracy, % "
             "(mean ± sd over seeds): on the union (10-way argmax) and task-incremental (each task among its "
             "own five logits, the mean of the two tasks)", "",
             "| model | union, % | task-incremental, % | seconds for both Fishers |", "|---|---:|---:|---:|"]
    for label, vals, key in rows:
        secs = f"{np.median([r['secs'][key] for r in runs]):.3f}" if key else ""
        task = [v["task"] for v in vals]
        lines.append(f"| {label} | {S.mean_sd([v['union'] for v in vals])} | "
                     f"{S.mean_sd(task) if not np.isnan(task).any() else ''} | {secs} |")
    lines += ["", f"Task arithmetic's λ chosen per seed: {[r['task_lambda'] for r in runs]}."]
    return "\n".join(lines), rows


def main(argv=None) -> dict:
    args = S.parser(__doc__).parse_args(argv)
    S.setup_threads()
    seeds = 1 if args.quick else args.seeds
    epochs = 3 if args.quick else 20
    runs = {h: [run_seed(s, epochs, base_images=150, heads=h) for s in range(seeds)] for h in ("shared", "own")}
    tables = {h: _table(runs[h], h, epochs) for h in runs}
    table = "\n\n".join(t for t, _ in tables.values())
    fig = None
    if not args.no_write:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
        for ax, h in zip(axes, ("shared", "own")):
            rows = tables[h][1]
            means = [100 * np.mean([v["union"] for v in vals]) for _, vals, _ in rows]
            sds = [100 * np.std([v["union"] for v in vals], ddof=1) if len(vals) > 1 else 0.0 for _, vals, _ in rows]
            colors = ["0.6"] * 4 + ["C1", "C2"] + ["C0"] * len(MERGE_ESTIMATORS) + ["C4"]
            ax.barh(range(len(rows)), means, xerr=sds, color=colors)
            ax.set_yticks(range(len(rows)), [lab for lab, _, _ in rows], fontsize=8)
            ax.set_xlabel("held-out accuracy on digits 0–9, %")
            ax.set_title("shared 10-way head" if h == "shared" else "own heads (0–4 | 5–9)", fontsize=9)
        axes[0].invert_yaxis()
        fig.suptitle("Merging A (0–4) and B (5–9), fine-tuned from one base", fontsize=10)
    S.write("merging", table, {"runs": runs, "epochs": epochs}, fig, args)
    return {"runs": runs, "table": table}


if __name__ == "__main__":
    main()
