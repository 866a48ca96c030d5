"""The demo's parameter-space spectrum panel: λ_max(F), m₁, m₂, 2/λ_max and the eigenvalue density.

Runs :func:`fisherlib.spectral.fisher_spectrum` on the held-out inputs of the trained MLP with
``reduction="mean"`` (F / N, the Fisher of the mean cross-entropy, so that 2/λ_max is a step
size for gradient descent on the mean loss): Lanczos for λ_max with its residual and the
brackets λ_max(F_LB) ≤ λ_max(F) ≤ λ_max(F_UB), stochastic Lanczos quadrature for the density
and Hutchinson's m₁ and m₂ with standard errors. m₁ is checked against the exact trace the demo
already has (the sum of the exact diagonal). Writes ``spectrum_density.png``, a section of
``report.md`` and a ``"spectrum"`` entry of ``report.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..spectral import FisherSpectrum, fisher_spectrum
from .analysis import Analysis
from .nets import Net

FIGURE = "spectrum_density.png"
TITLE = "Eigenvalue density of the Fisher on the parameter space (stochastic Lanczos quadrature)"


def spectrum(net: Net, x: np.ndarray, *, quick: bool, seed: int, batch: int = 100,
             progress: bool = False) -> FisherSpectrum:
    """fisher_spectrum of F / N on the inputs ``x`` (batches of ``batch``)."""
    batches = [net.asarray(x[i:i + batch]) for i in range(0, len(x), batch)]
    return fisher_spectrum(net.model, net.params, batches, method="estimate", reduction="mean",
                           probes=8 if quick else 16, slq_steps=20 if quick else 40,
                           max_steps=60 if quick else 100, seed=seed, progress=progress)


def summary(s: FisherSpectrum, exact_trace: float | None) -> dict:
    """The numbers of the panel (JSON-ready)."""
    d = s.as_dict()
    d["flat_share"] = s.density.mass_below(1e-3 * s.lambda_max)  # eigenvalues below 1e-3 λ_max
    if exact_trace is not None:
        d["m1_exact"] = exact_trace / s.n_params
    d["lr_caveat"] = s.lr_caveat
    return d


def table(d: dict) -> str:
    lo, hi = d["lambda_max_lower"], d["lambda_max_upper"]
    lines = [
        f"spectrum of F / N over the {d['n_params']:,} parameters ({d['n_inputs']} held-out inputs, "
        f"{d['products']} F·v products, {d['seconds']:.1f} s):",
        f"  λ_max(F) = {d['lambda_max']:.4g} (Lanczos residual {d['residuals'][0]:.1g});  "
        f"brackets λ_max(F_LB) = {lo:.4g} ≤ λ_max ≤ λ_max(F_UB) = {hi:.4g};  tr F = {d['trace']:.4g}",
        f"  m₁ = tr F / P = {d['m1']:.4g} ± {d['m1_stderr']:.2g}"
        + (f" (exact {d['m1_exact']:.4g})" if "m1_exact" in d else "")
        + f";  m₂ = ‖F‖²_F / P = {d['m2']:.4g} ± {d['m2_stderr']:.2g};  "
        f"{100 * d['flat_share']:.1f} % of the eigenvalues below 10⁻³ λ_max",
        f"  learning-rate bound for gradient descent on the mean loss: 2/λ_max = {d['lr_max']:.3g}"
        " (exact for the loss Hessian; ≈ F near a minimum)",
    ]
    return "\n".join(lines)


def add(net: Net, x: np.ndarray, a: Analysis, paths: dict, *, quick: bool, seed: int,
        progress: bool = False, echo=print) -> dict:
    """Run the panel, print its lines, add its figure and section to the report beside ``paths``."""
    s = spectrum(net, x, quick=quick, seed=seed, progress=progress)
    exact = a.results.get("exact")
    trace = None
    if exact is not None:  # the exact diagonal of the summed F; the panel's F is the mean
        trace = float(sum(np.sum(v) for v in exact.value.values())) / a.n_inputs
    d = summary(s, trace)
    echo("\n" + table(d))
    out = Path(paths["report"]).parent
    _figure(s, out / FIGURE)
    d["figure"] = FIGURE
    report = json.loads(Path(paths["json"]).read_text())
    report["spectrum"] = d
    Path(paths["json"]).write_text(json.dumps(report, indent=1))
    with open(paths["report"], "a", encoding="utf-8") as f:
        f.write(_markdown(d))
    return d


def _figure(s: FisherSpectrum, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = s.lambda_max
    lo = lam * 1e-7
    bins = np.logspace(np.log10(lo), np.log10(lam) + 0.1, 50)
    share = s.density.histogram(bins)
    fig, ax = plt.subplots(figsize=(6.8, 4.2), layout="constrained")
    ax.stairs(share, bins, fill=True, alpha=0.4,
              label="share of the P eigenvalues per bin (SLQ nodes: each\nstands for a cluster; the lowest for the flat directions)")
    ax.axvline(lam, color="k", lw=1.2, label=f"λ_max = {lam:.3g} (Lanczos)")
    ax.axvspan(s.lambda_max_lower, s.lambda_max_upper, color="C1", alpha=0.2,
               label="[λ_max(F_LB), λ_max(F_UB)]")
    ax.axvline(s.m1, color="C2", ls="--", label=f"mean eigenvalue m₁ = {s.m1:.2g}")
    flat = s.density.mass_below(1e-3 * lam)
    ax.set(xscale="log", yscale="log", xlabel="eigenvalue of F / N", ylabel="share of eigenvalues",
           title=f"{100 * flat:.1f} % of the eigenvalues lie below 10⁻³ λ_max; "
                 f"{100 * s.density.mass_below(lo):.1f} % below {lo:.0e} (not shown)")
    ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(TITLE, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(d: dict) -> str:
    exact = f" (exact, from the exact diagonal: {d['m1_exact']:.4g})" if "m1_exact" in d else ""
    return f"""
## The spectrum of the Fisher on the parameter space

`fisherlib.spectral.fisher_spectrum` on the {d['n_inputs']} held-out inputs, with F / N (the
Fisher of the mean cross-entropy), {d['products']} matrix-free products F·v in {d['seconds']:.1f} s:

| statistic | value |
|---|---|
| λ_max(F), Lanczos | {d['lambda_max']:.4g} (residual ‖Fv − λv‖ = {d['residuals'][0]:.1g}) |
| brackets λ_max(F_LB) ≤ λ_max(F) ≤ λ_max(F_UB) | {d['lambda_max_lower']:.4g} ≤ λ_max ≤ {d['lambda_max_upper']:.4g} |
| tr F (≥ λ_max) | {d['trace']:.4g} ± {d['trace_stderr']:.2g} |
| m₁ = tr F / P | {d['m1']:.4g} ± {d['m1_stderr']:.2g}{exact} |
| m₂ = ‖F‖²_F / P | {d['m2']:.4g} ± {d['m2_stderr']:.2g} |
| share of eigenvalues below 10⁻³ λ_max | {100 * d['flat_share']:.1f} % |
| learning-rate bound 2/λ_max | {d['lr_max']:.3g} |

{d['lr_caveat']}

![{TITLE}]({d['figure']})
"""
