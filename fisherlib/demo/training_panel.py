"""The demo's training panel: the same MLP trained by SGD, Adam and the natural gradient.

Every optimizer starts from the same weights and sees the same batches, through the adapter
protocol only (any backend). The natural gradient is fisherlib's: each step pulls the loss
cotangent and one Hutchinson probe back through the step's forward (:class:`~fisherlib.RunningFisher`,
quasi-diagonal terms with an EMA), then takes Ollivier's quasi-diagonal step
(:func:`fisherlib.natural.precondition`, ``kind="ollivier"``) with damping λ and a KL clip.
Writes ``training_curves.png``, a section of ``report.md`` and a ``"training"`` entry of
``report.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from ..estimators import RunningFisher
from ..estimators._estimate import _to_numpy
from ..natural import Curvature, precondition
from . import nets

FIGURE = "training_curves.png"
# (label, learning rate); tuned once on the digits, the same for every backend.
OPTIMIZERS = (("SGD", 0.5), ("Adam", 3e-3), ("natural gradient (Ollivier, fisherlib)", 0.05))
DAMPING, KL_CLIP = 1e-3, 1e-2
WARMUP = 3  # steps left out of the time per step


def _steps(net, x, y, epochs, batch, seed):
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(y) - batch + 1, batch):
            idx = order[i:i + batch]
            yield net.asarray(x[idx]), net.asarray(y[idx])


def train(name: str, sizes, x, y, *, optimizer: str, lr: float, epochs: int, seed: int,
          batch: int = 64) -> tuple[list[float], float]:
    """(mini-batch losses, seconds per step) of one optimizer from the demo's initial weights."""
    net = nets.build(name, sizes, seed)
    be, xp = net.backend, net.xp
    rf = RunningFisher("quasidiag", probes=1, decay=0.95, seed=seed, stderr=False, backend=be)
    leaves = [p for _, p in be.leaves(net.params)]
    m = [xp.zeros_like(p) for p in leaves]
    v = [xp.zeros_like(p) for p in leaves]
    losses, seconds, t = [], 0.0, 0

    def direction(g, terms):
        return precondition(g, Curvature(rf.layout, terms), "ollivier", DAMPING, backend=be)

    compile_ = getattr(be, "compile", None)  # JAX: one compiled step instead of op-by-op dispatch
    direction = compile_(direction) if compile_ is not None else direction
    for xb, yb in _steps(net, x, y, epochs, batch, seed):
        t0 = time.perf_counter()
        natural = optimizer.startswith("natural")
        loss, grads = rf.step(net.model, net.params, xb, yb, update=natural)
        g = [a for _, a in be.leaves(grads)]
        t += 1
        if natural:
            d = [a for _, a in be.leaves(direction(grads, rf.value))]
            gd = float(sum(xp.sum(a * b) for a, b in zip(g, d)))
            step = lr * min(1.0, math.sqrt(KL_CLIP / max(lr * lr * gd, 1e-30)))
            leaves = [p - step * a for p, a in zip(leaves, d)]
        elif optimizer == "Adam":
            b1, b2 = 0.9, 0.999
            step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            m = [b1 * a + (1 - b1) * b for a, b in zip(m, g)]
            v = [b2 * a + (1 - b2) * b * b for a, b in zip(v, g)]
            leaves = [p - step * a / (xp.sqrt(b) + 1e-8) for p, a, b in zip(leaves, m, v)]
        else:
            leaves = [p - lr * a for p, a in zip(leaves, g)]
        net.params = be.unflatten(net.params, list(leaves))
        losses.append(float(_to_numpy(loss)))
        if t > WARMUP:  # first steps: lazy initialisation and (JAX) compilation
            seconds += time.perf_counter() - t0
    return losses, seconds / max(t - WARMUP, 1)


def add(name: str, sizes, x, y, paths: dict, *, quick: bool, seed: int, echo=print) -> dict:
    """Train with each optimizer, print a line each, add the figure and section to the report."""
    epochs = 5 if quick else 8
    runs = {}
    for label, lr in OPTIMIZERS:
        losses, per_step = train(name, sizes, x, y, optimizer=label, lr=lr, epochs=epochs, seed=seed)
        runs[label] = {"lr": lr, "losses": losses, "seconds_per_step": per_step}
    sgd = runs["SGD"]["seconds_per_step"]
    per_epoch = len(runs["SGD"]["losses"]) // epochs
    echo("\ntraining the same MLP from the same weights on the same batches "
         f"({epochs} epochs of {per_epoch} steps):")
    for label, r in runs.items():
        last = float(np.mean(r["losses"][-per_epoch:]))
        r["last_epoch_loss"] = last
        echo(f"  {label:40s} lr {r['lr']:<6g} last-epoch loss {last:.4f}   "
             f"{r['seconds_per_step'] * 1e3:6.2f} ms/step ({r['seconds_per_step'] / sgd:.1f}× SGD)")
    out = Path(paths["report"]).parent
    _figure(runs, per_epoch, out / FIGURE)
    d = {"epochs": epochs, "steps_per_epoch": per_epoch, "damping": DAMPING, "kl_clip": KL_CLIP,
         "figure": FIGURE, "runs": runs}
    report = json.loads(Path(paths["json"]).read_text())
    report["training"] = d
    Path(paths["json"]).write_text(json.dumps(report, indent=1))
    with open(paths["report"], "a", encoding="utf-8") as f:
        f.write(_markdown(d, sgd))
    return d


def _figure(runs: dict, per_epoch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4), layout="constrained")
    for label, r in runs.items():
        loss = np.asarray(r["losses"])
        w = max(1, per_epoch // 4)  # a running mean over a quarter epoch
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(loss) + 1), smooth, label=label, lw=2 if label.startswith("natural") else 1.3)
    ax.set(yscale="log", xlabel="step (batch 64)", ylabel="mini-batch training loss (running mean)",
           title="8×8 digits, the demo's MLP: SGD, Adam, natural gradient")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(d: dict, sgd: float) -> str:
    rows = "\n".join(f"| {label} | {r['lr']:g} | {r['last_epoch_loss']:.4f} | {r['seconds_per_step'] * 1e3:.2f} "
                     f"({r['seconds_per_step'] / sgd:.1f}× SGD) |" for label, r in d["runs"].items())
    return f"""
## Training with the natural gradient

The demo's MLP trained again from the same initial weights on the same batches
({d['epochs']} epochs of {d['steps_per_epoch']} steps) by SGD, Adam and fisherlib's natural
gradient: one forward and the backward of [loss cotangent; one Hutchinson probe] through it per
step (`fisherlib.RunningFisher`, EMA of the quasi-diagonal Fisher terms), then Ollivier's
quasi-diagonal step (`fisherlib.natural.precondition(kind="ollivier")`, λ = {d['damping']:g},
KL clip {d['kl_clip']:g}). See `docs/natural-gradient.md`.

| optimizer | learning rate | last-epoch loss | time per step (ms) |
|---|---|---|---|
{rows}

![training curves]({d['figure']})
"""
