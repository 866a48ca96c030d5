"""Does the natural gradient help? Optimizers on the 8×8 digits (scikit-learn), MLP and CNN, 5 seeds.

Methods (torch, batch 64, the same batches for every method of a seed):

- **SGD**, **Adam** (torch.optim);
- **EF diag**: the diagonal *empirical* Fisher of the mini-batch gradient, v ← β v + (1−β) g²,
  step g / (v + λ) (FAdam's reading of Adam, without Adam's square root), same KL clip;
- **fisherlib diag / quasidiag / ollivier / unitwise**: ``fisherlib.natural.NaturalGradient``
  with one Hutchinson probe per step from the training step's own backward (true Fisher);
  "r=k": probes and a refreshed F̃ every k steps only (``refresh=k``), a plain backward and the
  cached factorisation of F̃ + λI on the steps between;
- **fisherlib kfac**: ``NaturalGradient(preconditioner="kfac")``, Kronecker factors from one
  Hutchinson probe per refresh (``fisher(structure="kfac")`` on the batch), their EMA and the
  π-split damped solve through cached eigendecompositions;
- **K-FAC (nngeometry)**: ``PMatKFAC`` of the current batch (closed-form expectation over the C
  classes) every 10 steps, its damped Kronecker solve every step (nngeometry's formula, with a
  float64 ``solve`` in place of its ``lstsq``, which fails inside MKL here). kfac-jax is not run: it is
  broken on the installed JAX (see ``docs/peers.md``).

Each method's learning rate (and damping) is picked on seed 0 from a small grid by the final
training loss after ``tune_steps``; seeds 1..5 are then run with it for ``steps`` steps. The
tables give the median over seeds of: steps and wall time to reach the target training loss
(the loss on the whole training set, checked every ``eval_every`` steps; "—" when not reached by
all seeds, with the count), the final training loss and held-out accuracy, and the time per
step against SGD's (evaluations excluded). Figures: ``docs/figures/natural_gradient_<model>.png``.

    python benchmarks/natural_gradient.py            # full run (about 10 minutes on 2 busy cores)
    python benchmarks/natural_gradient.py --quick    # a smoke test
    python benchmarks/natural_gradient.py --scaling standard --seeds 3 --target-loss 0.005 \\
        --methods "SGD,Adam,fisherlib ollivier r=10 docs,fisherlib ollivier r=10 rel,fisherlib default"
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


def data(scaling: str = "16"):
    """The digits split 1297 / 500; pixels divided by 16 (in [0, 1]) or standardised per pixel
    with the training set's mean and standard deviation (constant pixels left at 0)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    X, y = X[perm], y[perm]
    if scaling == "standard":
        mu, sd = X[:1297].mean(0), X[:1297].std(0)
        X = (X - mu) / np.where(sd > 0, sd, 1.0)
    elif scaling == "16":
        X = X / 16.0
    else:
        raise ValueError(f"--scaling: expected '16' or 'standard', got {scaling!r}")
    return X[:1297], y[:1297], X[1297:], y[1297:]


def model(kind: str, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10))


class EFDiag:
    """Diagonal empirical Fisher of the batch gradient: d = g / (EMA(g²) + λ), KL-clipped."""

    def __init__(self, net, lr, damping, decay=0.95, kl_clip=1e-2):
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.lr, self.damping, self.decay, self.kl_clip, self.t = lr, damping, decay, kl_clip, 0
        self.v = [p.detach() * 0 for p in self.params]

    def step(self, grads):
        import torch

        self.t += 1
        corr = 1 - self.decay ** self.t
        ds, gd = [], 0.0
        for g, v in zip(grads, self.v):
            v.mul_(self.decay).add_(g * g, alpha=1 - self.decay)
            d = g / (v / corr + self.damping)
            ds.append(d)
            gd += float(torch.sum(g * d))
        lr = self.lr * min(1.0, math.sqrt(self.kl_clip / max(self.lr ** 2 * gd, 1e-30)))
        with torch.no_grad():
            for p, d in zip(self.params, ds):
                p.add_(d, alpha=-lr)


