"""``fisherlib demo``: the Fisher geometry of a small classifier trained on real digits.

Trains a small MLP for a few seconds on scikit-learn's 8×8 handwritten digits (shipped with
scikit-learn, nothing downloaded), then, on the held-out images, computes the core-space
spectrum of every output, the exact Fisher diagonal, the Hutchinson estimates with their error
bars, the exact and estimated bounds F_LB ⪯ F ⪯ F_UB, and the Monte-Carlo and empirical
Fisher, timing each; prints a table and writes a report with figures.

>>> from fisherlib.demo import run                         # doctest: +SKIP
>>> summary = run(backend="numpy", out="fisherlib-report")  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import analysis, data, nets, report, spectrum_panel, training_panel, uses_panel

__all__ = ["run"]

SIZES = (64, 48, 32, 10)


def run(backend: str | None = None, out: str | Path = "fisherlib-report", *, probes: int = 16,
        seed: int = 0, quick: bool = False, progress: bool = True, echo=print) -> dict:
    """Train, analyse, report; return the summary written to ``out/report.json``.

    Parameters
    ----------
    backend : {"torch", "jax", "numpy"}, optional
        Framework to run on; default: the first installed of torch, jax, numpy.
    out : path
        Directory for ``report.md``, the PNG figures, ``report.json`` and ``fisher.npz``.
    probes : int
        K, the probes (or sampled labels) of each random estimator in the table; the error
        curves go up to max(64, K) (16 with ``quick``).
    seed : int
        Seed of the data split, the initial weights, training and every probe.
    quick : bool
        A smaller run (fewer images, epochs and probes) for tests and smoke runs.
    progress : bool
        Show progress bars.
    echo : callable
        Where the printed table goes.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes: expected a positive integer, got {probes!r}")
    name = nets.pick_backend(backend)
    # Held-out sets of whole batches of 100: one input shape, so JAX compiles once.
    split = data.digits(seed, n_test=200 if quick else 500, limit=600 if quick else None)
    net = nets.build(name, SIZES, seed)
    echo(f"fisherlib demo: MLP {'-'.join(map(str, SIZES))} (tanh) on the 8×8 digits, "
         f"{name} backend; {len(split.y_train)} training, {len(split.y_test)} held-out images")

    t0 = time.perf_counter()
    losses = nets.train(net, split.x_train, split.y_train, epochs=8 if quick else 12, seed=seed,
                        progress=progress)
    train_seconds = time.perf_counter() - t0
    accuracy = float(np.mean(net.logits(split.x_test).argmax(axis=1) == split.y_test))
    echo(f"trained in {train_seconds:.1f} s: final loss {losses[-1]:.3f}, held-out accuracy "
         f"{100 * accuracy:.1f} %\n")

    max_probes = max(16 if quick else 64, probes)
    result = analysis.analyse(net, split.x_test, split.y_test, probes=probes, max_probes=max_probes,
                              seed=seed, repeats=1 if quick else 3,
                              progress=progress)
    echo(report.table(result))
    meta = {"backend": name, "dtype": str(net.asarray(np.zeros(1)).dtype),
            "model": f"MLP {'-'.join(map(str, SIZES))} (tanh)", "data": data.SOURCE,
            "n_train": int(len(split.y_train)), "accuracy": accuracy,
            "train_seconds": train_seconds, "final_loss": losses[-1], "seed": seed, "quick": quick}
    paths = report.write(result, Path(out), meta)
    # The panels append to the report: what the Fisher is for (fisherlib.uses: pruning curves),
    # the parameter-space spectrum (fisherlib.spectral), and training by SGD, Adam and the
    # natural gradient (fisherlib.natural).
    uses_panel.add(net, split.x_test, split.y_test, result, paths, echo=echo)
    spectrum_panel.add(net, split.x_test, result, paths, quick=quick, seed=seed, progress=progress, echo=echo)
    training_panel.add(name, SIZES, split.x_train, split.y_train, paths, quick=quick, seed=seed, echo=echo)
    figures = len(list(Path(paths["report"]).parent.glob("*.png")))
    echo(f"\nreport: {paths['report']} ({figures} figures beside it)")
    return json_summary(paths["json"])


def json_summary(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())
