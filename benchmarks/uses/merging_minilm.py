"""Fisher merging on MiniLM: two models fine-tuned from the shipped all-MiniLM-L6-v2 on two tasks
built from the shipped VADER lexicon, merged into one; accuracy on each task and on the union,
against plain averaging and task arithmetic, with each Fisher estimator.

The tasks, on the lexicon's non-neutral words (mean rating outside [-0.5, 0.5): 6,708 of 7,506,
the case study's classes 0, 1, 3, 4):

- A, polarity: negative or positive (44 % positive);
- B, intensity: mild or strong ("very negative" or "very positive", 31 %);
- the union: both at once, i.e. the four classes very negative, negative, positive, very positive
  (a word counts as right when the merged model gets both its polarity and its intensity).

Per seed the words are shuffled and split into 1,000 test, 300 validation and two disjoint sets of
``--train`` training words, one per task. The model is the encoder's last block (1.77 M
parameters, copied) over the frozen lower five blocks' cached output, mean pooling and a head of
four logits: 0–1 for A, 2–3 for B (two task heads on one trunk, Matena & Raffel's multi-task
setting). The base ("pre-trained" initialisation) is the packaged encoder with both heads fitted
as linear probes on its frozen features, each on its own task's training words. Model A fine-tunes
the block and the head (Adam, ``--lr`` 3e-4, batch 32, ``--epochs`` 5) on A's words and logits 0–1, model
B on B's words and logits 2–3; each Fisher is that of the model's own head, over the fine-tuned
parameters (the block and the head), on its own training words, reduction "sum". Merges:

- average: (θ_A + θ_B)/2;
- task arithmetic: θ_0 + λ (θ_A − θ_0 + θ_B − θ_0), λ from a grid by union accuracy on the
  validation words (Ilharco et al. 2023);
- Fisher merge (Matena & Raffel 2022, floor 1e-6) with each estimator, and with the exact Fisher
  and the floor raised to the mean entry of F.

References: the base, each model alone, and the ensemble (A's polarity logits beside B's intensity
logits: two forward passes, what one merged model tries to reach).

    .venv/bin/python benchmarks/uses/merging_minilm.py             # 3 seeds, writes results
    .venv/bin/python benchmarks/uses/merging_minilm.py --quick     # smoke run (1 seed, 64 words per task,
                                                                   # exact, Hutchinson K=1 and empirical)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _minilm as T  # noqa: E402
import _setup as S  # noqa: E402
from merging import LAMBDAS, MERGE_ESTIMATORS  # noqa: E402

import fisherlib  # noqa: E402
from fisherlib.uses import average_merge, fisher_merge, task_arithmetic_merge  # noqa: E402

TASKS = ("polarity", "intensity")
QUICK = ("exact", "hutch1", "empirical")


def task_labels(classes: np.ndarray) -> dict[str, torch.Tensor]:
    """Polarity (1 = positive) and intensity (1 = strong) from the lexicon's 5 classes (neutral words left out)."""
    c = torch.as_tensor(classes)
    pol = (c >= 3).long()
    strong = ((c == 0) | (c == 4)).long()
    return {"polarity": pol, "intensity": strong}


