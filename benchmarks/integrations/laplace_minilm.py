"""Laplace approximations on MiniLM with fisherlib's curvature backend beside laplace-torch's.

The task is the MiniLM case study's (docs/case-study-minilm.md): the shipped all-MiniLM-L6-v2,
mean pooling, a linear head over the VADER lexicon's five valence classes. Per seed the 7,506
words are shuffled into 1,000 test, 300 validation and ``--train`` training words. The MAP
network (float64): the head fitted as a linear probe on the frozen encoder, then the last block
and the head fine-tuned on the training words (Adam, lr 3e-4, ``--epochs``), over the lower five
blocks' cached output (``benchmarks/uses/_minilm.py``). Then, on the training words:

- **head** (``subset_of_weights="last_layer"``, laplace's default subset: 1,925 parameters),
  ``hessian_structure="diag"`` and ``"full"``: fisherlib's backend (exact; Hutchinson K=1 and
  K=8 for diag) beside laplace's default backend (curvlinops' GGN) and BackPACK's GGN, whose H is
  compared with fisherlib's exact; GLM predictive with the probit link;
- **last block + head** (``subset_of_weights="all"`` over the 1.78 M trained parameters, diag):
  fisherlib's Hutchinson backend (K=1, K=8) on every training word; its exact backend and
  laplace's default are fitted on the first ``--exact-words`` words only, to compare their H and
  their time (laplace's default forms the Jacobian of every logit, N × 5 × 1.78 M numbers, in
  batches of 8); BackPACK's backend raises on the BERT block (a child module named ``output``
  clashes with the attribute its hooks write); MC predictive (``pred_type="nn"``, 32 samples).

The prior precision is tuned by laplace's marginal likelihood or by a grid search of the NLL on
the validation words (10^-2 … 10^6, 13 points); NLL, ECE (15 bins) and accuracy on the test words,
beside the MAP network's softmax.

    .venv/bin/python benchmarks/integrations/laplace_minilm.py            # 3 seeds, writes results
    .venv/bin/python benchmarks/integrations/laplace_minilm.py --quick    # smoke run
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
sys.path.insert(0, str(HERE))
import _minilm as T  # noqa: E402
import _setup as S  # noqa: E402
from laplace_digits import scores  # noqa: E402

from fisherlib.integrations.laplace import FisherlibCurvature, curvature  # noqa: E402 (imports laplace)
from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackGGN, CurvlinopsGGN  # noqa: E402

HEAD = {  # (label, backend, structures); fisherlib's exact backend first: the others' H is compared with it
    "fisherlib, exact": (FisherlibCurvature, ("diag", "full")),
    "fisherlib, Hutchinson K=1": (curvature(method="hutchinson", probes=1), ("diag",)),
    "fisherlib, Hutchinson K=8": (curvature(method="hutchinson", probes=8), ("diag",)),
    "laplace default (curvlinops GGN)": (CurvlinopsGGN, ("diag", "full")),
    "BackPACK GGN": (BackPackGGN, ("diag", "full")),
}
SAME_H = ("BackPACK GGN",)
BLOCK = {
    "fisherlib, Hutchinson K=1": curvature(method="hutchinson", probes=1),
    "fisherlib, Hutchinson K=8": curvature(method="hutchinson", probes=8),
}
SAMPLES = 32


def _loader(x, y, batch):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _fit(net, subset, structure, backend, loader):
    la = Laplace(net, "classification", subset_of_weights=subset, hessian_structure=structure, backend=backend)
    with warnings.catch_warnings():  # BackPACK's and laplace's notes
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        la.fit(loader)
    return la, time.perf_counter() - t0


def _predictive(la, x, pred, batch=250):
    kw = {"pred_type": "glm", "link_approx": "probit"} if pred == "glm" else \
         {"pred_type": "nn", "link_approx": "mc", "n_samples": SAMPLES}
    with torch.no_grad():
        return torch.cat([la(x[i:i + batch], **kw) for i in range(0, len(x), batch)])


def _tuned(la, prior, pred, val, xte, yte):
    """Scores of the predictive after tuning the prior precision by ``prior``."""
    la.prior_precision = 1.0
    kw = {"pred_type": "glm", "link_approx": "probit"} if pred == "glm" else \
         {"pred_type": "nn", "link_approx": "mc", "n_samples": SAMPLES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if prior == "marglik":
            la.optimize_prior_precision(method="marglik", **kw)
        else:  # the validation NLL over 10^-2 .. 10^6, 13 points
            torch.manual_seed(0)
            la.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=13, log_prior_prec_min=-2,
                                        log_prior_prec_max=6, progress_bar=False, **kw)
    torch.manual_seed(1)
    return {**scores(_predictive(la, xte, pred), yte), "prior": float(la.prior_precision.mean())}


def run_seed(seed: int, data: dict, *, n_train: int, epochs: int, n_test: int, n_val: int, exact_words: int,
             block: bool = True) -> dict:
    x, y = data["x"], data["y"]
    order = torch.as_tensor(np.random.default_rng(seed).permutation(len(x)))
    te, va, tr = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:n_test + n_val + n_train]
    net = T.Top(data["encoder"], 5, seed=seed).double().eval()
    T.fit_head(net, x[tr], y[tr], seed=seed)
    T.fine_tune(net, x[tr], y[tr], epochs=epochs, seed=seed, lr=3e-4)
    train, val = _loader(x[tr], y[tr], 100), _loader(x[va], y[va], 100)
    xte, yte = x[te], y[te]
    out = {"MAP": scores(torch.softmax(T.logits(net, xte), 1), yte)}
    for structure in ("diag", "full"):
        ref_H = None
        for name, (backend, structures) in HEAD.items():
            if structure not in structures:
                continue
            la, fit = _fit(net, "last_layer", structure, backend, train)
            if name == "fisherlib, exact":
                ref_H = la.H.clone()
            diff = float((la.H - ref_H).abs().max() / ref_H.abs().max())
            key = f"head, {structure}: {name}"
            if name in SAME_H:  # the exact GGN again: the same posterior, so only its fit is timed
                out[key] = {"fit_s": fit, "rel_diff_H": diff}
            else:
                for prior in ("marglik", "gridsearch"):
                    out[f"{key}, prior by {prior}"] = {**_tuned(la, prior, "glm", val, xte, yte), "fit_s": fit,
                                                       "rel_diff_H": diff}
            print(f"seed {seed} {key}: fit {fit:.2f} s, |H - H_exact| / max H = {diff:.1e}", flush=True)
    if not block:
        return out
    for name, backend in BLOCK.items():
        la, fit = _fit(net, "all", "diag", backend, train)
        for prior in ("marglik", "gridsearch"):
            out[f"block + head, diag: {name}, prior by {prior}"] = {**_tuned(la, prior, "nn", val, xte, yte),
                                                                    "fit_s": fit}
        print(f"seed {seed} block + head: {name}: fit {fit:.1f} s", flush=True)
    few = _loader(x[tr[:exact_words]], y[tr[:exact_words]], 8)
    la, fit = _fit(net, "all", "diag", FisherlibCurvature, few)
    ref_H = la.H.clone()
    out[f"block + head, diag, {exact_words} words: fisherlib, exact"] = {"fit_s": fit, "rel_diff_H": 0.0}
    la, fit = _fit(net, "all", "diag", CurvlinopsGGN, few)
    out[f"block + head, diag, {exact_words} words: laplace default (curvlinops GGN)"] = {
        "fit_s": fit, "rel_diff_H": float((la.H - ref_H).abs().max() / ref_H.abs().max())}
    try:  # on a copy: BackPACK's hooks stay on the modules it extended when it fails
        _fit(copy.deepcopy(net), "all", "diag", BackPackGGN, few)
        out["BackPACK, block + head"] = "fitted"
    except Exception as e:  # noqa: BLE001 - the failure is the measurement
        out["BackPACK, block + head"] = f"{type(e).__name__}: {e}"
    print(f"seed {seed}: BackPACK on the block: {out['BackPACK, block + head']}", flush=True)
    return out


def table(runs: list, meta: dict) -> str:
    lines = [f"MiniLM (all-MiniLM-L6-v2), VADER lexicon's 5 valence classes, float64; MAP: head probe, then the "
             f"last block and the head fine-tuned {meta['epochs']} epochs on {meta['n_train']} words; Laplace fitted "
             f"on those words, prior precision by marginal likelihood or by validation grid search; head: GLM "
             f"predictive (probit), last block + head: MC predictive ({SAMPLES} samples); {len(runs)} seed(s), "
             f"{meta['n_test']} held-out words (mean ± sd over seeds)", "",
             "| model | NLL | ECE, % | accuracy, % | prior precision (median) | fit, s (median) |",
             "|---|---:|---:|---:|---:|---:|"]
    for k in runs[0]:
        vals = [r[k] for r in runs]
        if isinstance(vals[0], str):
            continue
        fit = f"{np.median([v['fit_s'] for v in vals]):.2f}" if "fit_s" in vals[0] else ""
        if "nll" not in vals[0]:  # H and time only
            d = max(v["rel_diff_H"] for v in vals)
            what = "fisherlib's exact, the reference" if d == 0 else f"H equal to fisherlib's exact to {d:.0e}"
            lines.append(f"| {k} ({what}) | | | | | {fit} |")
            continue
        prior = f"{np.median([v['prior'] for v in vals]):.3g}" if "prior" in vals[0] else ""
        lines.append(f"| {k} | {S.mean_sd([v['nll'] for v in vals], 1.0, 3)} | {S.mean_sd([v['ece'] for v in vals])} | "
                     f"{S.mean_sd([v['acc'] for v in vals])} | {prior} | {fit} |")
    bp = [r.get("BackPACK, block + head") for r in runs if "BackPACK, block + head" in r]
    if bp:
        lines += ["", f"laplace's BackPACK backend on the last block + head: {bp[0]}"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train", type=int, default=2000, help="training words")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--exact-words", type=int, default=16,
                   help="words on which the block's exact H is fitted by fisherlib and laplace's default")
    p.add_argument("--no-block", action="store_true", help="the head only")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    S.setup_threads()
    seeds = 1 if args.quick else args.seeds
    n_train, epochs, n_test, n_val, exact = (64, 1, 64, 32, 8) if args.quick else \
        (args.train, args.epochs, 1000, 300, args.exact_words)
    t0 = time.perf_counter()
    encoder, tokenizer, words, classes = T.load()
    pick = np.arange(len(words))
    if args.quick:
        pick = np.random.default_rng(0).permutation(len(words))[:n_test + n_val + n_train]
    x = T.block_inputs(encoder, tokenizer, [words[i] for i in pick]).double()
    data = {"encoder": encoder, "x": x, "y": torch.as_tensor(classes[pick])}
    runs = [run_seed(s, data, n_train=n_train, epochs=epochs, n_test=n_test, n_val=n_val, exact_words=exact,
                     block=not args.no_block) for s in range(seeds)]
    meta = {"epochs": epochs, "n_train": n_train, "n_test": n_test, "n_val": n_val, "exact_words": exact,
            "seconds": time.perf_counter() - t0}
    text = table(runs, meta)
    S.write("laplace_minilm", text, {"runs": runs, **meta}, None, args, results=HERE / "results")
    print(f"whole run {meta['seconds']:.0f} s")
    return {"runs": runs, "table": text, **meta}


if __name__ == "__main__":
    main()
