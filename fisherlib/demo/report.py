"""The demo's outputs: a printed table, ``report.md`` with PNG figures, ``report.json`` and
``fisher.npz`` (the arrays behind the figures)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .analysis import TARGETS, Analysis

FIGURES = {
    "lambda_max": "λ_max of every held-out output with its Theorem-1 bounds",
    "estimate_vs_exact": "Hutchinson estimate of diag F against the exact diagonal, per layer",
    "error_vs_probes": "Median relative error of diag F against the number of probes",
    "diag_by_layer": "Distribution of diag F per layer, between diag F_LB and diag F_UB",
}


def table(a: Analysis) -> str:
    """The compact summary printed by ``fisherlib demo``."""
    c = a.core
    holds = bool(np.all(c["lower"] <= c["lambda_max"] * (1 + 1e-12))
                 and np.all(c["lambda_max"] <= c["upper"] * (1 + 1e-12)))
    lines = [
        f"core space of {a.n_inputs} held-out outputs (C = {a.classes}), {a.core_seconds * 1e3:.0f} ms:",
        f"  λ_max  median {np.median(c['lambda_max']):.4f}   Theorem-1 bounds: lower "
        f"{np.median(c['lower']):.4f}, upper {np.median(c['upper']):.4f} (medians); "
        f"hold on every input: {'yes' if holds else 'NO'}",
        f"  trace  median {np.median(c['trace']):.4f}   trimmed norm median "
        f"{np.median(c['trimmed_norm']):.4f}   max p median {np.median(c['max_p']):.4f}",
        "",
        f"diag of the Fisher over {a.n_params:,} parameters (K = {a.probes} probes where random):",
        f"  {'estimator':<34} {'vs':>5} {'vectors':>8} {'time (s)':>9} {'med. rel. err':>14} {'within 2 SE':>12}",
    ]
    for r in a.results.values():
        w = "" if r.within_2se is None else f"{100 * r.within_2se:.0f} %"
        lines.append(f"  {r.run.label:<34} {r.run.target:>5} {r.vectors:>8,} {r.seconds:>9.3f} "
                     f"{r.median_rel_error:>14.3g} {w:>12}")
    lines.append("  (vectors: cotangents pulled back through the network; errors against the exact "
                 "F, F_UB or F_LB)")
    return "\n".join(lines)


def write(a: Analysis, out: Path, meta: dict) -> dict[str, Path]:
    """Write the figures, ``report.md``, ``report.json`` and ``fisher.npz`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(a, out)
    np.savez(out / "fisher.npz", **{f"core/{k}": v for k, v in a.core.items()},
             **{f"{key}/{layer}": v for key, r in a.results.items() for layer, v in r.value.items()},
             **{f"{key}/stderr/{layer}": v for key, r in a.results.items()
                for layer, v in r.stderr.items()})
    summary = {
        **meta,
        "n_inputs": a.n_inputs, "classes": a.classes, "n_params": a.n_params, "probes": a.probes,
        "layers": a.layers,
        "core": {k: {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}
                 for k, v in a.core.items()},
        "methods": {key: {"label": r.run.label, "target": r.run.target, "seconds": r.seconds,
                          "vectors": r.vectors, "median_rel_error": r.median_rel_error,
                          "within_2se": r.within_2se, "stderr_kind": r.stderr_kind,
                          "curve": r.curve}
                    for key, r in a.results.items()},
        "figures": {k: p.name for k, p in figures.items()},
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(_markdown(a, meta, figures))
    return {"report": out / "report.md", "json": out / "report.json", **figures}


# --------------------------------------------------------------------------- figures


def _figures(a: Analysis, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    paths = {}
    for name, draw in (("lambda_max", _fig_lambda), ("estimate_vs_exact", _fig_scatter),
                       ("error_vs_probes", _fig_curves), ("diag_by_layer", _fig_layers)):
        fig = draw(a, plt)
        fig.suptitle(FIGURES[name], fontsize=11)
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def _fig_lambda(a, plt):
    c = a.core
    order = np.argsort(c["lambda_max"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    i = np.arange(len(order))
    ax1.fill_between(i, c["lower"][order], c["upper"][order], alpha=0.3, label="Theorem-1 bounds")
    ax1.plot(i, c["lambda_max"][order], "k", lw=1.2, label="λ_max (secular equation)")
    ax1.set(xlabel="held-out inputs, sorted by λ_max", ylabel="eigenvalue", yscale="log")
    ax1.legend()
    bins = np.logspace(np.log10(max(c["lower"].min(), 1e-12)), np.log10(c["upper"].max()), 40)
    for key, label in (("lower", "lower bound"), ("lambda_max", "λ_max"), ("upper", "upper bound")):
        ax2.hist(c[key], bins=bins, histtype="step", lw=1.5, label=label)
    ax2.set(xscale="log", xlabel="value", ylabel="inputs")
    ax2.legend()
    return fig


def _fig_scatter(a, plt):
    exact, est = a.results["exact"], a.results["hutchinson"]
    fig, axes = _layer_axes(a, plt)
    for ax, layer in zip(axes, a.layers):
        x, y, s = (np.ravel(d[layer]) for d in (exact.value, est.value, est.stderr))
        keep = x > 1e-12 * x.max()
        x, y, s = x[keep], y[keep], s[keep]
        pick = np.random.default_rng(0).permutation(len(x))[:300]
        lo = np.maximum(y[pick] - s[pick], y[pick] * 1e-3)  # log axes: clip the lower bar
        ax.errorbar(x[pick], y[pick], yerr=[y[pick] - lo, s[pick]], fmt=".", ms=3, alpha=0.5,
                    elinewidth=0.6)
        span = [x.min(), x.max()]
        ax.plot(span, span, "k--", lw=1)
        ax.set(xscale="log", yscale="log", title=layer, xlabel="exact diag F")
    axes[0].set_ylabel(f"Hutchinson, K = {a.probes} (± 1 SE)")
    return fig


def _fig_curves(a, plt):
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    for key in ("hutchinson", "hutchinson_pe", "mc", "mc_pe", "upper", "lower"):
        r = a.results[key]
        if r.curve:
            k, e = zip(*r.curve)
            ax.plot(k, e, "o-", ms=3, label=f"{r.run.label} (vs {r.run.target})")
    emp = a.results["empirical"]
    ax.axhline(emp.median_rel_error, color="grey", ls=":", label="empirical Fisher (biased)")
    ks = np.array([r for r, _ in a.results["hutchinson"].curve] or [1, a.probes], dtype=float)
    # For a Gaussian error of std σ, the median of |error| is 0.674 σ; Hutchinson's σ/F <= √(2/K).
    ax.plot(ks, 0.674 * np.sqrt(2 / ks), "k--", lw=1, label="0.674·√(2/K): Hutchinson's bound")
    ax.set(xscale="log", yscale="log", xlabel="probes / sampled labels K",
           ylabel="median relative error of diag")
    ax.legend(fontsize=7)
    return fig


def _fig_layers(a, plt):
    fig, axes = _layer_axes(a, plt)
    for ax, layer in zip(axes, a.layers):
        vals = {name: np.ravel(a.results[TARGETS[t]].value[layer])
                for name, t in (("diag F_LB", "F_LB"), ("diag F", "F"), ("diag F_UB", "F_UB"))}
        pos = np.concatenate([v[v > 0] for v in vals.values()])
        bins = np.logspace(np.log10(pos.min()), np.log10(pos.max()), 30)
        for name, v in vals.items():
            ax.hist(v[v > 0], bins=bins, histtype="step", lw=1.4, label=name)
        ax.set(xscale="log", title=layer, xlabel="value")
    axes[0].set_ylabel("parameters")
    axes[0].legend(fontsize=7)
    return fig


def _layer_axes(a, plt):
    import matplotlib.ticker
    n = len(a.layers)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False,
                             layout="constrained")
    flat = list(axes.ravel())
    for ax in flat:  # minor-tick labels of log axes overlap in small panels
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


# --------------------------------------------------------------------------- markdown


def _markdown(a: Analysis, meta: dict, figures: dict[str, Path]) -> str:
    rows = "\n".join(
        f"| {r.run.label} | {r.run.target} | {r.vectors:,} | {r.seconds:.3f} | "
        f"{r.median_rel_error:.3g} | {'' if r.within_2se is None else f'{100 * r.within_2se:.0f} %'} |"
        for r in a.results.values())
    c = a.core
    core_rows = "\n".join(
        f"| {name} | {np.min(c[k]):.4g} | {np.median(c[k]):.4g} | {np.max(c[k]):.4g} |"
        for k, name in (("lambda_max", "λ_max"), ("lower", "Theorem-1 lower bound"),
                        ("upper", "Theorem-1 upper bound"), ("trace", "trace 1 − ‖p‖²"),
                        ("trimmed_norm", "trimmed norm"), ("max_p", "max p")))
    figs = "\n\n".join(f"### {FIGURES[k]}\n\n![{FIGURES[k]}]({p.name})" for k, p in figures.items())
    return f"""# fisherlib demo report

A {meta['model']} trained for {meta['train_seconds']:.1f} s on {meta['data']}
({meta['n_train']} training images; held-out accuracy {100 * meta['accuracy']:.1f} %), on the
**{meta['backend']}** backend ({meta['dtype']}). Everything below concerns the
{a.n_inputs} held-out inputs: the Fisher F = Σ_x J_xᵀ (diag(p) − ppᵀ) J_x of the
{a.n_params:,} parameters at the trained weights.

## Core space: the spectrum of diag(p) − ppᵀ per output

Computed in {a.core_seconds * 1e3:.0f} ms for all {a.n_inputs} outputs by the secular
equation (`fisherlib.simplex.eigvalsh`), with the Theorem-1 bounds
(`fisherlib.simplex.lambda_max_bounds`).

| quantity | min | median | max |
|---|---|---|---|
{core_rows}

## The diagonal of the Fisher, every way

Random estimators use K = {a.probes} probes (sampled labels for Monte-Carlo); errors are the
median over parameters of |estimate − exact| / exact, against the exact F, or against the
exact bound F_UB / F_LB for the bound estimators. "Within 2 SE" is the share of parameters whose
estimate lies within two of its own standard errors of the exact value (about 95 % when the
error bars are honest; fewer for a t-distribution with few probes). *Vectors* counts the
cotangent vectors pulled back through the network: Hutchinson needs K per batch of inputs, the
exact diagonal C per input.

| estimator | target | vectors | time (s) | median rel. error | within 2 SE |
|---|---|---|---|---|---|
{rows}

The empirical Fisher uses the observed labels instead of labels drawn from the model: it is
not an estimate of F and its error does not fall with more data.

## Figures

{figs}

Arrays behind the figures: `fisher.npz`; numbers: `report.json`.
"""
