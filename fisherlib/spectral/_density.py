"""The eigenvalue density of F: stochastic Lanczos quadrature, or exact from the Gram matrix."""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from ._lanczos import lanczos_block, tridiagonal
from ._operator import FisherOperator

__all__ = ["SpectralDensity", "slq"]


@dataclass
class SpectralDensity:
    r"""A discrete spectral measure μ = (1/K) Σ_i Σ_j τ_ij δ(λ − θ_ij), normalised to mass 1.

    With stochastic Lanczos quadrature, row i holds the Gauss-quadrature nodes θ_ij (Ritz values)
    and weights τ_ij (squared first components of T's eigenvectors) of probe i; the exact form
    has one row: F's eigenvalues with weight 1/P each (the zeros gathered in one node).

    Attributes
    ----------
    nodes, weights : ndarray (K, m)
    n_params : int
        P; ``P · μ`` counts eigenvalues.
    exact : bool
    """

    nodes: np.ndarray
    weights: np.ndarray
    n_params: int
    exact: bool = False

    @property
    def probes(self) -> int:
        return self.nodes.shape[0]

    def moment(self, j: int) -> tuple[float, float]:
        """(estimate, standard error) of m_j = tr F^j / P from the quadrature.

        Each probe's Σ τ θ^j equals vᵀF^j v for j < 2m (Gauss quadrature), an unbiased
        (Hutchinson) estimate of tr F^j / P for v = ξ/√P, ξ Rademacher; the error bar is the
        spread over the K probes (0 for the exact form). One probe has no spread: its error
        bar is the bound Var(ξᵀF^jξ / P) = 2(‖F^j‖_F² − Σ (F^j)_ii²) / P² ≤ 2 m_{2j} / P,
        at the probe's own estimate of m_{2j} (like the one-probe √2·|F̂_ii| of a diagonal).
        """
        per = np.sum(self.weights * self.nodes ** j, axis=1)
        if self.exact:
            se = 0.0
        elif len(per) > 1:
            se = float(np.std(per, ddof=1) / np.sqrt(len(per)))
        else:
            se = float(np.sqrt(2.0 * np.sum(self.weights * self.nodes ** (2 * j)) / self.n_params))
        return float(np.mean(per)), se

    def histogram(self, edges: np.ndarray) -> np.ndarray:
        """Share of the eigenvalues in each bin [edges[b], edges[b + 1]) (mass 1 in all)."""
        edges = np.asarray(edges, dtype=np.float64)
        idx = np.searchsorted(edges, self.nodes.ravel(), side="right") - 1
        keep = (idx >= 0) & (idx < len(edges) - 1)
        out = np.zeros(len(edges) - 1)
        np.add.at(out, idx[keep], self.weights.ravel()[keep])
        return out / self.probes

    def mass_below(self, x: float) -> float:
        """Share of eigenvalues below ``x`` (e.g. 1e-3 λ_max: the flat directions)."""
        return float(np.sum(self.weights * (self.nodes < x)) / self.probes)

    def evaluate(self, grid: np.ndarray, sigma: float) -> np.ndarray:
        """The density smoothed by a Gaussian of width ``sigma``: (1/K) Σ τ N(grid; θ, σ²)."""
        g = np.asarray(grid, dtype=np.float64)[:, None]
        k = np.exp(-0.5 * ((g - self.nodes.ravel()[None, :]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        return k @ self.weights.ravel() / self.probes


def slq(op: FisherOperator, *, probes: int = 16, steps: int = 30, seed: int = 0) -> SpectralDensity:
    r"""The spectral density of ``op`` by stochastic Lanczos quadrature.

    Parameters
    ----------
    op : FisherOperator
    probes : int
        K Rademacher starting vectors, run side by side (each product is one batched pass).
    steps : int
        m Lanczos steps per probe (at most P).
    seed : int

    Returns
    -------
    SpectralDensity

    Notes
    -----
    For a Rademacher ξ and v = ξ/√P, vᵀ f(F) v = Σ_j τ_j f(θ_j) exactly for polynomials f of
    degree < 2m, and E[vᵀ f(F) v] = tr f(F) / P. **Cost**: m passes over the data, each a
    product of K vectors; memory three K × P arrays (no basis is kept). **Variance** of the
    moments: that of Hutchinson's estimator, Var(ξᵀAξ) = 2(‖A‖_F² − Σ A_ii²) for Rademacher ξ,
    over K probes.

    References
    ----------
    S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature",
    SIAM J. Matrix Anal. Appl. 38 (2017). B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation
    into neural net optimization via Hessian eigenvalue density", ICML 2019.
    """
    for name, value in (("probes", probes), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    xi = op.backend.probes(seed, (probes, op.n_params), "rademacher", like=op.asarray(np.zeros(1)))
    alpha, beta, length = lanczos_block(op.matmat, xi, min(steps, op.n_params))
    m = alpha.shape[1]
    nodes, weights = np.zeros((probes, m)), np.zeros((probes, m))
    for i in range(probes):
        L = int(length[i])
        theta, S = np.linalg.eigh(tridiagonal(alpha[i, :L], beta[i, :L]))
        nodes[i, :L], weights[i, :L] = np.clip(theta, 0.0, None), S[0, :] ** 2
    return SpectralDensity(nodes, weights, op.n_params)


def exact_density(eigenvalues: np.ndarray, n_params: int) -> SpectralDensity:
    """F's exact spectrum (its nonzero eigenvalues; the remaining P − R are zeros) as a density."""
    ev = np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None))[::-1][:n_params]
    nodes = np.concatenate([ev, [0.0]])[None, :]
    weights = np.concatenate([np.full(len(ev), 1.0 / n_params), [(n_params - len(ev)) / n_params]])[None, :]
    return SpectralDensity(nodes, weights, n_params, exact=True)