class KFAC:
    """nngeometry's K-FAC: factors from the current batch every ``refresh`` steps, damped solve.

    The solve is nngeometry's ``PMatKFAC.solvePVec`` (π-split damping (A + √λ π I) ⊗ (G + √λ/π I))
    with ``torch.linalg.solve`` in float64 instead of its ``lstsq``, which failed inside MKL
    (SGELSY "parameter 4") on these runs, and π = 1 where a factor's trace is 0.
    """

    def _solve(self, vs, PVector):
        import torch

        vs_dict, out = vs.to_dict(), {}
        for layer_id, layer in self.F.generator.layer_collection.layers.items():
            vw = vs_dict[layer_id][0]
            v = vw.reshape(vw.shape[0], -1)
            if layer.bias is not None:
                v = torch.cat([v, vs_dict[layer_id][1].unsqueeze(1)], dim=1)
            a, g = (t.double() for t in self.F.data[layer_id])
            ta, tg = torch.trace(a), torch.trace(g)
            pi = float((ta / tg * g.shape[0] / a.shape[0]) ** 0.5) if ta > 0 and tg > 0 else 1.0
            r = self.damping ** 0.5
            a_reg = a + r * pi * torch.eye(a.shape[0], dtype=a.dtype)
            g_reg = g + r / pi * torch.eye(g.shape[0], dtype=g.dtype)
            sol = torch.linalg.solve(a_reg, torch.linalg.solve(g_reg, v.double()).t()).t().to(vw.dtype)
            sol = sol.contiguous()
            out[layer_id] = ((sol.reshape(vw.shape),) if layer.bias is None
                             else (sol[:, :-1].contiguous().reshape(vw.shape), sol[:, -1].contiguous()))
        return PVector(layer_collection=vs.layer_collection, dict_repr=out)

    def __init__(self, net, lr, damping, refresh=10):
        self.net, self.lr, self.damping, self.refresh, self.t, self.F = net, lr, damping, refresh, 0, None

    def step(self, x, y):
        import torch
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatKFAC, PVector

        if self.t % self.refresh == 0:
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
            self.F = FIM(self.net, loader, PMatKFAC, variant="classif_logits")
        self.t += 1
        d = self._solve(PVector.from_model_grad(self.net), PVector).to_torch()
        g = torch.cat([p.grad.reshape(-1) for p in self.net.parameters()])
        gd = float(g @ d)
        lr = self.lr * min(1.0, math.sqrt(1e-2 / max(self.lr ** 2 * gd, 1e-30)))
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(self.net.parameters()) - lr * d,
                                                self.net.parameters())


# name -> grid of settings (lr, damping)
GRIDS = {
    "SGD": [(0.1, 0), (0.3, 0), (1.0, 0)],
    "Adam": [(1e-3, 0), (3e-3, 0), (1e-2, 0)],
    "EF diag": [(0.01, 1e-3), (0.03, 1e-3), (0.1, 1e-2)],
    "fisherlib diag": [(0.03, 1e-3), (0.1, 1e-3), (0.1, 1e-2)],
    "fisherlib quasidiag": [(0.03, 1e-3), (0.1, 1e-3), (0.1, 1e-2)],
    "fisherlib ollivier": [(0.03, 1e-3), (0.1, 1e-3), (0.1, 1e-2)],
    "fisherlib unitwise": [(0.03, 1e-3), (0.1, 1e-3), (0.1, 1e-2)],
    # Probes every 5 or 10 steps; the steps between apply the cached (F̃ + λI)⁻¹ after a plain backward.
    "fisherlib ollivier r=5": [(0.03, 1e-3), (0.1, 1e-3), (0.1, 1e-2)],
    "fisherlib ollivier r=10": [(0.03, 1e-3), (0.1, 1e-3), (0.1, 1e-2)],
    "fisherlib unitwise r=10": [(0.03, 1e-3), (0.1, 1e-3), (0.1, 1e-2)],
    # "rel": relative_damping=True, λ_l = ρ · mean diag F̃ over each leaf; the grid is over (lr, ρ).
    "fisherlib ollivier r=10 rel": [(0.03, 0.1), (0.1, 0.1), (0.03, 1.0), (0.1, 1.0)],
    # The docs' recommended setting as it stood (absolute λ), untuned.
    "fisherlib ollivier r=10 docs": [(0.03, 1e-3)],
    # NaturalGradient(model) with every default, untuned; and the defaults before issue 23 (diag,
    # refresh=1, λ = 10⁻³, kl_clip = 10⁻³).
    "fisherlib default": [(None, None)],
    "fisherlib diag kl=0.001 @0.1/0.001": [(0.1, 1e-3)],
    # K-FAC's λ splits as √λ·π and √λ/π over its two factors: a wider range of it.
    "K-FAC (nngeometry)": [(0.03, 1e-3), (0.03, 1e-2), (0.1, 1e-2), (0.1, 1e-1)],
    # fisherlib's K-FAC: factors from one Hutchinson probe (true Fisher) per refresh, their EMA,
    # the same π-split damping; the same grid as nngeometry's.
    "fisherlib kfac": [(0.03, 1e-3), (0.03, 1e-2), (0.1, 1e-2), (0.1, 1e-1)],
    "fisherlib kfac r=10": [(0.03, 1e-3), (0.03, 1e-2), (0.1, 1e-2), (0.1, 1e-1)],
}


