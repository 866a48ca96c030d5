"""Continual learning on the digits: task 1 = digits 0–4, task 2 = digits 5–9, two heads on one
trunk (task-incremental). Forgetting of task 1 with EWC from each Fisher estimator vs plain
fine-tuning, over a grid of λ.

Per seed: train the MLP 64-100-100-10 (ReLU) on task 1 (logits 0–4), estimate diag F of the
task-1 head on the task-1 training images (reduction="mean", so λ is per input, as in Kirkpatrick
et al. 2017), then train on task 2 (logits 5–9) with loss + (λ/2) Σ F_ii (θ_i − θ*_i)².
Forgetting = task-1 held-out accuracy before task 2 minus after.

    .venv/bin/python benchmarks/uses/continual.py            # 5 seeds, writes docs/figures + results
    .venv/bin/python benchmarks/uses/continual.py --quick    # smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _setup as S  # noqa: E402

from fisherlib.uses import EWC  # noqa: E402

LAMBDAS = (10.0, 100.0, 1000.0)


def run_seed(seed: int, epochs: int, lambdas) -> dict:
    split = S.digits(seed)
    t1 = split.y_train < 5
    t1_test, t2_test = split.y_test < 5, split.y_test >= 5
    x1, y1 = split.x_train[t1], split.y_train[t1]
    x2, y2 = split.x_train[~t1], split.y_train[~t1]
    net = S.mlp(seed)
    S.train(net, x1, y1, epochs=epochs, seed=seed, hi=5)
    before = S.accuracy(net, split.x_test[t1_test], split.y_test[t1_test], hi=5)
    ests, secs = S.estimates(S.Sliced(net, 0, 5), x1, y1, seed=seed, reduction="mean")
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def task2(penalty):
        net.load_state_dict(state)
        S.train(net, x2, y2, epochs=epochs, seed=seed + 1, lo=5, penalty=penalty)
        return (S.accuracy(net, split.x_test[t1_test], split.y_test[t1_test], hi=5),
                S.accuracy(net, split.x_test[t2_test], split.y_test[t2_test], lo=5))

    out = {"before": before, "secs": secs, "plain": task2(None)}
    for key, est in ests.items():
        for lam in lambdas:
            ewc = EWC(lam).add_task(est, _frozen(net, state))
            out[(key, lam)] = task2(ewc.penalty)
    return out


def _frozen(net, state):
    """The task-1 parameters θ* as a {name: tensor} dict (the anchor)."""
    names = [n for n, _ in net.named_parameters()]
    return {n: state[n] for n in names}


def main(argv=None) -> None:
    args = S.parser(__doc__).parse_args(argv)
    S.setup_threads()
    seeds = 1 if args.quick else args.seeds
    epochs = 5 if args.quick else 20
    lambdas = LAMBDAS[:2] if args.quick else LAMBDAS
    runs = [run_seed(seed, epochs, lambdas) for seed in range(seeds)]
    before = np.array([r["before"] for r in runs])
    labels = {k: v[0] for k, v in S.ESTIMATORS.items()}

    def stats(key):
        a1 = np.array([r[key][0] for r in runs])
        a2 = np.array([r[key][1] for r in runs])
        return before - a1, a2

    f0, p0 = stats("plain")
    rows = ["| method | λ | forgetting of task 1 | task-2 accuracy | mean of both tasks |",
            "|---|---|---|---|---|",
            f"| plain fine-tuning | 0 | {S.mean_sd(f0)} | {S.mean_sd(p0)} | "
            f"{S.mean_sd(((before - f0) + p0) / 2)} |"]
    data = {"before": before.tolist(), "plain": [f0.tolist(), p0.tolist()], "ewc": {}}
    for key in S.ESTIMATORS:
        for lam in lambdas:
            f, p = stats((key, lam))
            rows.append(f"| EWC, {labels[key]} | {lam:g} | {S.mean_sd(f)} | {S.mean_sd(p)} | "
                        f"{S.mean_sd(((before - f) + p) / 2)} |")
            data["ewc"][f"{key}/{lam:g}"] = [f.tolist(), p.tolist()]
    secs = {k: float(np.median([r["secs"][k] for r in runs])) for k in S.ESTIMATORS}
    data["seconds"] = secs
    table = (f"Task-incremental split digits (0–4, then 5–9; two heads), {epochs} epochs per task; "
             f"accuracies in %, mean ± sd over {seeds} seed(s); task-1 held-out accuracy before "
             f"task 2: {S.mean_sd(before)}. Fisher with reduction='mean' on the task-1 training "
             f"images.\n\n" + "\n".join(rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for key in S.ESTIMATORS:
        f = np.array([data["ewc"][f"{key}/{lam:g}"][0] for lam in lambdas]) * 100
        p = np.array([data["ewc"][f"{key}/{lam:g}"][1] for lam in lambdas]) * 100
        ax1.errorbar(lambdas, f.mean(1), yerr=f.std(1) if seeds > 1 else None, fmt="o-", ms=3,
                     capsize=2, label=labels[key])
        ax2.plot(p.mean(1), f.mean(1), "o-", ms=3, label=labels[key])
    for ax, x in ((ax1, None), (ax2, p0.mean() * 100)):
        if x is None:
            ax.axhline(f0.mean() * 100, color="k", ls="--", lw=1, label="plain fine-tuning")
        else:
            ax.plot([x], [f0.mean() * 100], "k*", ms=10, label="plain fine-tuning")
    ax1.set(xscale="log", xlabel="λ", ylabel="forgetting of task 1 (points of %)",
            title="Forgetting against λ")
    ax2.set(xlabel="task-2 accuracy (%)", ylabel="forgetting of task 1 (points of %)",
            title="Trade-off (each point one λ)")
    ax1.legend(fontsize=7)
    S.write("continual", table, data, fig, args)


if __name__ == "__main__":
    main()
