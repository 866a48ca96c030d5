"""The demo's "what the Fisher is for" panel: pruning the trained MLP by Fisher saliency.

Uses the exact and Hutchinson diagonals the demo has already computed (no new Fisher pass):
prunes the weight matrices to a range of sparsities by optimal-brain-damage saliency ½ F_ii θ_i²
(:func:`fisherlib.uses.prune_mask`) and by magnitude, and measures held-out accuracy. Costs a
few forward passes. Writes ``uses_pruning.png``, a section of ``report.md`` and a ``"uses"``
entry of ``report.json``. The benchmarks in ``benchmarks/uses/`` measure this (and EWC and
quantization) over seeds; see docs/using-the-fisher.md.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..uses import apply_mask, magnitude_mask, prune_mask
from .analysis import Analysis
from .nets import Net

SPARSITY = (0.5, 0.7, 0.8, 0.9, 0.95)
FIGURE = "uses_pruning.png"
TITLE = "What the Fisher is for: pruning by Fisher saliency vs magnitude"


def pruning(net: Net, x: np.ndarray, y: np.ndarray, a: Analysis) -> dict:
    """Held-out accuracy after pruning the weight matrices (global ranking, no retraining)."""
    weights = [n for n, w in net.backend.leaves(net.params) if len(w.shape) >= 2]
    scores = {"exact": a.results["exact"].value, "hutchinson": a.results["hutchinson"].value}
    curves: dict[str, list[float]] = {k: [] for k in (*scores, "magnitude")}
    for s in SPARSITY:
        for key, diag in scores.items():
            curves[key].append(_accuracy(net, prune_mask(diag, net.params, s, leaves=weights), x, y))
        curves["magnitude"].append(_accuracy(net, magnitude_mask(net.params, s, leaves=weights), x, y))
    dense = float(np.mean(net.logits(x).argmax(axis=1) == y))
    return {"sparsity": list(SPARSITY), "accuracy": curves, "dense": dense, "leaves": weights,
            "probes": a.probes}


def table(p: dict) -> str:
    head = "".join(f"{int(100 * s):>7} %" for s in p["sparsity"])
    rows = [f"what the Fisher is for — pruning the weight matrices (global, no retraining); "
            f"held-out accuracy, dense {100 * p['dense']:.1f} %:", f"  {'sparsity':<28}{head}"]
    for key, label in _LABELS(p).items():
        rows.append(f"  {label:<28}" + "".join(f"{100 * v:>8.1f} " for v in p["accuracy"][key]))
    return "\n".join(rows)


def add(net: Net, x: np.ndarray, y: np.ndarray, a: Analysis, paths: dict, echo=print) -> dict:
    """Run the panel, print its table, add its figure and section to the report beside ``paths``."""
    p = pruning(net, x, y, a)
    echo("\n" + table(p))
    out = Path(paths["report"]).parent
    _figure(p, out / FIGURE)
    summary = json.loads(Path(paths["json"]).read_text())
    summary["uses"] = {"pruning": p, "figure": FIGURE}
    Path(paths["json"]).write_text(json.dumps(summary, indent=1))
    with open(paths["report"], "a", encoding="utf-8") as f:
        f.write(_markdown(p))
    return p


def _LABELS(p: dict) -> dict[str, str]:
    return {"exact": "saliency, exact F", "hutchinson": f"saliency, Hutchinson K={p['probes']}",
            "magnitude": "magnitude |θ|"}


def _accuracy(net: Net, mask, x, y) -> float:
    pruned = replace(net, params=apply_mask(net.params, mask))
    return float(np.mean(pruned.logits(x).argmax(axis=1) == y))


def _figure(p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    xs = 100 * np.asarray(p["sparsity"])
    for key, label in _LABELS(p).items():
        ax.plot(xs, 100 * np.asarray(p["accuracy"][key]), "o--" if key == "magnitude" else "o-",
                ms=4, label=label)
    ax.axhline(100 * p["dense"], color="grey", ls=":", lw=1, label="dense")
    ax.set(xlabel="sparsity of the weight matrices (%)", ylabel="held-out accuracy (%)")
    ax.legend(fontsize=8)
    fig.suptitle(TITLE, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _markdown(p: dict) -> str:
    head = " | ".join(f"{int(100 * s)} %" for s in p["sparsity"])
    rows = "\n".join(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in p["accuracy"][k]) + " |"
                     for k, label in _LABELS(p).items())
    return f"""
## {TITLE}

The weight matrices ({", ".join(p["leaves"])}) pruned to each sparsity by optimal-brain-damage
saliency ½ F_ii θ_i² (`fisherlib.uses.prune_mask`, one global ranking) or by magnitude, without
retraining; held-out accuracy in % (dense: {100 * p["dense"]:.1f} %). The saliencies reuse the
exact and Hutchinson diagonals above, computed on the held-out inputs (neither uses labels).
Over seeds, with more estimators and with EWC and quantization: docs/using-the-fisher.md.

| scores | {head} |
|---|{"---|" * len(p["sparsity"])}
{rows}

![{TITLE}]({FIGURE})
"""
