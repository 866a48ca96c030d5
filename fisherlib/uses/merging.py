r"""Model merging: Fisher-weighted averaging, and the plain-average and task-arithmetic baselines.

Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022)
takes N models θ_1 … θ_N of one architecture (fine-tuned from one initialisation, say), each
with the diagonal of its Fisher F_j, and returns per parameter

    θ*_i = Σ_j w_j F̃_j,i θ_j,i / Σ_j w_j F̃_j,i,   F̃_j = max(F_j / c_j, floor),

the maximiser of Σ_j w_j log p_j(θ) when each model's posterior is the Laplace approximation
N(θ_j, F_j⁻¹) with a diagonal precision (their eq. 3). c_j = ‖F_j‖₂ over all the leaves with
``normalize=True`` (their code's ``normalize_fishers``: models whose Fishers were summed over
different numbers of inputs weigh alike), else 1. The floor keeps a parameter that no model's
Fisher sees at the w-weighted average (1e-6 as in their code); with all F_j equal the merge is
that average.

Baselines: :func:`average_merge` (F_j = 1) and :func:`task_arithmetic_merge` (Ilharco et al.,
"Editing Models with Task Arithmetic", ICLR 2023: θ_0 + λ Σ_j (θ_j − θ_0)).

The functions work leaf by leaf on parameter trees of any backend (torch modules or state
dicts, JAX pytrees, NumPy dicts), matched by leaf name; nothing here imports a framework.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..estimators import FisherEstimate
from . import _trees

Array = Any
Tree = Any

__all__ = ["average_merge", "fisher_merge", "task_arithmetic_merge"]


def fisher_merge(params: Sequence[Tree], fishers: Sequence[Any], *, weights: Sequence[float] | None = None,
                 floor: float = 1e-6, normalize: bool = False, backend: Any = None) -> Tree:
    r"""Merge N models with per-parameter Fisher weights (Matena & Raffel 2022).

    Parameters
    ----------
    params : sequence of trees
        θ_1 … θ_N, all with the same leaf names and shapes (torch modules or state dicts of the
        same architecture, JAX pytrees, ``{name: array}`` dicts).
    fishers : sequence
        diag F_j of each model, at θ_j: a diagonal :class:`~fisherlib.FisherEstimate`, a tree
        shaped like the parameters, or the path of a saved estimate (``.safetensors`` / ``.npz``).
        A leaf of ``params`` that an estimate lacks (a buffer in a state dict) is an error.
    weights : sequence of float, optional
        w_j >= 0, not all zero (default: all 1). Only their ratios matter.
    floor : float
        F̃_j = max(F_j / c_j, floor) >= floor > 0, so that no denominator vanishes.
    normalize : bool
        Divide each F_j by its L2 norm over all leaves first (c_j above).
    backend
        The parameters' backend; inferred from their type when None.

    Returns
    -------
    tree
        θ*, shaped like ``params[0]`` (a ``{name: tensor}`` dict for a torch module: load it with
        ``model.load_state_dict(merged, strict=False)``), in its namespace, device and dtype.

    Notes
    -----
    Cost: 4 N P arithmetic operations and one P-sized accumulator pair; no forward pass. Each F_j
    is read once. With Hutchinson estimates the weights carry their noise: at K probes a
    diagonal entry's coefficient of variation is at most √(2/K) (module ``fisherlib.estimators``),
    so the merge with K = 1 weighs parameters by a noisy but unbiased F; docs/integrations/merging.md
    measures what that costs in accuracy.

    References
    ----------
    M. Matena and C. Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherlib.uses import fisher_merge
    >>> a, b = {"w": np.array([0.0, 0.0])}, {"w": np.array([1.0, 1.0])}
    >>> fa, fb = {"w": np.array([3.0, 1.0])}, {"w": np.array([1.0, 1.0])}
    >>> fisher_merge([a, b], [fa, fb])["w"]          # (3·0 + 1·1)/4 and (1·0 + 1·1)/2
    array([0.25, 0.5 ])
    """
    lvs = _models(params, backend)
    w = _weights(weights, len(lvs))
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor > 0 or not math.isfinite(floor):
        raise ValueError(f"floor: expected a positive finite number, got {floor!r}")
    if isinstance(fishers, (str, os.PathLike, FisherEstimate)) or not isinstance(fishers, Sequence):
        raise TypeError(f"fishers: expected a sequence of {len(lvs)} Fisher estimates, trees or paths, "
                        f"got {type(fishers).__name__}")
    if len(fishers) != len(lvs):
        raise ValueError(f"fishers: expected one per model ({len(lvs)}), got {len(fishers)}")
    first = lvs[0]
    xp = first.xp
    diags = []
    for j, f in enumerate(fishers):
        if isinstance(f, (str, os.PathLike)):
            f = FisherEstimate.load(f)
        d = _trees.diagonal(f, first, argname=f"fishers[{j}]")
        for name, v in zip(first.names, d):
            if _trees.is_eager(v) and bool(xp.any(v < 0)):
                raise ValueError(f"fishers[{j}]: leaf {name!r} has negative entries; a Fisher diagonal is >= 0")
        if normalize:
            norm = math.sqrt(sum(float(xp.sum(v * v)) for v in d))
            if not norm > 0:
                raise ValueError(f"fishers[{j}]: normalize=True needs a Fisher that is not all zero")
            d = [v / norm for v in d]
        diags.append(d)
    merged = []
    for i in range(len(first.names)):
        num = den = None
        for j, lv in enumerate(lvs):
            f = w[j] * xp.clip(diags[j][i], min=floor)
            t = _trees.detach(lv.arrays[i])
            num = f * t if num is None else num + f * t
            den = f if den is None else den + f
        merged.append(num / den)
    return first.build(merged)


def average_merge(params: Sequence[Tree], *, weights: Sequence[float] | None = None, backend: Any = None) -> Tree:
    """Σ_j w_j θ_j / Σ_j w_j per parameter: the plain (isotropic) merge, shaped like ``params[0]``."""
    lvs = _models(params, backend)
    w = _weights(weights, len(lvs))
    total = sum(w)
    merged = []
    for i in range(len(lvs[0].names)):
        acc = None
        for j, lv in enumerate(lvs):
            t = (w[j] / total) * _trees.detach(lv.arrays[i])
            acc = t if acc is None else acc + t
        merged.append(acc)
    return lvs[0].build(merged)


def task_arithmetic_merge(base: Tree, params: Sequence[Tree], scale: float = 1.0, *, backend: Any = None) -> Tree:
    r"""θ_0 + λ Σ_j (θ_j − θ_0): the sum of the task vectors, scaled (Ilharco et al. 2023).

    ``scale`` λ is usually chosen on held-out data (λ = 1/N is the plain average).
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")
    lvs = _models(params, backend)
    b = _trees.split(base, backend, argname="base")
    _same(lvs[0], b, "base")
    merged = []
    for i, t0 in enumerate(b.arrays):
        t0 = _trees.detach(t0)
        acc = None
        for lv in lvs:
            d = _trees.detach(lv.arrays[i]) - t0
            acc = d if acc is None else acc + d
        merged.append(t0 + scale * acc)
    return b.build(merged)


