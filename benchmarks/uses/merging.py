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
two softmax outputs: two forward passes, what merging tries to reach with one).

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
def _ensemble_accuracy(nets, x, y) -> float:
    p = sum(torch.softmax(n(x), dim=1) for n in nets) / len(nets)
    return float((p.argmax(1) == y).float().mean())


def run_seed(seed: int, epochs: int, base_images: int) -> dict:
    split = S.digits(seed)
    xval, yval = split.x_train[:200], split.y_train[:200]
    xtr, ytr = split.x_train[200:], split.y_train[200:]
    base = S.mlp(seed)
    S.train(base, xtr[:base_images], ytr[:base_images], epochs=1, seed=seed)
    theta0 = {k: v.detach().clone() for k, v in base.named_parameters()}
    models, data = [], []
    for j, task in enumerate((ytr < 5, ytr >= 5)):
        net = S.mlp(seed)
        net.load_state_dict(base.state_dict())
        S.train(net, xtr[task], ytr[task], epochs=epochs, seed=seed + 1 + j)
        models.append(net)
        data.append((xtr[task], ytr[task]))
    params = [{k: v.detach().clone() for k, v in n.named_parameters()} for n in models]

    def acc(theta, x=split.x_test, y=split.y_test):
        return S.accuracy(base, x, y, params=theta)

    out = {"base": acc(theta0), "A": acc(params[0]), "B": acc(params[1]),
           "ensemble": _ensemble_accuracy(models, split.x_test, split.y_test),
           "average": acc(average_merge(params))}
    val = {lam: acc(task_arithmetic_merge(theta0, params, lam), xval, yval) for lam in LAMBDAS}
    best = max(LAMBDAS, key=lambda lam: (val[lam], -abs(lam - 0.5)))
    out["task_arithmetic"] = acc(task_arithmetic_merge(theta0, params, best))
    out["task_lambda"] = best
    out["fisher"], out["secs"] = {}, {}
    for key, (_, opts) in MERGE_ESTIMATORS.items():
        fishers, t0 = [], time.perf_counter()
        for net, (x, y) in zip(models, data):
            batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, len(y), 100)]
            fishers.append(fisherlib.fisher(net, None, batches, seed=seed, **opts))
        out["secs"][key] = time.perf_counter() - t0
        out["fisher"][key] = acc(fisher_merge(params, fishers))
        if key == "exact":  # a floor at the mean Fisher entry: small entries count as that mean
            mean = float(np.mean([float(v.mean()) for f in fishers for v in f.value.values()]))
            out["floor_mean"] = acc(fisher_merge(params, fishers, floor=mean))
    return out


def main(argv=None) -> dict:
    args = S.parser(__doc__).parse_args(argv)
    S.setup_threads()
    seeds = 1 if args.quick else args.seeds
    epochs = 3 if args.quick else 20
    runs = [run_seed(s, epochs, base_images=150) for s in range(seeds)]
    rows = [("base (pre-trained initialisation)", [r["base"] for r in runs]),
            ("model A alone (digits 0–4)", [r["A"] for r in runs]),
            ("model B alone (digits 5–9)", [r["B"] for r in runs]),
            ("ensemble of A and B (2 forwards)", [r["ensemble"] for r in runs]),
            ("average (θ_A + θ_B)/2", [r["average"] for r in runs]),
            ("task arithmetic, λ from validation", [r["task_arithmetic"] for r in runs])]
    rows += [(f"Fisher merge, {label}", [r["fisher"][k] for r in runs]) for k, (label, _) in MERGE_ESTIMATORS.items()]
    rows.append(("Fisher merge, exact, floor = mean entry of F", [r["floor_mean"] for r in runs]))
    lines = [f"Digits, merging two fine-tuned MLPs into one 10-way classifier ({seeds} seed(s), "
             f"{epochs} epochs of fine-tuning); held-out accuracy on all 10 classes, % (mean ± sd over seeds)",
             "", "| model | accuracy on the union, % | seconds for both Fishers |", "|---|---:|---:|"]
    for label, vals in rows:
        key = next((k for k, (lab, _) in MERGE_ESTIMATORS.items() if label.endswith(lab)), None)
        secs = f"{np.median([r['secs'][key] for r in runs]):.3f}" if key else ""
        lines.append(f"| {label} | {S.mean_sd(vals)} | {secs} |")
    lams = [r["task_lambda"] for r in runs]
    lines.append("")
    lines.append(f"Task arithmetic's λ chosen per seed: {lams}.")
    table = "\n".join(lines)
    fig = None
    if not args.no_write:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels = [lab for lab, _ in rows]
        means = [100 * np.mean(v) for _, v in rows]
        sds = [100 * np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in rows]
        colors = ["0.6"] * 4 + ["C1", "C2"] + ["C0"] * len(MERGE_ESTIMATORS) + ["C4"]
        ax.barh(range(len(rows)), means, xerr=sds, color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("held-out accuracy on digits 0–9, %")
        ax.set_title("Merging A (0–4) and B (5–9), fine-tuned from one base", fontsize=9)
    S.write("merging", table, {"runs": runs, "epochs": epochs}, fig, args)
    return {"runs": runs, "table": table}


if __name__ == "__main__":
    main()
