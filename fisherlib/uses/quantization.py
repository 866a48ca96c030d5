r"""Bits per layer from the Fisher (the Cramér–Rao argument), and the quantizer they assume.

**Quantizer.** Each leaf (layer) l is quantized symmetrically and uniformly with b_l bits:
θ ↦ Δ_l · clip(round(θ/Δ_l), −L_l, L_l), L_l = 2^{b_l−1} − 1 levels each side of 0,
step Δ_l = R_l / L_l with range R_l = max_i |θ_i| over the leaf (one scale per layer, stored in
full precision and not counted in the bits). Rounding to the nearest level adds an error ε_i
that is, in the usual high-resolution model, uniform on [−Δ_l/2, Δ_l/2]: E ε = 0, Var ε = Δ_l²/12
(Widrow & Kollár, *Quantization Noise*, 2008, ch. 4).

**Cost of the noise.** To second order the expected KL divergence between the network's outputs
before and after is ½ E[εᵀ F ε] = Σ_l (Δ_l²/24) tr F_l (independent, zero-mean errors: only the
diagonal of F enters) — :func:`distortion`.

**Cramér–Rao.** An unbiased estimate of θ from the data has Var(θ̂_i) ≥ (F⁻¹)_ii ≥ 1/F_ii
(Cramér 1946, Rao 1945; F summed over the data): coordinates with a small F_ii are poorly
determined by the data anyway and can take coarse steps, where well-determined ones cannot.
Minimising Σ_l n_l F̄_l Δ_l² subject to the average bit width Σ_l n_l b_l = b̄ Σ_l n_l, with
Δ_l ≈ 2 R_l 2^{−b_l} (F̄_l = tr F_l / n_l), is the reverse water-filling problem of rate–distortion
theory (Cover & Thomas, *Elements of Information Theory*, 2006, §10.3.3; Gersho & Gray 1992,
§8.3). Its solution, without the clipping, is

    b_l = b̄ + ½ log2( F̄_l R_l² / G ),   log G = Σ_l n_l log(F̄_l R_l²) / Σ_l n_l,

and it makes F̄_l Δ_l² the same in every layer: the quantization variance Δ_l²/12 is the same
fraction of the Cramér–Rao scale 1/F̄_l everywhere. With equal ranges it is the log-ratio rule
b_l = b̄ + ½ log2(F̄_l / geometric mean of F̄). Clipping to [b_min, b_max] moves a water level
(found by bisection). Integer widths are found by greedy marginal returns (Fox 1966; Shoham &
Gersho 1988): from b_min everywhere, repeatedly give one more bit to the layer whose exact
distortion falls most per bit spent, while the budget allows — optimal for equal layer sizes,
and never over budget.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from ..estimators import FisherEstimate
from . import _trees

Array = Any
Tree = Any

__all__ = ["allocate_bits", "distortion", "quantize"]


def allocate_bits(fisher: FisherEstimate | Tree, params: Tree, bits: float, *, b_min: int = 2,
                  b_max: int = 8, leaves: Iterable[str] | None = None,
                  groups: Mapping[str, Iterable[str]] | None = None, use_range: bool = True,
                  integer: bool = True, backend: Any = None) -> dict[str, float]:
    r"""Bit widths per leaf for an average of ``bits`` per quantized parameter (module docstring).

    Parameters
    ----------
    fisher : FisherEstimate or tree
        diag F at ``params`` (the scale of F does not matter: only ratios enter).
    params : tree
        The parameters (any backend's tree, or a torch ``nn.Module``).
    bits : float
        b̄, the average bit width over the quantized parameters (b_min <= b̄ <= b_max).
    b_min, b_max : int
        Bounds on each width (b_min >= 2: the symmetric quantizer needs a level each side of 0).
    leaves : iterable of str, optional
        Leaves to quantize (default all); the others are left out of the budget.
    groups : mapping, optional
        ``{group: [leaf names]}``: leaves that share one width (default: one group per leaf).
    use_range : bool
        Weigh each group by F̄ R² (the stated quantizer, range R = max |θ| per leaf) rather than
        by F̄ alone (a quantizer whose step does not depend on the range).
    integer : bool
        Integer widths by greedy marginal returns (default), or the continuous water-filling
        solution (floats; meets the budget exactly).

    Returns
    -------
    dict
        ``{leaf name: bits}`` for the quantized leaves; Σ n_l b_l <= b̄ Σ n_l.

    Notes
    -----
    Cost: O(P) to reduce F and |θ| per leaf, then O(groups · (b_max − b_min)) steps.
    Bias: an estimated F enters only through F̄_l, a mean over the layer, so estimator noise
    averages out; a biased estimator (the empirical Fisher) shifts the ratios between layers.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherlib.uses import allocate_bits
    >>> params = {"a": np.ones(100), "b": np.ones(100)}
    >>> F = {"a": np.full(100, 16.0), "b": np.full(100, 1.0)}      # ½ log2(16) = 2 bits apart
    >>> allocate_bits(F, params, 4, integer=False)
    {'a': 5.0, 'b': 3.0}
    """
    lv = _trees.split(params, backend)
    b_min, b_max = _check_width(b_min, "b_min"), _check_width(b_max, "b_max")
    if b_max < b_min:
        raise ValueError(f"b_max: expected >= b_min = {b_min}, got {b_max}")
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not b_min <= bits <= b_max:
        raise ValueError(f"bits: expected an average width in [b_min, b_max] = [{b_min}, {b_max}], got {bits!r}")
    chosen = [n for n, c in zip(lv.names, lv.select(leaves)) if c]
    plan = _groups(groups, chosen)
    diag = dict(zip(lv.names, _trees.diagonal(fisher, lv)))
    theta = dict(zip(lv.names, lv.arrays))
    xp = lv.xp
    sizes, weights = {}, {}
    for g, members in plan.items():
        n = sum(_trees.size(theta[m]) for m in members)
        total = 0.0
        for m in members:
            scale = float(xp.max(xp.abs(_trees.detach(theta[m])))) ** 2 if use_range else 1.0
            total += float(xp.sum(diag[m])) * scale
        sizes[g], weights[g] = n, total / max(n, 1)
    if integer:
        width = _greedy(sizes, weights, bits, b_min, b_max)
    else:
        width = _water_fill(sizes, weights, bits, b_min, b_max)
    return {m: width[g] for g, members in plan.items() for m in members}


def quantize(params: Tree, bits: Mapping[str, float], *, backend: Any = None) -> Tree:
    r"""Symmetric uniform quantization of each leaf named in ``bits`` (module docstring).

    θ ↦ Δ · clip(round(θ/Δ), −L, L) with L = 2^{b−1} − 1 and Δ = max|θ| / L per leaf; leaves
    not in ``bits`` are returned as they are. Returns a new tree like ``params``.
    """
    lv = _trees.split(params, backend)
    if not isinstance(bits, Mapping):
        raise TypeError(f"bits: expected a mapping {{leaf name: bits}}, got {type(bits).__name__}")
    unknown = sorted(set(bits) - set(lv.names))
    if unknown:
        raise ValueError(f"bits: no parameter leaves named {unknown}; the leaves are {lv.names}")
    xp = lv.xp
    out = []
    for name, t in zip(lv.names, lv.arrays):
        t = _trees.detach(t)
        if name not in bits:
            out.append(t)
            continue
        b = bits[name]
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b < 2 or b != int(b):
            raise ValueError(f"bits: leaf {name!r} needs an integer width >= 2, got {b!r}")
        levels = float(2 ** (int(b) - 1) - 1)
        r = xp.max(xp.abs(t))
        step = xp.where(r > 0, r / levels, xp.ones_like(r))
        out.append(xp.clip(xp.round(t / step), -levels, levels) * step)
    return lv.build(out)


def distortion(fisher: FisherEstimate | Tree, params: Tree, bits: Mapping[str, float], *,
               backend: Any = None) -> float:
    r"""Σ_l (Δ_l²/24) tr F_l: the predicted KL increase ½ E[εᵀFε] of :func:`quantize`'s noise.

    Uses the high-resolution model Var ε = Δ²/12 with the quantizer's step Δ_l = R_l / (2^{b_l−1} − 1).
    """
    lv = _trees.split(params, backend)
    diag = dict(zip(lv.names, _trees.diagonal(fisher, lv)))
    xp = lv.xp
    total = 0.0
    for name, t in zip(lv.names, lv.arrays):
        if name in bits:
            step = float(xp.max(xp.abs(_trees.detach(t)))) / (2 ** (int(bits[name]) - 1) - 1)
            total += step ** 2 / 24.0 * float(xp.sum(diag[name]))
    return total


# --------------------------------------------------------------------------- helpers


def _check_width(b: Any, name: str) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or b < 2:
        raise ValueError(f"{name}: expected an integer >= 2, got {b!r}")
    return b


def _groups(groups, chosen: list[str]) -> dict[str, list[str]]:
    if groups is None:
        return {n: [n] for n in chosen}
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups: expected a mapping {{group: [leaf names]}}, got {type(groups).__name__}")
    plan = {str(g): list(m) for g, m in groups.items()}
    seen = [m for members in plan.values() for m in members]
    if sorted(seen) != sorted(chosen) or len(set(seen)) != len(seen):
        raise ValueError(f"groups: expected each quantized leaf {chosen} in exactly one group, got {plan}")
    return plan


def _distortion_unit(b: int) -> float:
    """Δ²/R² for b bits: the quantizer's squared step per unit range."""
    return 1.0 / (2 ** (b - 1) - 1) ** 2


def _greedy(sizes: dict, weights: dict, bits: float, b_min: int, b_max: int) -> dict[str, int]:
    width = {g: b_min for g in sizes}
    left = bits * sum(sizes.values()) - b_min * sum(sizes.values())
    left = math.floor(left + 1e-9)
    while True:
        best, best_gain = None, 0.0
        for g, n in sizes.items():
            if width[g] >= b_max or n > left or weights[g] <= 0:
                continue
            gain = weights[g] * (_distortion_unit(width[g]) - _distortion_unit(width[g] + 1))
            if gain > best_gain:  # per bit spent: n_g w_g Δd / n_g
                best, best_gain = g, gain
        if best is None:
            break
        width[best] += 1
        left -= sizes[best]
    return width


def _water_fill(sizes: dict, weights: dict, bits: float, b_min: int, b_max: int) -> dict[str, float]:
    N = sum(sizes.values())
    half_log = {g: 0.5 * math.log2(w) if w > 0 else -math.inf for g, w in weights.items()}

    def widths(mu):
        return {g: min(b_max, max(b_min, h - mu)) for g, h in half_log.items()}

    def spent(mu):
        return sum(sizes[g] * b for g, b in widths(mu).items())

    finite = [h for h in half_log.values() if h > -math.inf] or [0.0]
    lo, hi = min(finite) - b_max - 1, max(finite) - b_min + 1  # spent(lo) = b_max N, spent(hi) = b_min N
    target = bits * N
    for _ in range(200):  # bisection: spent() falls as the water level mu rises
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if spent(mid) > target else (lo, mid)
    return {g: round(b, 9) for g, b in widths(0.5 * (lo + hi)).items()}
