"""Quantization on the digits: held-out accuracy at equal average bits, Fisher-allocated widths
per layer (Cramér–Rao / reverse water-filling, fisherlib.uses.allocate_bits) vs uniform widths.

Per seed: train the MLP 64-100-100-10 (ReLU), estimate diag F on the training images with every
estimator, allocate integer widths in [2, 8] to the six leaves (3 weight matrices, 3 biases) for
an average of 3 and 4 bits per parameter, quantize each leaf with the symmetric uniform
quantizer (range max |θ| per leaf), and measure held-out accuracy.

    .venv/bin/python benchmarks/uses/quantization.py            # 5 seeds, writes docs/figures + results
    .venv/bin/python benchmarks/uses/quantization.py --quick    # smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _setup as S  # noqa: E402

from fisherlib.uses import allocate_bits, quantize  # noqa: E402

BITS = (3, 4)  # at 2 bits on average every width is b_min = 2: nothing to allocate


def run_seed(seed: int, epochs: int) -> dict:
    split = S.digits(seed)
    net = S.mlp(seed)
    S.train(net, split.x_train, split.y_train, epochs=epochs, seed=seed)
    dense = S.accuracy(net, split.x_test, split.y_test)
    ests, secs = S.estimates(net, split.x_train, split.y_train, seed=seed)
    names = [n for n, _ in net.named_parameters()]
    sizes = {n: p.numel() for n, p in net.named_parameters()}
    acc, widths = {"uniform": []}, {}
    for b in BITS:
        q = quantize(net, {n: b for n in names})
        acc["uniform"].append(S.accuracy(net, split.x_test, split.y_test, params=q))
        for key, est in ests.items():
            w = allocate_bits(est, net, b, b_min=2, b_max=8)
            assert sum(w[n] * sizes[n] for n in names) <= b * sum(sizes.values())
            widths[(key, b)] = w
            acc.setdefault(key, []).append(
                S.accuracy(net, split.x_test, split.y_test, params=quantize(net, w)))
    return {"acc": acc, "dense": dense, "secs": secs, "widths": widths}


def main(argv=None) -> None:
    args = S.parser(__doc__).parse_args(argv)
    S.setup_threads()
    seeds = 1 if args.quick else args.seeds
    epochs = 5 if args.quick else 40
    runs = [run_seed(seed, epochs) for seed in range(seeds)]
    keys = list(runs[0]["acc"])
    labels = {"uniform": "uniform widths", **{k: f"Fisher-allocated: {v[0]}" for k, v in S.ESTIMATORS.items()}}
    acc = {k: np.array([r["acc"][k] for r in runs]) for k in keys}
    dense = [r["dense"] for r in runs]
    rows = ["| widths | " + " | ".join(f"{b} bits" for b in BITS) + " |", "|" + "---|" * (len(BITS) + 1)]
    for k in keys:
        rows.append(f"| {labels[k]} | " + " | ".join(S.mean_sd(acc[k][:, j]) for j in range(len(BITS))) + " |")
    names = list(runs[0]["widths"][("exact", BITS[0])])
    wrows = ["| estimator | b̄ | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for key in S.ESTIMATORS:
        for b in BITS:
            w = runs[0]["widths"][(key, b)]
            wrows.append(f"| {S.ESTIMATORS[key][0]} | {b} | " + " | ".join(str(w[n]) for n in names) + " |")
    table = (f"Held-out accuracy (%) after quantizing every leaf, at equal average bits per parameter; "
             f"mean ± sd over {seeds} seed(s); float32 network: {S.mean_sd(dense)}.\n\n"
             + "\n".join(rows) + "\n\nWidths allocated (seed 0):\n\n" + "\n".join(wrows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    for k in keys:
        m, sd = acc[k].mean(0) * 100, acc[k].std(0) * 100
        ax.errorbar(BITS, m, yerr=sd if seeds > 1 else None, fmt="o" + ("--" if k == "uniform" else "-"),
                    ms=3, capsize=2, label=labels[k])
    ax.axhline(np.mean(dense) * 100, color="grey", lw=0.8, ls=":", label="float32")
    ax.set(xlabel="average bits per parameter", ylabel="held-out accuracy (%)", xticks=BITS,
           title=f"Quantization at equal average bits, digits MLP ({seeds} seeds)")
    ax.legend(fontsize=7)
    data = {"bits": BITS, "accuracy": {k: acc[k].tolist() for k in keys}, "dense": dense,
            "widths_seed0": {f"{k}/{b}": w for (k, b), w in runs[0]["widths"].items()}, "seeds": seeds}
    S.write("quantization", table, data, fig, args)


if __name__ == "__main__":
    main()