def scores(z: torch.Tensor, lab: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy of polarity (logits 0–1), intensity (2–3) and both at once."""
    pol = z[:, 0:2].argmax(1) == lab["polarity"]
    strong = z[:, 2:4].argmax(1) == lab["intensity"]
    return {"polarity": float(pol.float().mean()), "intensity": float(strong.float().mean()),
            "union": float((pol & strong).float().mean())}


def run_seed(seed: int, data: dict, *, n_train: int, epochs: int, lr: float = 3e-4, n_test: int = 1000,
             n_val: int = 300, n_fisher: int | None = None, estimators=MERGE_ESTIMATORS) -> dict:
    x, lab = data["x"], data["labels"]
    order = torch.as_tensor(np.random.default_rng(seed).permutation(len(x)))
    test, val = order[:n_test], order[n_test:n_test + n_val]
    rest = order[n_test + n_val:]
    train = {"polarity": rest[:n_train], "intensity": rest[n_train:2 * n_train]}
    sub = lambda idx: {k: v[idx] for k, v in lab.items()}  # noqa: E731
    base = T.Top(data["encoder"], 4, seed=seed)
    for j, task in enumerate(TASKS):
        T.fit_head(base, x[train[task]], lab[task][train[task]], rows=slice(2 * j, 2 * j + 2), seed=seed)
    theta0 = {k: v.detach().clone() for k, v in base.named_parameters()}
    models = []
    for j, task in enumerate(TASKS):
        net = T.with_params(base, theta0)
        T.fine_tune(net, x[train[task]], lab[task][train[task]], epochs=epochs, seed=seed + 1 + j, lr=lr,
                    lo=2 * j, hi=2 * j + 2)
        models.append(net)
    params = [{k: v.detach().clone() for k, v in n.named_parameters()} for n in models]

    def score(theta, idx=test):
        return scores(T.logits(T.with_params(base, theta), x[idx]), sub(idx))

    z = [T.logits(n, x[test]) for n in models]
    out = {"base": score(theta0), "A": score(params[0]), "B": score(params[1]),
           "ensemble": scores(torch.cat([z[0][:, 0:2], z[1][:, 2:4]], 1), sub(test)),
           "average": score(average_merge(params))}
    val_acc = {lam: score(task_arithmetic_merge(theta0, params, lam), val)["union"] for lam in LAMBDAS}
    best = max(LAMBDAS, key=lambda lam: (val_acc[lam], -abs(lam - 0.5)))
    out["task_arithmetic"] = score(task_arithmetic_merge(theta0, params, best))
    out["task_lambda"] = best
    out["fisher"], out["secs"] = {}, {}
    for key, (_, opts) in estimators.items():
        fishers, t0 = [], time.perf_counter()
        for j, (net, task) in enumerate(zip(models, TASKS)):
            idx = train[task][:n_fisher]
            batches = [(x[idx[i:i + 100]], lab[task][idx[i:i + 100]]) for i in range(0, len(idx), 100)]
            fishers.append(fisherlib.fisher(T.sliced(net, 2 * j, 2 * j + 2), None, batches, seed=seed, **opts))
        out["secs"][key] = time.perf_counter() - t0
        out["fisher"][key] = score(fisher_merge(params, fishers))
        print(f"seed {seed}: Fisher merge, {key}: {out['fisher'][key]} ({out['secs'][key]:.1f} s)", flush=True)
        if key == "exact":  # a floor at the mean Fisher entry: small entries count as that mean
            mean = float(np.mean([float(v.mean()) for f in fishers for v in f.value.values()]))
            out["floor_mean"] = score(fisher_merge(params, fishers, floor=mean))
    for k in ("base", "A", "B", "ensemble", "average", "task_arithmetic"):
        print(f"seed {seed}: {k}: {out[k]}", flush=True)
    return out


def table(runs: list, meta: dict) -> str:
    rows = [("base: packaged MiniLM, both heads linear probes", "base"),
            ("model A alone (fine-tuned on polarity)", "A"), ("model B alone (fine-tuned on intensity)", "B"),
            ("ensemble of A and B (2 forwards)", "ensemble"), ("average (θ_A + θ_B)/2", "average"),
            ("task arithmetic, λ from validation", "task_arithmetic")]
    rows = [(label, [r[k] for r in runs], None) for label, k in rows]
    rows += [(f"Fisher merge, {MERGE_ESTIMATORS[k][0]}", [r["fisher"][k] for r in runs], k) for k in runs[0]["fisher"]]
    rows.append(("Fisher merge, exact, floor = mean entry of F", [r["floor_mean"] for r in runs], None))
    lines = [f"MiniLM (all-MiniLM-L6-v2, last block + two heads fine-tuned, {meta['epochs']} epochs at lr {meta['lr']:g}, "
             f"{meta['n_train']} words per task), VADER lexicon: A polarity, B intensity, union = both "
             f"(4 classes); {len(runs)} seed(s), {meta['n_test']} held-out words; accuracy, % (mean ± sd over seeds)",
             "", "| model | polarity (A), % | intensity (B), % | union (both right), % | seconds for both Fishers |",
             "|---|---:|---:|---:|---:|"]
    for label, vals, key in rows:
        secs = f"{np.median([r['secs'][key] for r in runs]):.1f}" if key else ""
        lines.append(f"| {label} | {S.mean_sd([v['polarity'] for v in vals])} | "
                     f"{S.mean_sd([v['intensity'] for v in vals])} | {S.mean_sd([v['union'] for v in vals])} | {secs} |")
    lines += ["", f"Task arithmetic's λ chosen per seed: {[r['task_lambda'] for r in runs]}. "
              f"Fisher over {meta['n_fisher_params']:,} parameters (the last block and the head)."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = S.parser(__doc__)
    p.set_defaults(seeds=3)
    p.add_argument("--train", type=int, default=1000, help="training words per task")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-4, help="Adam's step size in fine-tuning")
    args = p.parse_args(argv)
    S.setup_threads()
    seeds = 1 if args.quick else args.seeds
    n_train, epochs, n_test, n_val = (64, 1, 64, 32) if args.quick else (args.train, args.epochs, 1000, 300)
    t0 = time.perf_counter()
    encoder, tokenizer, words, classes = T.load()
    keep = np.flatnonzero(classes != 2)  # the non-neutral words
    if args.quick:
        keep = keep[np.random.default_rng(0).permutation(len(keep))[:n_test + n_val + 2 * n_train]]
    x = T.block_inputs(encoder, tokenizer, [words[i] for i in keep])
    data = {"encoder": encoder, "x": x, "labels": task_labels(classes[keep])}
    print(f"{len(keep)} non-neutral words; lower blocks run in {time.perf_counter() - t0:.1f} s", flush=True)
    # --quick: the three kinds only (exact, Hutchinson with one probe per batch, empirical)
    estimators = {k: MERGE_ESTIMATORS[k] for k in QUICK} if args.quick else MERGE_ESTIMATORS
    runs = [run_seed(s, data, n_train=n_train, epochs=epochs, lr=args.lr, n_test=n_test, n_val=n_val,
                     estimators=estimators) for s in range(seeds)]
    n_params = sum(p.numel() for p in T.Top(encoder, 4).parameters())
    meta = {"epochs": epochs, "lr": args.lr, "n_train": n_train, "n_test": n_test, "n_val": n_val, "n_words": int(len(keep)),
            "n_fisher_params": n_params, "seconds": time.perf_counter() - t0}
    text = table(runs, meta)
    S.write("merging_minilm", text, {"runs": runs, **meta}, None, args)
    print(f"whole run {meta['seconds']:.0f} s")
    return {"runs": runs, "table": text, **meta}


if __name__ == "__main__":
    main()
