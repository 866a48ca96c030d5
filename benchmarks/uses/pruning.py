"""Pruning by Fisher saliency ½ F_ii θ_i² (optimal brain damage) against magnitude, on the digits.

Per seed: train the MLP 64-100-100-10 (ReLU), estimate diag F on the training images with every
estimator, prune the weight matrices (biases kept) to 50/80/90/95 % sparsity, globally, without
retraining, and measure held-out accuracy. Baselines: magnitude, global and per layer.

    .venv/bin/python benchmarks/uses/pruning.py            # 5 seeds, writes docs/figures + results
    .venv/bin/python benchmarks/uses/pruning.py --quick    # smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _setup as S  # noqa: E402

from fisherlib.uses import apply_mask, magnitude_mask, prune_mask  # noqa: E402

SPARSITY = (0.5, 0.8, 0.9, 0.95)
WEIGHTS = ["0.weight", "2.weight", "4.weight"]
BASELINES = {"magnitude": "magnitude, global", "magnitude_layer": "magnitude, per layer"}


def run_seed(seed: int, epochs: int) -> tuple[dict, dict, float]:
    split = S.digits(seed)
    net = S.mlp(seed)
    S.train(net, split.x_train, split.y_train, epochs=epochs, seed=seed)
    dense = S.accuracy(net, split.x_test, split.y_test)
    ests, secs = S.estimates(net, split.x_train, split.y_train, seed=seed)
    acc = {k: [] for k in [*ests, *(k + "_layer" for k in ests), *BASELINES]}
    for s in SPARSITY:
        for key, est in ests.items():
            for suffix, scope in (("", "global"), ("_layer", "layer")):
                mask = prune_mask(est, net, s, leaves=WEIGHTS, scope=scope)
                acc[key + suffix].append(S.accuracy(net, split.x_test, split.y_test,
                                                    params=apply_mask(net, mask)))
        for key, scope in (("magnitude", "global"), ("magnitude_layer", "layer")):
            mask = magnitude_mask(net, s, scope=scope, leaves=WEIGHTS)
            acc[key].append(S.accuracy(net, split.x_test, split.y_test, params=apply_mask(net, mask)))
    return acc, secs, dense


def main(argv=None) -> None:
    args = S.parser(__doc__).parse_args(argv)
    S.setup_threads()
    seeds = 1 if args.quick else args.seeds
    epochs = 5 if args.quick else 40
    runs = [run_seed(seed, epochs) for seed in range(seeds)]
    keys = list(runs[0][0])
    labels = {**{k: v[0] + ", global" for k, v in S.ESTIMATORS.items()},
              **{k + "_layer": v[0] + ", per layer" for k, v in S.ESTIMATORS.items()}, **BASELINES}
    acc = {k: np.array([r[0][k] for r in runs]) for k in keys}  # (seeds, sparsities)
    dense = [r[2] for r in runs]
    secs = {k: float(np.median([r[1][k] for r in runs])) for k in S.ESTIMATORS}

    head = "| scores | " + " | ".join(f"{int(100 * s)} %" for s in SPARSITY) + " | diag F (s) |"
    rows = [head, "|" + "---|" * (len(SPARSITY) + 2)]
    for k in keys:
        cells = " | ".join(S.mean_sd(acc[k][:, j]) for j in range(len(SPARSITY)))
        t = f"{secs[k]:.2f}" if k in secs else ""
        rows.append(f"| {labels[k]} | {cells} | {t} |")
    table = (f"Held-out accuracy (%) after pruning the weight matrices (biases kept), "
             f"no retraining; mean ± sd over {seeds} seed(s); dense network: {S.mean_sd(dense)}.\n\n"
             + "\n".join(rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    x = np.array(SPARSITY) * 100
    for k in keys:
        if k.endswith("_layer") and k != "exact_layer" and k not in BASELINES:
            continue  # the figure: every estimator globally, exact and magnitude per layer
        style = "--" if k in BASELINES else (":" if k.endswith("_layer") else "-")
        m, sd = acc[k].mean(0) * 100, acc[k].std(0) * 100
        ax.errorbar(x, m, yerr=sd if seeds > 1 else None, fmt="o" + style, ms=3, capsize=2,
                    label=labels[k])
    ax.axhline(np.mean(dense) * 100, color="grey", lw=0.8, ls=":", label="dense")
    ax.set(xlabel="sparsity of the weight matrices (%)", ylabel="held-out accuracy (%)",
           title=f"Pruning without retraining, digits MLP ({seeds} seeds)")
    ax.legend(fontsize=7)
    data = {"sparsity": SPARSITY, "accuracy": {k: acc[k].tolist() for k in keys}, "dense": dense,
            "seconds": secs, "seeds": seeds, "epochs": epochs}
    S.write("pruning", table, data, fig, args)


if __name__ == "__main__":
    main()
