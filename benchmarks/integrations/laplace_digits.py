"""Laplace approximations on the digits with fisherlib's curvature backend beside laplace-torch's.

Per seed: the MLP 64-100-100-10 (ReLU, float64) is trained to a MAP estimate (Adam, 100 epochs
on 1,097 training images, no weight decay: an overconfident network), then a
diagonal and a Kronecker-factored ("kron", K-FAC) Laplace approximation are fitted on the
training images with each backend, its prior
precision tuned by the marginal likelihood (laplace's ``optimize_prior_precision``, 100 steps)
or by a grid search of the NLL on 200 validation images taken from the training set, and the GLM
predictive with the probit link is scored on 500 held-out images: negative
log-likelihood, expected calibration error (15 equal-width bins of the top probability) and
accuracy, beside the MAP network's softmax. Both "all weights" and "last layer" (laplace's
default subset).

    .venv/bin/python benchmarks/integrations/laplace_digits.py            # 3 seeds (docs: --seeds 2)
    .venv/bin/python benchmarks/integrations/laplace_digits.py --quick    # 1 seed, short training
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "uses"))
import _setup as S  # noqa: E402

from fisherlib.integrations.laplace import FisherlibCurvature, curvature  # noqa: E402 (imports laplace)
from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackGGN, CurvlinopsGGN  # noqa: E402

BACKENDS = {  # fisherlib's exact backend first: the others' H is compared with it
    "fisherlib, exact": FisherlibCurvature,
    "fisherlib, Hutchinson K=1": curvature(method="hutchinson", probes=1),
    "fisherlib, Hutchinson K=8": curvature(method="hutchinson", probes=8),
    "laplace default (curvlinops GGN)": CurvlinopsGGN,
    "BackPACK GGN": BackPackGGN,
}
SAME_H = ("BackPACK GGN",)
KRON_BACKENDS = {  # hessian_structure="kron": fisherlib's K-FAC beside laplace's default (curvlinops)
    "fisherlib K-FAC, exact": FisherlibCurvature,
    "fisherlib K-FAC, Hutchinson K=8": curvature(method="hutchinson", probes=8),
    "laplace default K-FAC (curvlinops)": CurvlinopsGGN,
}


def kron_diff(H, ref) -> float:
    """max over laplace's Kron factors of |F - F_ref| / max |F_ref|."""
    return max(float((a - b).abs().max() / b.abs().max()) for Fa, Fb in zip(H.kfacs, ref.kfacs) for a, b in zip(Fa, Fb))


def ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    conf, pred = probs.max(1)
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += float(m.float().mean()) * abs(float((pred[m] == y[m]).float().mean()) - float(conf[m].mean()))
    return total


def scores(probs, y) -> dict:
    nll = float(-torch.log(probs[torch.arange(len(y)), y].clamp_min(1e-12)).mean())
    return {"nll": nll, "ece": ece(probs, y), "acc": float((probs.argmax(1) == y).float().mean())}


def run_seed(seed: int, epochs: int) -> dict:
    split = S.digits(seed)
    xtr, ytr = split.x_train[200:].double(), split.y_train[200:]
    xte, yte = split.x_test.double(), split.y_test
    net = S.mlp(seed).double()
    S.train(net, xtr, ytr, epochs=epochs, seed=seed)
    net.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=100)
    xval, yval = split.x_train[:200].double(), split.y_train[:200]
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xval, yval), batch_size=100)
    with torch.no_grad():
        out = {"MAP": scores(torch.softmax(net(xte), 1), yte)}
    cases = [(subset, "diag", name, b) for subset in ("all", "last_layer") for name, b in BACKENDS.items()]
    cases += [(subset, "kron", name, b) for subset in ("all", "last_layer") for name, b in KRON_BACKENDS.items()]
    for subset, structure, name, backend in cases:
        # BackPACK extends the modules it fits in place, which torch.func then refuses: a copy each
        la = Laplace(copy.deepcopy(net), "classification", subset_of_weights=subset,
                     hessian_structure=structure, backend=backend)
        with warnings.catch_warnings():  # BackPACK's and laplace's notes
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            la.fit(loader)
            fit = time.perf_counter() - t0
            H = la.H if structure == "diag" else la.H_facs  # kron: the summed factors, before decomposing
            if name in ("fisherlib, exact", "fisherlib K-FAC, exact"):
                ref_H = copy.deepcopy(H)
            diff = float((H - ref_H).abs().max() / ref_H.abs().max()) if structure == "diag" else kron_diff(H, ref_H)
            if name in SAME_H:  # the exact GGN again: the same posterior, so only its fit is timed
                out[f"{subset}: {name}"] = {"fit_s": fit, "rel_diff_H": diff}
                print(f"seed {seed} {subset}: {name}: fit {fit:.2f} s, max |H - H_fisherlib| / max H = {diff:.1e}",
                      flush=True)
                continue
            for prior in ("marglik", "gridsearch"):
                la.prior_precision = 1.0
                if prior == "marglik":
                    la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
                else:  # the validation NLL over 10^-2 .. 10^6, 13 points
                    la.optimize_prior_precision(method="gridsearch", pred_type="glm", link_approx="probit",
                                                val_loader=val, grid_size=13, log_prior_prec_min=-2,
                                                log_prior_prec_max=6, progress_bar=False)
                with torch.no_grad():
                    probs = la(xte, pred_type="glm", link_approx="probit")
                out[f"{subset}: {name}, prior by {prior}"] = {**scores(probs, yte), "fit_s": fit,
                                                              "prior": float(la.prior_precision.mean()),
                                                              "rel_diff_H": diff}
                print(f"seed {seed} {subset}: {name}, {prior}: {out[f'{subset}: {name}, prior by {prior}']}",
                      flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = 1 if args.quick else args.seeds
    epochs = 3 if args.quick else 100
    runs = [run_seed(s, epochs) for s in range(seeds)]
    keys = list(runs[0])
    lines = [f"Digits MLP 64-100-100-10 (float64, {epochs} epochs), diagonal and Kronecker-factored (kron) Laplace, GLM predictive with probit "
             f"link, prior precision by marginal likelihood or by validation grid search; {seeds} seed(s), 500 "
             "held-out images (mean ± sd over seeds)", "",
             "| model | NLL | ECE, % | accuracy, % | prior precision (median) | fit, s (median) |",
             "|---|---:|---:|---:|---:|---:|"]

    def ms(vals, scale=1.0, digits=3):
        return S.mean_sd(vals, scale, digits)

    for k in keys:
        if "nll" not in runs[0][k]:  # a reference backend: its fit time and H only
            fit = f"{np.median([r[k]['fit_s'] for r in runs]):.2f}"
            d = max(r[k]["rel_diff_H"] for r in runs)
            lines.append(f"| {k} (H equal to fisherlib's exact to {d:.0e}: same posterior) | | | | | {fit} |")
            continue
        fit = f"{np.median([r[k]['fit_s'] for r in runs]):.2f}" if "fit_s" in runs[0][k] else ""
        prior = f"{np.median([r[k]['prior'] for r in runs]):.3g}" if "prior" in runs[0][k] else ""
        lines.append(f"| {k} | {ms([r[k]['nll'] for r in runs])} | {ms([r[k]['ece'] for r in runs], 100, 1)} | "
                     f"{ms([r[k]['acc'] for r in runs], 100, 1)} | {prior} | {fit} |")
    table = "\n".join(lines)
    S.write("laplace_digits", table, runs, None, args, results=HERE / "results")
    return {"runs": runs, "table": table}


if __name__ == "__main__":
    main()
