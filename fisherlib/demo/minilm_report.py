"""The MiniLM case study's outputs: a printed table, ``report.md`` with PNG figures, ``report.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .minilm import RUNS, Analysis

FIGURES = {
    "minilm_densities": "Density of log10 diag entries per layer, every estimator on all held-out words",
    "minilm_vs_exact": "Per layer: each estimator against the exact diagonal it targets, and how tight "
                       "the exact bounds are",
    "minilm_timings": "Time of each estimator per batch, in training steps",
}
STYLE = {"hutchinson": ("F̂ (Hutchinson)", "C0", "-"), "upper": ("F̂_UB", "C3", "--"),
         "lower": ("F̂_LB", "C2", "--"), "mc": ("Monte-Carlo", "C1", "-."),
         "empirical": ("empirical", "C7", ":")}


def _cost(a: Analysis) -> dict[str, float]:
    """Seconds per batch of ``a.time_batch`` inputs: timed medians, exact ones scaled from the subset."""
    per = {k: a.timings[k] for k in RUNS}
    per.update({f"exact {k}": v / a.n_subset * a.time_batch for k, v in a.exact_seconds.items()})
    return per


def table(a: Analysis) -> str:
    """Estimators: time against a training step, error against the exact diagonal on the subset."""
    s, cost, step = a.scores, _cost(a), a.timings["train step"]
    lines = [f"{'estimator':<18} {'target':>6} {'s/batch':>8} {'x step':>7} {'whole run s':>12} "
             f"{'med.rel.err':>12} {'within 2 SE':>12}"]
    for key, (label, _, target) in RUNS.items():
        row = s[key]["all"]
        w = f"{100 * row['within_2se']:.0f} %" if "within_2se" in row else "—"
        lines.append(f"{label:<18} {target:>6} {cost[key]:>8.2f} {cost[key] / step:>7.1f} "
                     f"{a.seconds[key]:>12.1f} {row['median_rel_error']:>12.3g} {w:>12}")
    for key, sec in a.exact_seconds.items():
        c = cost[f"exact {key}"]
        lines.append(f"{'exact ' + key:<18} {key:>6} {c:>8.2f} {c / step:>7.1f} {sec:>12.1f} "
                     f"{0:>12.3g} {'—':>12}")
    lines.append(f"(s/batch: median of 3 interleaved rounds on {a.time_batch} inputs, exact rows "
                 f"scaled from one run on the subset; training step {step:.3f} s; whole run: "
                 f"{a.n_inputs} inputs, exact on {a.n_subset}; errors on those {a.n_subset})")
    return "\n".join(lines)


def readings(a: Analysis) -> list[str]:
    """Sentences the numbers support, computed from them."""
    s, layers = a.scores, a.layers
    emp = {x: s["empirical"][x]["median_ratio"] for x in layers}
    lo, hi = min(emp, key=emp.get), max(emp, key=emp.get)
    out = [f"The empirical Fisher is not F: the median ratio of its diagonal to the exact one runs "
           f"from {emp[lo]:.2g} ({lo}) to {emp[hi]:.2g} ({hi}); median relative error "
           f"{s['empirical']['all']['median_rel_error']:.2g} overall, against "
           f"{s['hutchinson']['all']['median_rel_error']:.2g} for Hutchinson with K = {a.probes}."]
    b = s["bounds"]
    lb = [x for x in layers if b[x]["lb_over_f"] >= 0.5]
    ub = [x for x in layers if b[x]["f_over_ub"] >= 0.5]
    out.append("F_LB holds at least half of diag F (median entry) in: "
               f"{', '.join(lb) if lb else 'no layer'}; F_UB is within a factor 2 of it in: "
               f"{', '.join(ub) if ub else 'no layer'}. Median F_LB/F over all entries "
               f"{b['all']['lb_over_f']:.2f}, median F/F_UB {b['all']['f_over_ub']:.2f}.")
    w = {k: s[k]["all"].get("within_2se") for k in ("hutchinson", "upper", "lower", "mc")}
    out.append("Share of entries within 2 standard errors of the exact value: "
               + ", ".join(f"{STYLE[k][0]} {100 * v:.0f} %" for k, v in w.items())
               + " (about 95 % for a Gaussian error; fewer where K is small and the estimate skewed).")
    t = {k: v / a.timings["train step"] for k, v in _cost(a).items()}
    out.append(f"Cost of a batch of {a.time_batch} in training steps: Hutchinson {t['hutchinson']:.1f}, "
               f"Monte-Carlo {t['mc']:.1f} (K = {a.probes} each), empirical {t['empirical']:.1f}, "
               f"exact F {t['exact F']:.0f} (per-example gradients: one per input, C per input).")
    return out


def write(a: Analysis, out: Path, meta: dict) -> dict[str, Path]:
    """Write the figures, ``report.md`` and ``report.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(a, out)
    summary = {**meta, "n_inputs": a.n_inputs, "n_subset": a.n_subset, "batch": a.batch, "probes": a.probes,
               "layers": a.layers, "n_params": a.n_params, "seconds": a.seconds,
               "exact_seconds": a.exact_seconds, "timings": a.timings, "time_batch": a.time_batch,
               "scores": a.scores, "readings": readings(a)}
    paths = {"json": out / "report.json", "report": out / "report.md"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=float))
    paths["report"].write_text(_markdown(a, meta, figures))
    return {**paths, **figures}


