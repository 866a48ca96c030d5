"""Every spectral statistic of F in one call: λ_max and top-k eigenpairs, brackets, moments,
density and the learning-rate bound 2/λ_max."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..estimators._batches import n_of
from ..estimators._estimate import _to_numpy
from ._density import SpectralDensity, exact_density, slq
from ._exact import MAX_ELEMENTS, gram_spectrum, n_rows
from ._lanczos import top_eigenpairs
from ._operator import FisherOperator

Array = Any

__all__ = ["LR_CAVEAT", "FisherSpectrum", "fisher_spectrum"]

METHODS = ("auto", "exact", "estimate")

LR_CAVEAT = (
    "2/λ_max is the largest step at which gradient descent is stable on a quadratic whose Hessian "
    "is F. It bounds the learning rate through the loss's Hessian: that Hessian equals F for a "
    "linear softmax model (cross-entropy with the same sum or mean reduction) and approximately "
    "so near a minimum of a network, where the Gauss-Newton part dominates; elsewhere the Hessian "
    "has further terms, negative curvature included, and the bound is a guide only."
)


@dataclass
class FisherSpectrum:
    r"""Statistics of the spectrum of F over the P parameters (see :func:`fisher_spectrum`).

    Attributes
    ----------
    lambda_max : float
        λ_max(F); ``eigenvalues[0]``.
    eigenvalues, residuals : ndarray (k,)
        Top-k eigenvalues, descending, and ‖F y_i − λ_i y_i‖ of their unit eigenvectors (a
        symmetric F has an eigenvalue within the residual of each).
    eigenvectors : array (k, P)
        Flat unit eigenvectors in the parameters' namespace; :meth:`eigenvector` gives trees.
    lambda_max_lower, lambda_max_upper : float or None
        λ_max(F_LB) ≤ λ_max(F) ≤ λ_max(F_UB) (softmax only), with ``bracket_residuals``.
    trace, trace_stderr : float or None
        tr F, with its standard error (0 when exact); λ_max ≤ tr F. None when the estimate was
        asked for the eigenpairs alone (``density=False``).
    m1, m1_stderr, m2, m2_stderr : float or None
        m₁ = tr F / P and m₂ = ‖F‖_F² / P (mean and second moment of the eigenvalues).
    density : SpectralDensity or None
        The eigenvalue distribution (exact, or stochastic Lanczos quadrature).
    lr_max : float
        2 / λ_max, for the loss with the same ``reduction``; read :data:`LR_CAVEAT`.
    method : {"exact", "estimate"}
    plan : str
        Why ``method="auto"`` chose as it did (the predicted times of both), else "".
    products, passes, seconds
        F-vector products, passes over the data and wall time of the call.
    """

    n_params: int
    n_inputs: int
    method: str
    reduction: str
    eigenvalues: np.ndarray
    residuals: np.ndarray
    eigenvectors: Array
    trace: float | None
    trace_stderr: float | None
    m1: float | None
    m1_stderr: float | None
    m2: float | None
    m2_stderr: float | None
    density: SpectralDensity | None
    lambda_max_lower: float | None = None
    lambda_max_upper: float | None = None
    bracket_residuals: tuple[float, float] | None = None
    products: int = 0
    passes: int = 0
    seconds: float = 0.0
    plan: str = ""
    lr_caveat: str = LR_CAVEAT
    _op: Any = field(default=None, repr=False)

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    @property
    def lr_max(self) -> float:
        return 2.0 / self.lambda_max

    def eigenvector(self, i: int = 0) -> Any:
        """The i-th eigenvector as a tree shaped like the parameters."""
        return self._op.unflatten(self.eigenvectors[i, :])

    def as_dict(self) -> dict:
        """The numbers (no arrays but the top eigenvalues and residuals), for JSON."""
        return {
            "n_params": self.n_params, "n_inputs": self.n_inputs, "method": self.method,
            "reduction": self.reduction, "lambda_max": self.lambda_max,
            "eigenvalues": self.eigenvalues.tolist(), "residuals": self.residuals.tolist(),
            "lambda_max_lower": self.lambda_max_lower, "lambda_max_upper": self.lambda_max_upper,
            "trace": self.trace, "trace_stderr": self.trace_stderr, "m1": self.m1,
            "m1_stderr": self.m1_stderr, "m2": self.m2, "m2_stderr": self.m2_stderr,
            "lr_max": self.lr_max, "products": self.products, "passes": self.passes,
            "seconds": self.seconds, "plan": self.plan,
        }

    def __str__(self) -> str:
        def pm(v, se):
            return f"{v:.6g}" + (f" ± {se:.2g}" if se else "")

        lines = [f"spectrum of F over P = {self.n_params:,} parameters, {self.n_inputs} inputs "
                 f"({self.method}, reduction={self.reduction!r}, {self.products} F·v products, "
                 f"{self.seconds:.2f} s)"]
        for i, (lam, r) in enumerate(zip(self.eigenvalues, self.residuals)):
            lines.append(f"  λ_{i + 1} = {lam:.6g}   residual ‖Fv − λv‖ = {r:.2g}")
        if self.lambda_max_lower is not None:
            lines.append(f"  brackets: λ_max(F_LB) = {self.lambda_max_lower:.6g} ≤ λ_max(F) ≤ "
                         f"λ_max(F_UB) = {self.lambda_max_upper:.6g}")
        if self.trace is not None:
            lines += [f"  λ_max ≤ tr F = {pm(self.trace, self.trace_stderr)}",
                      f"  m₁ = tr F / P = {pm(self.m1, self.m1_stderr)}   m₂ = ‖F‖_F² / P = "
                      f"{pm(self.m2, self.m2_stderr)}"]
        lines.append(f"  learning-rate bound 2/λ_max = {self.lr_max:.4g} (see lr_caveat)")
        return "\n".join(lines)


def fisher_spectrum(model: Any, params: Any, batches: Any, *, k: int = 1, method: str = "auto",
                    bounds: bool = True, probes: int = 16, slq_steps: int = 30, max_steps: int = 100,
                    tol: float | None = None, likelihood: str = "softmax", reduction: str = "sum",
                    seed: int = 0, backend: Any = None, progress: bool = False,
                    max_elements: int = MAX_ELEMENTS, cache: bool = False, density: bool = True) -> FisherSpectrum:
    r"""λ_max, top-k eigenpairs, brackets, moments, density and 2/λ_max of F over a dataset.

    Parameters
    ----------
    model, params, batches, likelihood, reduction, backend
        As for :func:`fisherlib.fisher`.
    k : int
        Number of top eigenpairs.
    method : {"auto", "exact", "estimate"}
        "exact": an eigendecomposition of the smaller of F (P × P) and its Gram matrix
        Bᵀ J Jᵀ B (R × R, R = C · inputs), which has F's nonzero eigenvalues: every statistic
        exact. "estimate": block Lanczos for the eigenpairs, stochastic Lanczos quadrature for
        the density and Hutchinson for m₁, m₂ (with standard errors). "auto": the one predicted
        to take less time (see Notes), exact only when its matrix (min(R, P) × P) has at most
        ``max_elements`` entries; :attr:`FisherSpectrum.plan` says why.
    bounds : bool
        Also λ_max(F_LB) and λ_max(F_UB) (softmax only), the brackets of λ_max(F).
    probes, slq_steps : int
        Rademacher probes and Lanczos steps of the quadrature ("estimate").
    max_steps, tol
        Lanczos for the top-k pairs: at most ``max_steps`` steps, stopping when the residual
        estimates fall below ``tol · λ_max`` (default 1e-8 in float64, 1e-4 otherwise).
    seed : int
    progress : bool
        A tqdm bar counting passes over the data.
    cache : bool
        Keep each batch's forward pass between products (see :func:`fisher_operator`).
    density : bool
        False: the estimate gives the top-k eigenpairs (and the brackets, with ``bounds``)
        alone, without the quadrature: no density, moments or trace (None), a fraction of the
        time. λ_max alone: ``k=1, bounds=False, density=False``. The exact path reports the
        moments anyway (they come with the eigenvalues).

    Returns
    -------
    FisherSpectrum

    Notes
    -----
    =====================  ================================  ===================================
    statistic              "exact"                           "estimate"
    =====================  ================================  ===================================
    λ_max, top-k           eigh of F or of G (y = Aᵀu/√λ)    block Lanczos (b = k), full reorth.
    m₁ = tr F / P          Σλ / P                            (1/K) Σ ξᵀFξ / P, Rademacher ξ
    m₂ = ‖F‖_F² / P        Σλ² / P                           (1/K) Σ ‖Fξ‖² / P
    density                all eigenvalues                   SLQ: K probes × m steps
    =====================  ================================  ===================================

    **Cost** ("estimate"): (steps + 1) passes of k vectors for the eigenpairs (a block of k
    starting vectors, so that an eigenvalue repeated up to k times is found with all its
    copies), m passes of K vectors for the density and moments (which come from the
    quadrature's first step: α₁ = vᵀFv and α₁² + β₁² = ‖Fv‖²; none with ``density=False``), and
    (steps + 1) passes of one vector per bound; each pass is one forward, one JVP and one VJP
    per batch. ("exact"): C per-example VJPs per input, 2·R·P·n flops to form the smaller side
    (n = min(R, P)) and its eigendecomposition, about 10·n³ flops. "auto" predicts both: the
    passes from a timed forward pass of the first batch (a JVP or VJP of K vectors taken as
    K forward passes, Lanczos at its ``max_steps``), the host linear algebra at 10 GFlop/s
    for eigendecompositions and 30 GFlop/s for products.
    **Variance**: Var(ξᵀFξ) = 2(‖F‖_F² − Σ F_ii²) for Rademacher ξ; the standard errors are the
    spread over the K probes. With one probe there is no spread: the error bar is the bound
    √(Var) ≤ √(2 tr F^{2j}) / P of m_j, evaluated at the probe's own estimate of m_{2j}. The
    eigenvalues carry their residuals: an eigenvalue of F lies within the residual of each.

    The learning-rate bound 2/λ_max refers to the loss with the same ``reduction`` (sum: the
    summed cross-entropy; mean: the mean). See :data:`LR_CAVEAT`.

    References
    ----------
    R. Karakida, S. Akaho, S. Amari, "Universal statistics of Fisher information in deep neural
    networks: mean field approach", AISTATS 2019.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherlib.models import MLP
    >>> from fisherlib.spectral import fisher_spectrum
    >>> model = MLP([4, 8, 3])
    >>> params = model.init(seed=0)
    >>> x = np.random.default_rng(0).normal(size=(20, 4))
    >>> s = fisher_spectrum(model, params, x, k=2)
    >>> bool(s.lambda_max_lower <= s.lambda_max <= s.lambda_max_upper <= s.trace * 3)
    True
    >>> bool(np.all(s.residuals < 1e-6 * s.lambda_max))
    True
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    t0 = time.perf_counter()
    op = FisherOperator(model, params, batches, likelihood=likelihood, reduction=reduction,
                        backend=backend, cache=cache)
    if tol is None:
        tol = 1e-8 if op.dtype == op.xp.float64 else 1e-4
    bounds = bounds and likelihood == "softmax"
    ops = [op] + ([FisherOperator(model, params, op.batches, likelihood=likelihood,
                                  bound=bd, reduction=reduction, backend=op.backend, cache=cache)
                   for bd in ("lower", "upper")] if bounds else [])
    plan = ""
    if method == "auto":
        method, plan = _plan(op, ops[1:], k, probes, slq_steps, max_steps, density, max_elements)
    bar = _bar(progress, method)
    for o in ops:
        o.on_pass = bar.update if bar is not None else None
    try:
        if method == "exact":
            out = _exact(op, ops[1:], k, max_elements)
        else:
            out = _estimate(op, ops[1:], k, probes, slq_steps, max_steps, tol, seed, density)
    finally:
        if bar is not None:
            bar.close()
    return FisherSpectrum(n_params=op.n_params, n_inputs=op.n_inputs or 0, method=method,
                          reduction=reduction, products=sum(o.products for o in ops),
                          passes=sum(o.passes for o in ops), seconds=time.perf_counter() - t0, plan=plan,
                          _op=op, **out)


def _residuals(op: FisherOperator, Y: Array, lam: np.ndarray) -> np.ndarray:
    xp = op.xp
    FY = op.matmat(Y)
    r = FY - op.asarray(lam)[:, None] * Y
    return np.asarray(_to_numpy(xp.linalg.vector_norm(r, axis=1)), dtype=np.float64)


def _exact(op, bound_ops, k, max_elements) -> dict:
    gs = gram_spectrum(op, max_elements=max_elements)
    ev = gs.eigenvalues
    k = min(k, len(ev))
    Y = gs.eigenvectors(k, op)
    out = dict(eigenvalues=ev[:k].copy(), residuals=_residuals(op, Y, ev[:k]), eigenvectors=Y,
               trace=float(ev.sum()), trace_stderr=0.0, m1=float(ev.sum() / op.n_params), m1_stderr=0.0,
               m2=float(np.sum(ev ** 2) / op.n_params), m2_stderr=0.0,
               density=exact_density(ev, op.n_params))
    if bound_ops:
        lo, hi = (float(gram_spectrum(o, max_elements=max_elements).eigenvalues[0]) for o in bound_ops)
        out.update(lambda_max_lower=lo, lambda_max_upper=hi, bracket_residuals=(0.0, 0.0))
    return out


def _estimate(op, bound_ops, k, probes, slq_steps, max_steps, tol, seed, density=True) -> dict:
    def start(s, b=1):
        V = op.backend.probes(s, (b, op.n_params), "gaussian", like=op.asarray(np.zeros(1)))
        return V[0, :] if b == 1 else V

    # A block of k starting vectors: a single Krylov sequence finds one copy of a repeated
    # eigenvalue and returns the eigenvalues below it as the next ones.
    pairs = top_eigenpairs(op.matmat, start(seed, min(k, op.n_params)), k, max_steps=max_steps, tol=tol)
    out = dict(eigenvalues=pairs.values, residuals=pairs.residuals, eigenvectors=pairs.vectors,
               trace=None, trace_stderr=None, m1=None, m1_stderr=None, m2=None, m2_stderr=None, density=None)
    if density:
        dens = slq(op, probes=probes, steps=slq_steps, seed=seed + 1)
        m1, se1 = dens.moment(1)
        m2, se2 = dens.moment(2)
        out.update(trace=m1 * op.n_params, trace_stderr=se1 * op.n_params, m1=m1, m1_stderr=se1, m2=m2,
                   m2_stderr=se2, density=dens)
    if bound_ops:
        lo, hi = (top_eigenpairs(o.matmat, start(seed + 2), 1, max_steps=max_steps, tol=tol) for o in bound_ops)
        out.update(lambda_max_lower=float(lo.values[0]), lambda_max_upper=float(hi.values[0]),
                   bracket_residuals=(float(lo.residuals[0]), float(hi.residuals[0])))
    return out


# Host linear algebra rates of the "auto" prediction (flop/s), conservative for one CPU core.
_EIGH_RATE, _GEMM_RATE = 1e10, 3e10


def _plan(op, bound_ops, k, probes, slq_steps, max_steps, density, max_elements) -> tuple[str, str]:
    """method="auto": exact or estimate, whichever is predicted to take less time (and fits)."""
    logits = op._forward(0)[0]
    if logits.ndim != 2:
        return "estimate", f"auto: estimate (logits {tuple(logits.shape)}: the exact path needs (N, C))"
    P = op.n_params
    rows = [n_rows(o) for o in [op, *bound_ops]]
    held = max(min(R, P) * P for R in rows)
    if held > max_elements:
        return "estimate", (f"auto: estimate (the exact path would hold {held:,} entries, more than "
                            f"max_elements = {max_elements:,})")
    N = sum(n_of(x) for x, _ in op.batches)
    t0 = time.perf_counter()  # one forward pass of the first batch, timed (the first may compile)
    out = op.backend.linearize(op.model, op.params, op.batches[0][0])[0]
    _to_numpy(out[:1, :1])
    fwd = (time.perf_counter() - t0) / max(1, n_of(op.batches[0][0])) * N  # a forward pass over the data

    def passes(n, K):  # n passes of K vectors: a forward, and a JVP and a VJP of K vectors
        return n * fwd * (1 + 2 * K)

    b = min(k, P)
    t_est = passes(min(max_steps, -(-P // b)) + 1, b) + len(bound_ops) * passes(min(max_steps, P) + 1, 1)
    if density:
        t_est += passes(min(slq_steps, P), probes)
    t_exact = passes(1, k)  # the residual check
    for R in rows:
        n = min(R, P)
        t_exact += fwd + 2 * fwd * R / N + 2.0 * R * P * n / _GEMM_RATE + 10.0 * n ** 3 / _EIGH_RATE
    method = "exact" if t_exact <= t_est else "estimate"
    return method, f"auto: {method} (predicted {t_exact:.2g} s exact, {t_est:.2g} s estimate)"


def _bar(show: bool, method: str):
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # pragma: no cover - tqdm ships with the test/demo extras
        raise ImportError("progress=True needs tqdm: pip install 'fisherlib[demo]'") from e
    return tqdm(desc=f"Fisher spectrum ({method})", unit="pass")
