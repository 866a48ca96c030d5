"""Shared set-up of the "uses of the Fisher" experiments: data, the torch MLP, training, and the
five Fisher estimators every experiment compares.

Data: scikit-learn's 8×8 digits (1,797 images, shipped inside the wheel: nothing is downloaded),
shuffled per seed, 500 held out, standardised with training statistics. scikit-learn ships no
harder image set offline (its other image sets — Olivetti faces, LFW — are downloaded by
``fetch_*``), so the experiments stay on the digits.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fisherlib

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures"
RESULTS = Path(__file__).resolve().parent / "results"

# The estimators compared (label, fisher() options). Random ones use few probes on purpose:
# the question is whether the cheap estimate is good enough for the use.
ESTIMATORS = {
    "exact": ("exact", {"method": "exact"}),
    "hutch": ("Hutchinson, batch, K=4", {"method": "hutchinson", "probes": 4}),
    "hutch_pe": ("Hutchinson, per example, K=1", {"method": "hutchinson", "per_example": True}),
    "mc": ("Monte-Carlo, per example, K=1", {"method": "mc", "per_example": True}),
    "empirical": ("empirical Fisher", {"method": "empirical"}),
}
SIZES = (64, 100, 100, 10)


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits(seed: int, n_test: int = 500, limit: int | None = None) -> Split:
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = data.data.astype(np.float64), data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))[:limit]
    x, y = x[order], y[order]
    xtr, xte = x[n_test:], x[:n_test]
    mean, std = xtr.mean(0), xtr.std(0)
    std[std == 0] = 1.0
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return Split(f((xtr - mean) / std), torch.as_tensor(y[n_test:]), f((xte - mean) / std),
                 torch.as_tensor(y[:n_test]))


class Sliced(torch.nn.Sequential):
    """The same layers (same parameter names and objects), keeping logits[:, lo:hi] only: one
    head of a multi-head classifier."""

    def __init__(self, layers, lo: int = 0, hi: int | None = None):
        super().__init__(*layers)
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return super().forward(x)[:, self.lo:self.hi]


def mlp(seed: int, sizes=SIZES) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
    return torch.nn.Sequential(*layers)


def train(net, x, y, *, epochs: int, seed: int, lr: float = 2e-3, batch: int = 64, penalty=None,
          lo: int = 0, hi: int | None = None) -> None:
    """Adam on the mean cross-entropy of logits[:, lo:hi] (labels shifted by lo), plus penalty(net)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(net(x[idx])[:, lo:hi], y[idx] - lo)
            if penalty is not None:
                loss = loss + penalty(net)
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(net, x, y, lo: int = 0, hi: int | None = None, params=None) -> float:
    if params is not None:
        net = _with(net, params)
    return float((net(x)[:, lo:hi].argmax(1) == y - lo).float().mean())


def _with(net, params):
    """A copy of ``net`` holding ``params`` ({name: tensor})."""
    import copy

    out = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.copy_(params[n])
    return out


def estimates(model, x, y, *, seed: int, batch: int = 100, keys=None, **extra) -> tuple[dict, dict]:
    """Every estimator of ESTIMATORS on (x, y): ({key: FisherEstimate}, {key: seconds})."""
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]
    out, secs = {}, {}
    for key in keys or ESTIMATORS:
        opts = ESTIMATORS[key][1]
        t0 = time.perf_counter()
        out[key] = fisherlib.fisher(model, None, batches, seed=seed, **opts, **extra)
        secs[key] = time.perf_counter() - t0
    return out, secs


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 seed, short training (smoke run)")
    p.add_argument("--no-write", action="store_true", help="print only; write no figure/table")
    return p


def setup_threads() -> None:
    torch.set_num_threads(1)  # a shared 2-core machine: one thread per run


def write(name: str, table: str, data: dict, fig, args, results: Path = RESULTS) -> None:
    """Print ``table``; unless ``--no-write``, save it and ``data`` under ``results`` (and ``fig``, if any)."""
    print(table)
    if args.no_write:
        return
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.md").write_text(table + "\n")
    (results / f"{name}.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {results / (name + '.md')}")
    if fig is not None:
        FIGURES.mkdir(parents=True, exist_ok=True)
        fig.savefig(FIGURES / f"uses_{name}.png", dpi=110, bbox_inches="tight")
        print(f"wrote {FIGURES / ('uses_' + name + '.png')}")


def mean_sd(values, scale: float = 100.0, digits: int = 1) -> str:
    """"mean ± sd" over seeds of ``scale · values`` (a percentage by default)."""
    a = scale * np.asarray(values, dtype=np.float64)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}" if len(a) > 1 else f"{a.mean():.{digits}f}"
