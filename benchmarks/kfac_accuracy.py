"""How good is K-FAC? Structured Fisher estimates against the exact dense Fisher, on small models.

Two small torch models on scikit-learn's 8×8 digits (shipped with scikit-learn, nothing
downloaded), trained a little (15 steps of full-batch Adam on 1,200 training images, to about
84 % test accuracy; ``--steps``) so that the Fisher is not the one at initialisation: an MLP
64-32-10 (2,410 parameters) and a CNN (1×8×8, 3×3 convolutions of 8 and 16 channels with ReLU
and 2×2 max-pooling, a linear head: 1,898 parameters). On N = 256 held-out images, in float64:

- F, the exact Fisher Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n, dense (P × P), from per-example
  Jacobians (``torch.func.jacrev``); its diagonal is checked against ``fisher(method="exact")``;
- F̂ for each structure, all from ``method="exact"`` (so that the error is the structure's,
  not a probe's): the diagonal, unit-wise blocks (``structure="blocks", blocks="unitwise"``),
  K-FAC (``structure="kfac"``, expand; for the CNN also reduce) and EK-FAC; and K-FAC from one
  Hutchinson probe per batch of 32 (the estimate's own noise on top of the structure);
  "none" is F̂ = 0 (the damped solve is then the gradient over λ), for scale;
- the error ‖F̂ − F‖_F / ‖F‖_F, and for g the gradient of the summed cross-entropy on those
  inputs, the relative error ‖(F̂ + λI)⁻¹g − (F + λI)⁻¹g‖ / ‖(F + λI)⁻¹g‖ at
  λ = α · tr F / P for α in 1e-3 … 1 (damping relative to F's mean eigenvalue), and the
  cosine between the two (what matters to a natural-gradient step, whose length the learning
  rate sets).

Every solve is dense (Cholesky of F̂ + λI); each Kronecker estimate's own ``solve`` is
checked against it. Torch runs on one thread.

    python benchmarks/kfac_accuracy.py --figure docs/figures/kfac-accuracy.png   # about 2 minutes
    python benchmarks/kfac_accuracy.py --quick     # random 8×8 images, tiny models (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0)
STEPS = 15  # full-batch Adam steps: the models fit the digits part-way (test accuracy ~84 %), not to zero loss


# --------------------------------------------------------------------------- models and data


def digits(quick: bool):
    """(x_train, y_train, x_test, y_test) as float64 torch tensors, pixels in [0, 1], images (1, 8, 8).

    ``quick``: random images and labels of the same shapes (a smoke run need not import scikit-learn).
    """
    import torch

    if quick:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(232, 1, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (232,), generator=g)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
        y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_train, n_test = (200, 32) if quick else (1200, 256)
    return x[:n_train], y[:n_train], x[n_train:n_train + n_test], y[n_train:n_train + n_test]


def build(kind: str, quick: bool):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "mlp":
        h = 8 if quick else 32
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, h), nn.Tanh(), nn.Linear(h, 10))
    else:
        a, b = (2, 4) if quick else (8, 16)
        model = nn.Sequential(nn.Conv2d(1, a, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(b * 2 * 2, 10))
    return model.double()


def train(model, x, y, steps: int, lr: float = 1e-2) -> float:
    """Full-batch Adam on the mean cross-entropy (written out: torch.optim imports its compiler,
    seconds of start-up); returns the last loss."""
    import torch

    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, a, b in zip(params, grads, m, v):
                a.mul_(0.9).add_(g, alpha=0.1)
                b.mul_(0.999).addcmul_(g, g, value=0.001)
                p.sub_(lr * (a / (1 - 0.9 ** t)) / ((b / (1 - 0.999 ** t)).sqrt() + 1e-8))
    model.eval()
    return float(loss.detach())


# --------------------------------------------------------------------------- dense matrices


def exact_fisher(model, x) -> np.ndarray:
    """The dense Fisher Σ_n J_nᵀ (diag p − ppᵀ) J_n (P × P), parameters in ``named_parameters`` order."""
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # {name: (N, C, *shape)}
    J = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=2)  # (N, C, P)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    sp = p.sqrt()
    B = torch.diag_embed(sp) - p[:, :, None] * sp[:, None, :]  # B Bᵀ = diag p − ppᵀ
    R = torch.einsum("ncP,nck->nkP", J, B).reshape(-1, J.shape[2])  # rows (Bᵀ J)
    return (R.T @ R).numpy()


def damped_solve(F: np.ndarray, g: np.ndarray, lam: float) -> np.ndarray:
    """(F + λI)⁻¹ g by Cholesky (F is psd), in torch under its one thread (NumPy's BLAS would
    take every core of a shared machine)."""
    import torch

    L = torch.linalg.cholesky(torch.as_tensor(F) + lam * torch.eye(F.shape[0], dtype=torch.float64))
    return torch.cholesky_solve(torch.as_tensor(g)[:, None], L)[:, 0].numpy()


def gradient(model, x, y) -> np.ndarray:
    import torch

    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy()
    model.zero_grad(set_to_none=True)
    return g


def offsets(model) -> dict:
    out, at = {}, 0
    for n, p in model.named_parameters():
        out[n] = (at, tuple(p.shape))
        at += p.numel()
    return out


def dense_diag(est, off, P) -> np.ndarray:
    d = np.zeros(P)
    for n, v in est.value.items():
        a, shape = off[n]
        d[a:a + int(np.prod(shape))] = np.asarray(v.detach()).ravel()
    return np.diag(d)


def dense_unitwise(est, off, P) -> np.ndarray:
    """Unit-wise blocks (units, size, size): per output unit, a weight row and its bias entry."""
    M = np.zeros((P, P))
    for n, blk in est.value.items():
        blk = np.asarray(blk.detach())
        a, shape = off[n]
        if blk.ndim == 2:  # a leaf without units: one block over the whole leaf
            idx = np.arange(a, a + int(np.prod(shape)))
            M[np.ix_(idx, idx)] = blk
            continue
        row = int(np.prod(shape[1:]))
        bias = n.rpartition(".")[0] + ".bias"
        for u in range(blk.shape[0]):
            idx = list(range(a + u * row, a + (u + 1) * row))
            if bias in off and blk.shape[1] == row + 1:
                idx.append(off[bias][0] + u)
            idx = np.asarray(idx)
            M[np.ix_(idx, idx)] = blk[u]
    return M


# --------------------------------------------------------------------------- one model


def estimates(kind, model, x, quick) -> dict:
    """{label: (dense F̂ (P × P), the estimate or None)} for every structure."""
    import warnings

    import fisherlib

    off = offsets(model)
    P = sum(p.numel() for p in model.parameters())
    batches = list(x.split(32 if quick else 64))
    warnings.filterwarnings("ignore", category=fisherlib.KroneckerFallbackWarning)
    diag = fisherlib.fisher(model, None, batches, method="exact")
    unit = fisherlib.fisher(model, None, batches, method="exact", structure="blocks", blocks="unitwise")
    kfac = fisherlib.fisher(model, None, batches, method="exact", structure="kfac")
    ekfac = fisherlib.fisher(model, None, batches, method="exact", structure="ekfac")
    out = {"none (F̂ = 0)": (np.zeros((P, P)), None),
           "diag": (dense_diag(diag, off, P), None),
           "unit-wise blocks": (dense_unitwise(unit, off, P), None),
           "K-FAC (expand)": (kfac.to_dense().numpy(), kfac)}
    if kind == "cnn":
        red = fisherlib.fisher(model, None, batches, method="exact", structure="kfac", kfac_approx="reduce")
        out["K-FAC (reduce)"] = (red.to_dense().numpy(), red)
    out["EK-FAC"] = (ekfac.to_dense().numpy(), ekfac)
    hut = fisherlib.fisher(model, None, list(x.split(32)), structure="kfac", probes=1, seed=0)
    out["K-FAC, 1 probe / 32 inputs"] = (hut.to_dense().numpy(), hut)
    return out, diag


def evaluate(kind, quick, steps) -> dict:
    import torch

    xtr, ytr, xte, yte = digits(quick)
    model = build(kind, quick)
    loss = train(model, xtr, ytr, 30 if quick else steps)
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).double().mean())
    P = sum(p.numel() for p in model.parameters())
    F = exact_fisher(model, xte)
    g = gradient(model, xte, yte)
    ests, diag = estimates(kind, model, xte, quick)
    ref_diag = np.concatenate([np.asarray(v.detach()).ravel() for v in diag.value.values()])
    assert np.allclose(np.diag(F), ref_diag, rtol=1e-8, atol=1e-12 * ref_diag.max()), \
        "the dense Fisher's diagonal disagrees with fisher(method='exact')"
    scale = np.trace(F) / P
    lams = [a * scale for a in ALPHAS]
    exact_solves = [damped_solve(F, g, lam) for lam in lams]
    rows = {}
    normF = np.linalg.norm(F)
    for label, (Fh, est) in ests.items():
        solves = [damped_solve(Fh, g, lam) for lam in lams]
        if est is not None:  # the estimate's own solve agrees with the dense one
            own = est.solve(torch.as_tensor(g), lams[1]).numpy()
            assert np.allclose(own, solves[1], rtol=1e-6, atol=1e-9 * np.abs(solves[1]).max()), label
        rows[label] = dict(
            fro=np.linalg.norm(Fh - F) / normF,
            solve=[np.linalg.norm(s - e) / np.linalg.norm(e) for s, e in zip(solves, exact_solves)],
            cos=[float(s @ e / (np.linalg.norm(s) * np.linalg.norm(e))) for s, e in zip(solves, exact_solves)])
    return dict(kind=kind, P=P, n=len(xte), loss=loss, acc=acc, rows=rows)


# --------------------------------------------------------------------------- report


NAMES = {"mlp": "MLP 64-32-10", "cnn": "CNN (8, 16 channels)"}


def table(res) -> str:
    head = "| structure | ‖F̂ − F‖_F / ‖F‖_F | " + " | ".join(f"λ = {a:g}·tr F/P" for a in ALPHAS) + " |"
    lines = [f"## {NAMES[res['kind']]} on the digits: P = {res['P']:,}, N = {res['n']} held-out inputs "
             f"(train loss {res['loss']:.3f}, test accuracy {res['acc']:.3f})", "",
             "damped solves: relative error of (F̂ + λI)⁻¹g (in brackets its cosine with (F + λI)⁻¹g)", "", head,
             "|---|" + "---:|" * (1 + len(ALPHAS))]
    for label, r in res["rows"].items():
        lines.append(f"| {label} | {r['fro']:.3f} | "
                     + " | ".join(f"{e:.3f} ({c:.3f})" for e, c in zip(r["solve"], r["cos"])) + " |")
    return "\n".join(lines)


def figure(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(results), figsize=(4.4 * (1 + len(results)), 4.4))
    labels = [k for k in results[0]["rows"] if k != "none (F̂ = 0)"]
    labels += [k for r in results for k in r["rows"] if k not in labels and k != "none (F̂ = 0)"]
    colors = {k: f"C{i}" for i, k in enumerate(labels)}
    ax = axes[0]
    width = 0.8 / len(results)
    for j, res in enumerate(results):
        xs = [i + (j - (len(results) - 1) / 2) * width for i, k in enumerate(labels) if k in res["rows"]]
        ys = [res["rows"][k]["fro"] for k in labels if k in res["rows"]]
        ax.bar(xs, ys, width, label=NAMES[res["kind"]], color=f"0.{3 + 3 * j}")
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(r"$\|\hat F - F\|_F \,/\, \|F\|_F$")
    ax.set_title("matrix error")
    ax.legend(fontsize=7)
    for ax, res in zip(axes[1:], results):
        for k in ["none (F̂ = 0)"] + labels:
            if k in res["rows"]:
                style = dict(color="k", ls=":") if k.startswith("none") else dict(color=colors[k], marker="o")
                label = r"none ($\hat F = 0$: the gradient)" if k.startswith("none") else k
                ax.plot(ALPHAS, res["rows"][k]["cos"], label=label, ms=3, **style)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel(r"$\lambda \,/\, (\mathrm{tr}\, F / P)$")
        ax.set_ylabel(r"cosine of $(\hat F + \lambda I)^{-1} g$ with $(F + \lambda I)^{-1} g$", fontsize=8)
        ax.set_title(f"damped solve, {NAMES[res['kind']]}")
    handles, names = axes[-1].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models and data (a smoke run)")
    ap.add_argument("--figure", default=None, help="write the figure to this path (PNG)")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    args = ap.parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print(f"# torch {torch.__version__}, float64; exact (dense) Fisher against each structure's estimate\n")
    try:
        results = [evaluate(kind, args.quick, args.steps) for kind in ("mlp", "cnn")]
    finally:
        torch.set_num_threads(threads)
    for res in results:
        print(table(res) + "\n")
    if args.figure:
        figure(results, args.figure)
        print(f"# figure: {args.figure}")
    print(f"# total {time.perf_counter() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