def _figures(a: Analysis, out: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib ships with the minilm extra
        return {}
    paths = {}
    for name, draw in (("minilm_densities", _fig_densities), ("minilm_vs_exact", _fig_vs_exact),
                       ("minilm_timings", _fig_timings)):
        fig = draw(a, plt)
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def _fig_densities(a, plt):
    cols = min(4, len(a.layers))
    rows = -(-len(a.layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, a.layers):
        logs = {k: np.log10(v[layer][v[layer] > 0]) for k, v in a.full.items()}
        pooled = np.concatenate([x for x in logs.values() if x.size])
        if pooled.size == 0:
            continue
        lo, hi = np.percentile(pooled, [0.5, 99.9])
        bins = np.linspace(lo - 0.2, hi + 0.2, 60)
        for key, x in logs.items():
            label, color, ls = STYLE[key]
            if x.size:
                ax.hist(x, bins=bins, density=True, histtype="step", color=color, ls=ls, lw=1.3, label=label)
        ax.set_title(f"{layer} ({a.n_params[layer]:,})", fontsize=9)
        ax.set_xlabel("log10 diag entry", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(a.layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"diag Fisher per layer, {a.n_inputs} held-out words, K = {a.probes}", fontsize=10)
    fig.tight_layout()
    return fig


def _fig_vs_exact(a, plt):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    x = np.arange(len(a.layers))
    for key in RUNS:
        label, color, ls = STYLE[key]
        ax1.plot(x, [a.scores[key][layer]["median_ratio"] for layer in a.layers], marker="o", color=color,
                 ls=ls, label=label)
    ax1.axhline(1.0, color="k", lw=0.6)
    ax1.set_yscale("log")
    ax1.set_ylabel("median of estimate / exact target")
    ax1.set_title(f"against the exact diagonal ({a.n_subset} words)", fontsize=9)
    b = a.scores["bounds"]
    ax2.plot(x, [b[layer]["lb_over_f"] for layer in a.layers], marker="v", color="C2",
             label="median F_LB / F")
    ax2.plot(x, [b[layer]["f_over_ub"] for layer in a.layers], marker="^", color="C3",
             label="median F / F_UB")
    ax2.plot(x, [b[layer]["trace_lb_over_f"] for layer in a.layers], ls=":", color="C2",
             label="tr F_LB / tr F")
    ax2.plot(x, [b[layer]["trace_f_over_ub"] for layer in a.layers], ls=":", color="C3",
             label="tr F / tr F_UB")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("tightness of the exact bounds (1 = tight)", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xticks(x, a.layers, rotation=30, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _fig_timings(a, plt):
    cost, step = _cost(a), a.timings["train step"]
    labels = [RUNS[k][0] if k in RUNS else k for k in cost]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh(labels[::-1], [v / step for v in cost.values()][::-1], color="C0")
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds per batch of {a.time_batch} / one training step ({step:.2f} s)")
    ax.axvline(1.0, color="k", lw=0.6)
    fig.tight_layout()
    return fig


def _markdown(a: Analysis, meta: dict, figures: dict[str, Path]) -> str:
    s = a.scores
    md = [
        "# Fisher of a pretrained transformer: all-MiniLM-L6-v2 on the VADER lexicon", "",
        f"- model: {meta['model']} ({meta['n_params_total']:,} parameters) + mean pooling + linear "
        f"head; Fisher of {meta['n_params_fisher']:,} of them (all but {', '.join(meta['frozen'])})",
        f"- data: {meta['data']}; head trained on {meta['n_train']} words "
        f"({meta['head_seconds']:.1f} s), held-out accuracy {100 * meta['accuracy']:.1f} %",
        f"- every estimator on {a.n_inputs} held-out words in batches of {a.batch}, K = {a.probes}; exact "
        f"diagonals of F, F_UB, F_LB on the first {a.n_subset}; torch threads "
        f"{meta['torch_threads']}" + (" (quick run)" if meta.get("quick") else ""), "",
        "## Estimators", "", "```text", table(a), "```", "",
        "## Per layer against the exact diagonal", "",
        "| layer | parameters | " + " | ".join(f"{STYLE[k][0]} med. rel. err" for k in RUNS)
        + " | empirical / F | F_LB / F | F / F_UB |",
        "|---|---:|" + "---:|" * (len(RUNS) + 3),
    ]
    for layer in [*a.layers, "all"]:
        b = s["bounds"][layer]
        n = sum(a.n_params.values()) if layer == "all" else a.n_params[layer]
        md.append(f"| {layer} | {n:,} | " + " | ".join(f"{s[k][layer]['median_rel_error']:.3g}" for k in RUNS)
                  + f" | {s['empirical'][layer]['median_ratio']:.3g} | {b['lb_over_f']:.3f} | "
                    f"{b['f_over_ub']:.3f} |")
    md += ["", "Ratios are medians over the entries with F_ii > 0.", "", "## Readings", ""]
    md += [f"- {r}" for r in readings(a)]
    md += ["", "## Figures", ""]
    for name, path in figures.items():
        md += [f"![{FIGURES[name]}]({Path(path).name})", "", f"*{FIGURES[name]}.*", ""]
    return "\n".join(md)