def grid(method):
    """The settings tried for ``method``: GRIDS', or one fixed (lr, λ) written "name @lr/λ"."""
    if "@" in method:
        lr, lam = method.rsplit("@", 1)[1].split("/")
        return [(float(lr), float(lam))]
    return GRIDS[method]


def run(method, kind, setting, seed, steps, eval_every, split):
    """Train; return (steps checked, train losses, held-out accuracies, seconds per step)."""
    import torch
    import torch.nn.functional as F

    from fisherlib.natural import NaturalGradient

    Xtr, ytr, Xte, yte = split
    net = model(kind, seed)
    lr, lam = setting
    params = [p for p in net.parameters()]
    if method == "SGD":
        opt = torch.optim.SGD(params, lr=lr)
    elif method == "Adam":
        opt = torch.optim.Adam(params, lr=lr)
    elif method == "EF diag":
        opt = EFDiag(net, lr, lam)
    elif method == "fisherlib default":
        opt = NaturalGradient(net, seed=seed)
    elif method.startswith("fisherlib"):
        _, kind_, *rest = method.split()
        refresh = next((int(r.removeprefix("r=")) for r in rest if r.startswith("r=")), 1)
        kl = next((float(r.removeprefix("kl=")) for r in rest if r.startswith("kl=")), 1e-2)
        opt = NaturalGradient(net, lr=lr, preconditioner=kind_, damping=lam, kl_clip=kl, refresh=refresh, seed=seed,
                              relative_damping="rel" in rest)
    else:
        opt = KFAC(net, lr, lam)
    rng = np.random.default_rng(seed)
    checked, losses, accs, seconds = [], [], [], 0.0
    t = 0
    while t < steps:
        for idx in np.array_split(rng.permutation(len(ytr)), len(ytr) // BATCH):
            if t % eval_every == 0:
                with torch.no_grad():
                    checked.append(t)
                    losses.append(float(F.cross_entropy(net(Xtr), ytr)))
                    accs.append(float((net(Xte).argmax(1) == yte).float().mean()))
            x, y = Xtr[idx], ytr[idx]
            t0 = time.perf_counter()
            if isinstance(opt, NaturalGradient):
                opt.backward(x, y)
                opt.step()
            elif isinstance(opt, EFDiag):
                loss = F.cross_entropy(net(x), y)
                opt.step(torch.autograd.grad(loss, params))
            else:
                for p in params:
                    p.grad = None
                F.cross_entropy(net(x), y).backward()
                opt.step(x, y) if isinstance(opt, KFAC) else opt.step()
            seconds += time.perf_counter() - t0
            t += 1
            if t >= steps:
                break
    with torch.no_grad():
        checked.append(t)
        losses.append(float(F.cross_entropy(net(Xtr), ytr)))
        accs.append(float((net(Xte).argmax(1) == yte).float().mean()))
    if not all(np.isfinite(losses)):
        losses = [x if np.isfinite(x) else float("inf") for x in losses]
    return checked, losses, accs, seconds / steps


def first_reach(checked, values, target, below=True):
    for t, v in zip(checked, values):
        if (v <= target) if below else (v >= target):
            return t
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=",".join(GRIDS))
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--scaling", default="16", choices=["16", "standard"],
                        help="pixels / 16 (default) or standardised per pixel")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 1..SEEDS after tuning on seed 0")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--target-loss", type=float, default=0.1)
    args = parser.parse_args(argv)
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    steps, tune_steps, seeds, eval_every = ((60, 30, [1, 2], 10) if args.quick else
                                            (args.steps, 150, list(range(1, args.seeds + 1)), 10))
    target_loss, target_acc = args.target_loss, 0.95
    Xtr, ytr, Xte, yte = data(args.scaling)
    split = (torch.tensor(Xtr, dtype=torch.float32), torch.tensor(ytr), torch.tensor(Xte, dtype=torch.float32),
             torch.tensor(yte))
    methods = [m for m in args.methods.split(",") if m]
    print(f"# Natural gradient on the 8×8 digits (pixels {'/ 16' if args.scaling == '16' else 'standardised'}): "
          f"{len(ytr)} training, {len(yte)} held-out images, batch {BATCH}, "
          f"{steps} steps, seeds {seeds}; torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}, "
          f"load {os.getloadavg()[0]:.1f}\n")
    curves = {}
    for kind in args.models.split(","):
        results = {}
        for method in methods:
            try:
                settings = grid(method)
                best = settings[0] if len(settings) == 1 else min(settings, key=lambda s: _tune(method, kind, s,
                                                                                            tune_steps, split))
                runs = [run(method, kind, best, seed, steps, eval_every, split) for seed in seeds]
            except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
                print(f"  {kind} {method}: failed ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            results[method] = (best, runs)
            print(f"  {kind} {method}: lr={best[0]}, damping={best[1]}, final loss "
                  f"{statistics.median(r[1][-1] for r in runs):.4f}", file=sys.stderr)
        curves[kind] = results
        print(f"## {kind.upper()} (target: training loss ≤ {target_loss}, held-out accuracy ≥ {target_acc:.0%})\n")
        print(table(results, target_loss, target_acc))
        print()
    if args.scaling == "16" and args.methods == ",".join(GRIDS):  # the docs' figure: the full default run
        plot(curves, target_loss, args.quick)


def _tune(method, kind, setting, steps, split):
    """Final training loss of seed 0 with ``setting``; inf when it diverges or fails."""
    try:
        return _final(run(method, kind, setting, 0, steps, steps, split))
    except Exception:  # noqa: BLE001 - a diverged run (NaN in a solver) loses the tuning
        return float("inf")


def _final(r):
    v = r[1][-1]
    return v if np.isfinite(v) else float("inf")


def table(results, target_loss, target_acc) -> str:
    sgd = statistics.median(r[3] for r in results["SGD"][1]) if "SGD" in results else None
    lines = ["| method | lr, λ | steps to loss | time to loss (s) | steps to acc. | final loss | held-out acc. | "
             "time/step vs SGD |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for method, (best, runs) in results.items():
        reach = [first_reach(r[0], r[1], target_loss) for r in runs]
        reach_acc = [first_reach(r[0], r[2], target_acc, below=False) for r in runs]
        per_step = statistics.median(r[3] for r in runs)

        def med(xs, scale=1.0):
            hit = [x for x in xs if x is not None]
            if len(hit) < len(xs):
                return f"— ({len(hit)}/{len(xs)})" if not hit else f"{statistics.median(hit) * scale:.0f} ({len(hit)}/{len(xs)})"
            return f"{statistics.median(hit) * scale:.0f}" if scale == 1.0 else f"{statistics.median(hit) * scale:.2f}"

        times = [None if s is None else s * r[3] for s, r in zip(reach, runs)]
        tl = [t for t in times if t is not None]
        time_s = (f"{statistics.median(tl):.2f}" + ("" if len(tl) == len(times) else f" ({len(tl)}/{len(times)})")) if tl else "—"
        setting = "defaults" if best[0] is None else f"{best[0]:g}, {best[1]:g}"
        lines.append(f"| {method} | {setting} | {med(reach)} | {time_s} | {med(reach_acc)} | "
                     f"{statistics.median(r[1][-1] for r in runs):.4f} | {statistics.median(r[2][-1] for r in runs):.3f} | "
                     f"{per_step / sgd:.2f}× |" if sgd else "")
    return "\n".join(lines)


def plot(curves, target_loss, quick):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ROOT / "docs" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (kind, results) in zip(axes[0], curves.items()):
        for i, (method, (_, runs)) in enumerate(results.items()):
            steps = runs[0][0]
            loss = np.median(np.array([r[1] for r in runs]), axis=0)
            ax.plot(steps, loss, label=method, color=f"C{i}" if i < 10 else "black",  # 11 methods, 10 colours
                    lw=2 if method.startswith("fisherlib") else 1.2,
                    ls=("-." if " r=" in method else "-") if method.startswith("fisherlib") else "--")
        ax.axhline(target_loss, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("step (batch 64)")
        ax.set_ylabel("training loss (median over seeds)")
        ax.set_title(f"8×8 digits, {kind.upper()}")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    name = "natural_gradient_quick.png" if quick else "natural_gradient.png"
    fig.savefig(out / name, dpi=110)
    print(f"figure: docs/figures/{name}")


if __name__ == "__main__":
    main()