# --------------------------------------------------------------------------- helpers


def _models(params: Sequence[Tree], backend: Any) -> list[_trees.Leaves]:
    if isinstance(params, Mapping) or not isinstance(params, Sequence) or isinstance(params, str):
        raise TypeError(f"params: expected a sequence of parameter trees (one per model), got {type(params).__name__}")
    if len(params) < 1:
        raise ValueError("params: expected at least one model")
    lvs = [_trees.split(p, backend, argname=f"params[{j}]") for j, p in enumerate(params)]
    for j, lv in enumerate(lvs[1:], start=1):
        _same(lvs[0], lv, f"params[{j}]")
    return lvs


def _same(ref: _trees.Leaves, lv: _trees.Leaves, argname: str) -> None:
    if lv.names != ref.names:
        raise ValueError(f"{argname}: expected the leaves {ref.names} of params[0], got {lv.names}")
    for name, a, b in zip(ref.names, ref.arrays, lv.arrays):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"{argname}: leaf {name!r} has shape {tuple(b.shape)}, params[0] has {tuple(a.shape)}")


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = list(weights)
    if len(w) != n:
        raise ValueError(f"weights: expected one per model ({n}), got {len(w)}")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 or not math.isfinite(x) for x in w) \
            or not sum(w) > 0:
        raise ValueError(f"weights: expected non-negative finite numbers, not all zero, got {w}")
    return [float(x) for x in w]
