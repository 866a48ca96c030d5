"""The estimator matrix of issue 11: its cells, one tiny network on every backend, and the
dense float64 reference each cell is checked against (tests only).

A *cell* is one combination of ``fisher()`` options. Every cell runs over two batches of
unequal size (6 + 4 inputs) with ``chunk_size=3``, so per-example paths split each batch into
several chunks and random methods use two per-batch seeds. The reference is Σ_x J_xᵀ K_x J_x
with per-example Jacobians J_x of the NumPy model (the same weights on every backend) and the
kernel K_x of the cell: I(z_x), diag(p_x) (upper bound), the rank-k envelope (lower bound) or
r_x r_xᵀ with the observed-label residual r_x (empirical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

import fisherlib
from fisherlib import backends
from fisherlib.models import MLP

from fisher_reference import jacobians, kernel, softmax

D, H, C = 3, 4, 4
SPLIT = (6, 4)  # two batches of unequal size
N = sum(SPLIT)
CHUNK = 3  # inputs per per-example call: 2 + 2 chunks
NP_NAMES = ["0.weight", "0.bias", "1.weight", "1.bias"]

METHODS = ("hutchinson", "mc", "exact", "empirical")
STRUCTURES = ("diag", "blocks", "trace", "sketch")
# (likelihood, bound, rank): the bounds concern the softmax simplex only.
KERNELS = (("softmax", None, 1), ("softmax", "upper", 1), ("softmax", "lower", 1),
           ("softmax", "lower", 2), ("sigmoid", None, 1))
RANDOM = ("hutchinson", "mc")


@dataclass(frozen=True)
class Cell:
    method: str
    structure: str
    likelihood: str
    bound: str | None
    rank: int
    reduction: str
    per_example: bool
    dist: str

    @property
    def id(self) -> str:
        bound = f"{self.bound}{self.rank}" if self.bound == "lower" else (self.bound or "F")
        pe = "pe" if self.per_example else "batched"
        return "-".join([self.method, self.structure, self.likelihood, bound, self.reduction, pe, self.dist])

    def kwargs(self, probes: int) -> dict:
        kw = dict(method=self.method, structure=self.structure, likelihood=self.likelihood,
                  bound=self.bound, rank=self.rank, reduction=self.reduction, chunk_size=CHUNK)
        if self.method in RANDOM:
            kw.update(probes=probes, per_example=self.per_example)
        if self.method == "hutchinson":
            kw.update(dist=self.dist)
        return kw


def matrix() -> list[Cell]:
    """Every valid cell. Left out, because ``fisher()`` refuses them (tests/estimators/
    test_fisher.py::test_bad_arguments): bounds with mc/empirical or sigmoid, a sketch of a
    deterministic method, a per-example sketch, probes or dist for deterministic methods."""
    cells = []
    for method in METHODS:
        for structure in STRUCTURES:
            if structure == "sketch" and method not in RANDOM:
                continue
            for likelihood, bound, rank in KERNELS:
                if bound is not None and method not in ("hutchinson", "exact"):
                    continue
                for reduction in ("sum", "mean"):
                    pes = (True,) if method not in RANDOM else (False,) if structure == "sketch" else (False, True)
                    for per_example in pes:
                        dists = ("rademacher", "gaussian") if method == "hutchinson" else ("none",)
                        for dist in dists:
                            cells.append(Cell(method, structure, likelihood, bound, rank, reduction,
                                              per_example, dist))
    return cells


def sigmas(entries: int, alpha: float = 1e-4) -> float:
    """k such that `entries` standard-normal errors all stay within k with probability 1 - alpha
    (Bonferroni): the random checks' width in standard errors, derived, not picked."""
    return NormalDist().inv_cdf(1 - alpha / (2 * max(entries, 1)))


# ------------------------------------------------------------------------------- data


def weights():
    params = MLP([D, H, C], activation="tanh").init(seed=3, like=np.zeros(1))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)) * 1.5
    y = rng.integers(0, C, size=N)
    ymulti = (rng.random(size=(N, C)) < 0.5).astype(np.float64)
    return params, x, y, ymulti


def reference(cell: Cell, J, z, y, ymulti) -> np.ndarray:
    """The dense (P, P) float64 matrix the cell estimates, scaled by its reduction."""
    if cell.method == "empirical":
        if cell.likelihood == "softmax":
            r = np.eye(C)[y] - softmax(z)
        else:
            r = ymulti - 1 / (1 + np.exp(-z))
        Kx = np.einsum("nc,nd->ncd", r, r)
    else:
        Kx = kernel(z, cell.likelihood, cell.bound, cell.rank)
    F = np.einsum("nci,ncd,ndj->ij", J, Kx, J)
    return F / N if cell.reduction == "mean" else F


def numpy_reference_data():
    params, x, y, ymulti = weights()
    z, J = jacobians(backends.get("numpy"), MLP([D, H, C], activation="tanh"), params, x)
    return params, x, y, ymulti, z, J


# ------------------------------------------------------------------------------- reading


def _np(a):
    from tests._backends import to_numpy

    return to_numpy(a, np.float64)


