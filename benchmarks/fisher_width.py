"""Karakida, Akaho & Amari's mean-field claims on random networks of growing width.

A 2-hidden-layer tanh MLP D-M-M-C with random Gaussian weights W_l ~ N(0, σ_w²/fan_in),
biases N(0, σ_b²) (their scaling), on T random Gaussian inputs; F = (1/T) Σ_x J_xᵀ I(z_x) J_x
(the mean over inputs, as in the paper; I the softmax core-space FIM). For every width M the
script computes F's nonzero spectrum exactly through the T·C × T·C Gram matrix Bᵀ J Jᵀ B:
J Jᵀ (the network's tangent kernel) from each layer's input activations and back-propagated
output sensitivities, Σ_l (G_l G_lᵀ) ⊙ (H_l H_lᵀ + 1), never forming the P-dimensional
Jacobian. At the smallest width it checks this against ``fisherlib.spectral.fisher_spectrum``
(the library's own Gram route through per-example VJPs).

It prints m₁ = tr F / P, m₂ = ‖F‖_F² / P and λ_max per width with fitted exponents and writes
``docs/figures/fisher_width.png`` (the three against M) and ``docs/figures/fisher_density.png``
(the eigenvalue distribution at the smallest and largest widths).

    python benchmarks/fisher_width.py            # M = 64 ... 2048, T = 100, C = 10
    python benchmarks/fisher_width.py --quick    # M = 64 ... 256, T = 40 (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

D, C = 100, 10
SIGMA_W2, SIGMA_B2 = 3.0, 0.1  # an ordered-phase-free choice; any O(1) values show the same scaling


def network(M: int, seed: int):
    rng = np.random.default_rng(seed)
    sizes = [D, M, M, C]
    return [(rng.normal(0, np.sqrt(SIGMA_W2 / a), (b, a)), rng.normal(0, np.sqrt(SIGMA_B2), b))
            for a, b in zip(sizes[:-1], sizes[1:])]


def gram(params, x):
    """Bᵀ (J Jᵀ) B / T, (T·C, T·C), and P."""
    (W1, b1), (W2, b2), (W3, b3) = params
    h1 = np.tanh(x @ W1.T + b1)
    h2 = np.tanh(h1 @ W2.T + b2)
    z = h2 @ W3.T + b3
    T = len(x)
    g3 = np.broadcast_to(np.eye(C), (T, C, C))  # ∂z/∂a₃
    g2 = W3[None] * (1 - h2 ** 2)[:, None, :]  # ∂z/∂a₂ (T, C, M)
    g1 = (g2 @ W2) * (1 - h1 ** 2)[:, None, :]  # ∂z/∂a₁ (T, C, M)
    K = np.zeros((T * C, T * C))
    for g, h in ((g1, x), (g2, h1), (g3, h2)):
        gg = g.reshape(T * C, -1)
        K += (gg @ gg.T) * np.repeat(np.repeat(h @ h.T + 1, C, axis=0), C, axis=1)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    sp = np.sqrt(p)
    B = np.zeros((T * C, T * C))  # block diagonal: B_x = diag(√p) − p √pᵀ
    for n in range(T):
        B[n * C:(n + 1) * C, n * C:(n + 1) * C] = np.diag(sp[n]) - np.outer(p[n], sp[n])
    P = sum(W.size + b.size for W, b in params)
    return B.T @ K @ B / T, P


def spectrum(M: int, T: int, seed: int):
    x = np.random.default_rng(1000 + seed).normal(size=(T, D))
    G, P = gram(network(M, seed), x)
    ev = np.clip(np.linalg.eigvalsh((G + G.T) / 2), 0, None)[::-1]
    return ev, P, x


def check_against_fisherlib(M: int, T: int, seed: int) -> float:
    from fisherlib.models import MLP
    from fisherlib.spectral import fisher_spectrum

    ev, P, x = spectrum(M, T, seed)
    params = network(M, seed)
    tree = {f"{i}.{k}": v for i, (W, b) in enumerate(params) for k, v in (("weight", W), ("bias", b))}
    s = fisher_spectrum(MLP([D, M, M, C]), tree, x, k=3, method="exact", bounds=False, reduction="mean")
    assert s.n_params == P
    err = float(np.max(np.abs(s.eigenvalues - ev[:3]) / ev[:3]))
    assert err < 1e-8 and abs(s.m1 - ev.sum() / P) < 1e-8 * s.m1, (s.eigenvalues, ev[:3])
    return err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3, help="random networks per width")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"))
    args = ap.parse_args(argv)
    widths = [64, 128, 256] if args.quick else [64, 128, 256, 512, 1024, 2048]
    T = 40 if args.quick else 100
    seeds = 1 if args.quick else args.seeds
    err = check_against_fisherlib(widths[0], min(T, 20), 0)
    print(f"check: the Gram route agrees with fisherlib.spectral.fisher_spectrum at M = {widths[0]} "
          f"(max relative error of the top 3 eigenvalues {err:.1e})\n")
    print(f"tanh MLP {D}-M-M-{C}, W ~ N(0, {SIGMA_W2}/fan_in), b ~ N(0, {SIGMA_B2}), T = {T} Gaussian "
          f"inputs, F = mean over inputs; {seeds} networks per width (mean ± spread)")
    print(f"{'M':>6} {'P':>11} {'m1':>10} {'m2':>10} {'λ_max':>10} {'λ_max/m1':>10} {'rank<=T(C-1)':>12} "
          f"{'< 1e-3 λmax':>12} {'s':>6}")
    rows, dens = [], {}
    for M in widths:
        t0 = time.perf_counter()
        stats = []
        for s in range(seeds):
            ev, P, _ = spectrum(M, T, s)
            stats.append((ev.sum() / P, np.sum(ev ** 2) / P, ev[0],
                          1 - np.sum(ev >= 1e-3 * ev[0]) / P))
            if s == 0:
                dens[M] = (ev, P)
        m1, m2, lam, flat = np.mean(stats, axis=0)
        rows.append((M, P, m1, m2, lam, np.std([r[2] for r in stats])))
        print(f"{M:>6} {P:>11,} {m1:>10.3e} {m2:>10.3e} {lam:>10.3f} {lam / m1:>10.3g} "
              f"{T * (C - 1):>12} {100 * flat:>11.3f}% {time.perf_counter() - t0:>6.1f}")
    Ms = np.array([r[0] for r in rows], dtype=float)
    slopes = {name: np.polyfit(np.log(Ms), np.log([r[i] for r in rows]), 1)[0]
              for name, i in (("m1", 2), ("m2", 3), ("λ_max", 4))}
    print("\nfitted exponents in M (log-log):  " + "   ".join(f"{k} ~ M^{v:+.2f}" for k, v in slopes.items()))
    print("source (Karakida et al. 2019, Theorem 1): m1 ~ M^-1, m2 ~ M^0, λ_max ~ M^+1")
    _figures(rows, dens, slopes, T, args.out)
    return 0


def _figures(rows, dens, slopes, T, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    Ms = np.array([r[0] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    for i, name, mark in ((2, "m₁ = tr F / P", "o"), (3, "m₂ = ‖F‖²_F / P", "s"), (4, "λ_max", "^")):
        key = {2: "m1", 3: "m2", 4: "λ_max"}[i]
        y = np.array([r[i] for r in rows])
        ax.plot(Ms, y, mark + "-", label=f"{name}  (slope {slopes[key]:+.2f})")
    for slope, y0, style in ((-1, rows[0][2], ":"), (0, rows[0][3], ":"), (1, rows[0][4], ":")):
        ax.plot(Ms, y0 * (Ms / Ms[0]) ** slope, "k" + style, lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="hidden width M", ylabel="value",
           title=f"Random tanh MLPs {D}-M-M-{C}, T = {T} inputs (dotted: M⁻¹, M⁰, M¹)")
    ax.set_xticks(Ms, [str(int(m)) for m in Ms])
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(out, "fisher_width.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    lo = min(max(ev[ev > 0].min(), ev[0] * 1e-8) for ev, _ in dens.values())
    hi = max(ev[0] for ev, _ in dens.values())
    bins = np.logspace(np.log10(lo), np.log10(hi) + 0.05, 50)
    for color, M in (("C0", min(dens)), ("C1", max(dens))):
        ev, P = dens[M]
        ax.hist(ev[ev > lo], bins=bins, weights=np.full(np.sum(ev > lo), 1 / P), histtype="step", lw=1.5,
                color=color, label=f"M = {M}: {100 * (1 - np.sum(ev > lo) / P):.2f} % of the P = {P:,} "
                                   f"eigenvalues are below {lo:.0e} (not shown)")
        ax.axvline(ev[0], ls="--", lw=0.8, color=color)
    ax.set(xscale="log", yscale="log", xlabel="eigenvalue of F", ylabel="share of the P eigenvalues",
           title="Eigenvalues at the narrowest and widest network (dashed: λ_max)")
    ax.legend(fontsize=7, loc="lower left")
    fig.savefig(os.path.join(out, "fisher_density.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
