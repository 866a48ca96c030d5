"""What the demo computes on held-out inputs: core-space spectra and every Fisher estimator."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import simplex
from ..estimators import FisherEstimate, fisher
from .nets import Net, _bar


@dataclass(frozen=True)
class Run:
    """One row of the comparison: a call of :func:`fisherlib.fisher` and what it estimates."""

    key: str
    label: str
    target: str  # "F", "F_UB" or "F_LB": the exact quantity it is compared with
    options: dict
    random: bool = True


RUNS = (
    Run("exact", "exact (C columns per input)", "F", {"method": "exact"}, random=False),
    Run("hutchinson", "Hutchinson, 1 VJP per batch", "F", {"method": "hutchinson"}),
    Run("hutchinson_pe", "Hutchinson, per example", "F", {"method": "hutchinson", "per_example": True}),
    Run("mc", "Monte-Carlo labels, per batch", "F", {"method": "mc"}),
    Run("mc_pe", "Monte-Carlo labels, per example", "F", {"method": "mc", "per_example": True}),
    Run("empirical", "empirical (observed labels)", "F", {"method": "empirical"}, random=False),
    Run("upper_exact", "upper bound F_UB, exact", "F_UB", {"method": "exact", "bound": "upper"},
        random=False),
    Run("upper", "upper bound F_UB, Hutchinson", "F_UB", {"method": "hutchinson", "bound": "upper"}),
    Run("lower_exact", "lower bound F_LB, exact", "F_LB", {"method": "exact", "bound": "lower"},
        random=False),
    Run("lower", "lower bound F_LB, Hutchinson", "F_LB", {"method": "hutchinson", "bound": "lower"}),
)
TARGETS = {"F": "exact", "F_UB": "upper_exact", "F_LB": "lower_exact"}


@dataclass
class Result:
    """A run's estimate (NumPy ``{layer: array}``), its cost and its error against the target."""

    run: Run
    seconds: float
    vectors: int  # cotangent vectors pulled back through the network
    value: dict[str, np.ndarray]
    stderr: dict[str, np.ndarray]
    stderr_kind: str
    median_rel_error: float = 0.0
    within_2se: float | None = None  # share of entries within 2 standard errors of the target
    curve: list[tuple[int, float]] = field(default_factory=list)  # (K, median relative error)


@dataclass
class Analysis:
    n_inputs: int
    classes: int
    n_params: int
    layers: list[str]
    core: dict[str, np.ndarray]  # per-input λ_max, its Theorem-1 bounds, trace, trimmed norm
    core_seconds: float
    results: dict[str, Result]
    probes: int


def analyse(net: Net, x: np.ndarray, y: np.ndarray, *, probes: int, max_probes: int, seed: int,
            batch: int = 100, repeats: int = 3, progress: bool = True) -> Analysis:
    """Run the core-space geometry and every estimator of :data:`RUNS` on (x, y).

    Each estimator is timed as the median of ``repeats`` runs after a warm-up on one batch
    (which compiles what JAX compiles and fills caches).
    """
    batches = [(net.asarray(x[i:i + batch]), net.asarray(y[i:i + batch]))
               for i in range(0, len(y), batch)]

    t0 = time.perf_counter()
    z = net.logits(x)
    lam_max = simplex.eigvalsh(z)[:, -1]
    lo, hi = simplex.lambda_max_bounds(z)
    core = {"lambda_max": lam_max, "lower": lo, "upper": hi, "trace": simplex.trace(z),
            "trimmed_norm": simplex.trimmed_norm(z), "max_p": simplex.probs(z).max(axis=1)}
    core_seconds = time.perf_counter() - t0

    results: dict[str, Result] = {}
    for run in _bar(RUNS, progress, "Fisher estimators", "method"):
        opts = dict(run.options, seed=seed)
        if run.random:
            opts["probes"] = probes
        fisher(net.model, net.params, batches[:1], **opts)  # warm-up: compilation, caches
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            est = fisher(net.model, net.params, batches, **opts)
            times.append(time.perf_counter() - t0)
        seconds = float(np.median(times))
        results[run.key] = _result(run, est, seconds, len(y), len(batches), z.shape[1])
        if run.random and max_probes > 1:
            many = est if max_probes == probes else fisher(
                net.model, net.params, batches, **dict(opts, probes=max_probes))
            results[run.key].curve = [(k, _numpy_value(many.first_probes(k)))
                                      for k in _powers(max_probes)]

    for res in results.values():
        ref = results[TARGETS[res.run.target]].value
        res.median_rel_error = median_relative_error(res.value, ref)
        res.curve = [(k, median_relative_error(v, ref)) for k, v in res.curve]
        if res.stderr_kind == "probes":
            res.within_2se = within(res.value, res.stderr, ref, 2.0)
    layers = list(results["exact"].value)
    n_params = sum(v.size for v in results["exact"].value.values())
    return Analysis(len(y), z.shape[1], n_params, layers, core, core_seconds, results, probes)


def median_relative_error(value: dict, ref: dict) -> float:
    """Median over parameters of |value − ref| / ref, over the entries where ref > 0.

    Entries that no input moves (ref = 0, e.g. weights of an always-blank pixel) are left out.
    """
    v, r = _flat(value), _flat(ref)
    keep = r > 1e-12 * r.max()
    return float(np.median(np.abs(v[keep] - r[keep]) / r[keep]))


def within(value: dict, stderr: dict, ref: dict, n_se: float) -> float:
    """Share of entries (ref > 0) with |value − ref| <= n_se · stderr."""
    v, s, r = _flat(value), _flat(stderr), _flat(ref)
    keep = r > 1e-12 * r.max()
    return float(np.mean(np.abs(v[keep] - r[keep]) <= n_se * s[keep]))


def _result(run: Run, est: FisherEstimate, seconds: float, n: int, n_batches: int, C: int) -> Result:
    K = est.n_probes
    per_input = est.per_example
    vectors = {"exact": n * C if est.bound != "lower" else n * est.rank, "empirical": n}.get(
        est.method, K * (n if per_input else n_batches))
    est = est.to_numpy()
    return Result(run, seconds, vectors, _numpy_value(est), dict(est.stderr), est.stderr_kind)


def _numpy_value(est: FisherEstimate) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float64) for k, v in est.to_numpy().value.items()}


def _flat(tree: dict) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in tree.values()])


def _powers(k_max: int) -> list[int]:
    ks = [1 << i for i in range(k_max.bit_length()) if 1 << i <= k_max]
    return ks if ks[-1] == k_max else ks + [k_max]