def canonical(name: str) -> str:
    """A leaf name in the NumPy model's spelling: JAX key paths lose their brackets, torch's
    second Linear (index 2 of the Sequential) is layer 1."""
    name = name.strip("[]'\"")
    return {"2.weight": "1.weight", "2.bias": "1.bias"}.get(name, name)


def _order(names, sizes):
    """Index permutation from the estimate's leaf order to the reference's (NP_NAMES) order."""
    offsets = dict(zip(names, np.cumsum([0] + sizes[:-1])))
    size = dict(zip(names, sizes))
    by = {canonical(n): n for n in names}
    return np.concatenate([np.arange(offsets[by[c]], offsets[by[c]] + size[by[c]]) for c in NP_NAMES])


def read(est, structure: str):
    """(value, stderr) as float64 NumPy in the reference's layout (NP_NAMES order, one group)."""
    if structure == "sketch":
        sizes = [math.prod(est.value.leaves[n].shape[1:]) for n in est.names]
        G = _np(est.value.factor())[_order(est.names, sizes), :]  # (P, K): column k is √(scale/K) g_k
        K = G.shape[1]
        outer = np.einsum("ik,jk->kij", G, G) * K  # per-probe estimates scale·g_k g_kᵀ
        return outer.mean(0), outer.std(0, ddof=1) / math.sqrt(K)
    value, se = est.value, est.stderr
    if structure == "trace":
        return np.asarray(_np(value)), np.asarray(_np(se))
    if structure == "blocks":
        (name,) = est.names
        return _np(value[name]), _np(se[name])
    value = dict(_leaves(value, est.names))
    se = dict(_leaves(se, est.names))
    by = {canonical(n): n for n in est.names}
    return (np.concatenate([_np(value[by[c]]).ravel() for c in NP_NAMES]),
            np.concatenate([_np(se[by[c]]).ravel() for c in NP_NAMES]))


def _leaves(tree, names):
    if isinstance(tree, dict) and set(tree) == set(names):
        return [(n, tree[n]) for n in names]
    from fisherlib.backends._common import flatten

    got_names, leaves = flatten(tree, lambda a: hasattr(a, "shape") and hasattr(a, "dtype"))
    return list(zip(names, leaves)) if len(leaves) == len(names) else list(zip(got_names, leaves))


def expected(cell: Cell, F: np.ndarray):
    if cell.structure == "diag":
        return np.diag(F)
    if cell.structure == "trace":
        return np.asarray(np.trace(F))
    return F


def variance_bound(cell: Cell, F: np.ndarray, K: int):
    """Var of the K-probe Hutchinson mean: (F_ii F_jj + F_ij²)/K entrywise (theory.md §5.2;
    equality for Gaussian batch sums), 2‖F‖²_F/K for the trace; None where no bound is known
    (Monte-Carlo, deterministic methods)."""
    if cell.method != "hutchinson":
        return None
    d = np.diag(F)
    full = (np.outer(d, d) + F * F) / K
    if cell.structure == "diag":
        return np.diag(full)
    if cell.structure == "trace":
        return np.asarray(2 * np.sum(F * F) / K)
    return full


def check(cell: Cell, est, F: np.ndarray, *, K: int, rtol: float = 1e-10, slack: float = 1.3):
    """Assert that ``est`` matches the reference ``F`` of ``cell``.

    Deterministic: rtol (float64 rounding) and zero standard errors. Random: every entry
    within k standard errors, k from :func:`sigmas`; for Hutchinson the reported standard
    errors must also stay below the variance bound (so that a huge error bar cannot make the
    check vacuous); ``slack`` covers the sampling error of a standard deviation from K probes
    of a χ²-like variable (kurtosis <= 15: relative sd √(14/4K), 4 sd at K = 1500 is 0.19).
    """
    value, se = read(est, cell.structure)
    want = expected(cell, F)
    scale = np.abs(want).max()
    assert value.shape == want.shape
    if cell.method not in RANDOM:
        np.testing.assert_allclose(value, want, rtol=rtol, atol=rtol * scale)
        assert np.all(se == 0)
        return
    k = sigmas(want.size)
    err = np.abs(value - want)
    bad = err > k * se + 1e-12 * scale
    assert not bad.any(), (f"{bad.sum()} of {want.size} entries beyond {k:.2f} standard errors; "
                           f"worst ratio {np.max(err / np.maximum(se, 1e-300)):.2f}")
    bound = variance_bound(cell, F * (N if cell.reduction == "mean" else 1), K)
    if bound is not None:
        bound_se = np.sqrt(bound) / (N if cell.reduction == "mean" else 1)
        assert np.all(se <= slack * bound_se + 1e-12 * scale), "standard error above the variance bound"


def run(model, params, batches, cell: Cell, *, K: int, seed: int = 7, backend=None, group=None):
    kw = cell.kwargs(K)
    if cell.structure == "blocks":
        kw["blocks"] = [group or NP_NAMES]
    return fisherlib.fisher(model, params, batches, seed=seed, backend=backend, **kw)


def split(x, *more):
    """Two batches: arrays, or (inputs, labels) pairs."""
    out, start = [], 0
    for n in SPLIT:
        sl = slice(start, start + n)
        out.append(x[sl, ...] if not more else (x[sl, ...], *(m[sl, ...] for m in more)))
        start += n
    return out
