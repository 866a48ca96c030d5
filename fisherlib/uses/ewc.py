r"""Elastic weight consolidation: a Fisher-weighted quadratic anchor to earlier tasks' solutions.

After task t is learned at θ*_t with Fisher diagonal F^(t), EWC trains the next task on

    L(θ) = L_new(θ) + (λ/2) Σ_t Σ_i F^(t)_ii (θ_i − θ*_t,i)²,

(Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017, eq. 3;
the sum over earlier tasks is their multi-task form, §"EWC with multiple tasks"). The penalty is
the Laplace approximation of the log-posterior of the old tasks, with the Fisher as the
precision. **Convention:** the factor is λ/2, so the gradient is λ Σ_t F^(t) ⊙ (θ − θ*_t); the
Fisher is used as the estimate gives it: with fisherlib's default ``reduction="sum"`` F grows
with the number of inputs (the posterior's precision), with ``reduction="mean"`` it is the
per-input average that Kirkpatrick et al.'s λ multiplies.

The tasks are kept in constant memory: Σ_t F_t (θ − θ_t)² = F̄ (θ − θ̄)² + c with F̄ = Σ_t F_t,
θ̄ = Σ_t F_t θ_t / F̄ (the precision-weighted anchor) and c = Σ_t F_t (θ_t − θ̄)² ≥ 0, so the
penalty and its gradient are exact for any number of tasks at the cost of one.
"""

from __future__ import annotations

from typing import Any

from ..estimators import FisherEstimate
from . import _trees

Array = Any
Tree = Any

__all__ = ["EWC", "ewc_gradient", "ewc_penalty"]


def ewc_penalty(params: Tree, fisher: FisherEstimate | Tree, anchor: Tree, lam: float = 1.0, *,
                backend: Any = None) -> Array:
    r"""(λ/2) Σ_i F_ii (θ_i − θ*_i)², a scalar in the parameters' namespace, differentiable.

    Parameters
    ----------
    params : tree
        The parameters being trained (a torch module or tree of tensors that require grad; a JAX
        pytree, also inside ``jax.grad`` / ``jit``; any Array API tree).
    fisher : FisherEstimate or tree
        diag F of the earlier task, at ``anchor``.
    anchor : tree
        θ*, the earlier task's parameters (same structure as ``params``).
    lam : float
        λ, the strength (see the module docstring for the λ/2 convention).

    Returns
    -------
    array
        0-d, in the namespace of ``params``: ``loss = task_loss + ewc_penalty(...)`` back-
        propagates through it with torch autograd and ``jax.grad``.

    Notes
    -----
    Cost: 3 P arithmetic operations; F and θ* are taken out of any autograd graph.
    """
    return EWC(lam, backend=backend).add_task(fisher, anchor).penalty(params)


def ewc_gradient(params: Tree, fisher: FisherEstimate | Tree, anchor: Tree, lam: float = 1.0, *,
                 backend: Any = None) -> Tree:
    """λ F ⊙ (θ − θ*), the gradient of :func:`ewc_penalty`, as a tree like ``params``."""
    return EWC(lam, backend=backend).add_task(fisher, anchor).gradient(params)


class EWC:
    r"""The EWC penalty over several earlier tasks, added one at a time.

    Parameters
    ----------
    lam : float
        λ ≥ 0 of (λ/2) Σ_t Σ_i F^(t)_ii (θ_i − θ*_t,i)².
    backend
        The parameters' backend; inferred from their type when None.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherlib.uses import EWC
    >>> ewc = EWC(lam=2.0)
    >>> _ = ewc.add_task({"w": np.array([1.0, 4.0])}, {"w": np.array([0.0, 1.0])})
    >>> float(ewc.penalty({"w": np.array([1.0, 1.0])}))   # (2/2)·(1·1² + 4·0²)
    1.0

    In a torch loss (autograd differentiates the penalty)::

        ewc = EWC(lam=100.0).add_task(fisherlib.fisher(model, None, task1, reduction="mean"), model)
        loss = F.cross_entropy(model(x), y) + ewc.penalty(model)
        loss.backward()

    In a JAX loss: ``jax.grad(lambda p: loss(p) + ewc.penalty(p))(params)``.
    """

    def __init__(self, lam: float = 1.0, *, backend: Any = None):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"lam: expected a non-negative number, got {lam!r}")
        self.lam = float(lam)
        self.backend = backend
        self.tasks = 0
        self._names: list[str] | None = None
        self._precision: list[Array] | None = None  # F̄ = Σ_t F_t
        self._anchor: list[Array] | None = None  # θ̄ = Σ_t F_t θ_t / F̄
        self._offset = 0.0  # c = Σ_t F_t (θ_t − θ̄)², summed over entries

    def add_task(self, fisher: FisherEstimate | Tree, anchor: Tree) -> EWC:
        """Consolidate a task learned at ``anchor`` with Fisher diagonal ``fisher``; returns self.

        ``anchor`` is copied (a torch module's parameters are detached), so training may go on
        in place.
        """
        lv = _trees.split(anchor, self.backend, argname="anchor")
        F = _trees.diagonal(fisher, lv)
        theta = [_trees.copy(t) for t in lv.arrays]
        xp = lv.xp
        for name, f in zip(lv.names, F):
            if _trees.is_eager(f) and bool(xp.any(f < 0)):
                raise ValueError(f"fisher: leaf {name!r} has negative entries; a Fisher diagonal is >= 0")
        if self._precision is None:
            self._names, self._precision, self._anchor = lv.names, F, theta
        else:
            if lv.names != self._names:
                raise ValueError(f"anchor: expected the leaves {self._names} of the earlier tasks, "
                                 f"got {lv.names}")
            new_p, new_a, offset = [], [], 0.0
            for P, A, f, t in zip(self._precision, self._anchor, F, theta):
                total = P + f
                safe = xp.where(total > 0, total, xp.ones_like(total))
                a = xp.where(total > 0, (P * A + f * t) / safe, t)
                # The exact constant: old tasks' spread about the new anchor, in O(1) memory.
                offset += float(xp.sum(P * (A - a) ** 2 + f * (t - a) ** 2))
                new_p.append(total)
                new_a.append(a)
            self._precision, self._anchor = new_p, new_a
            self._offset += offset
        self.tasks += 1
        return self

    def penalty(self, params: Tree) -> Array:
        r"""(λ/2) [Σ_i F̄_i (θ_i − θ̄_i)² + c] = (λ/2) Σ_t Σ_i F^(t)_ii (θ_i − θ*_t,i)²."""
        arrays = self._leaves(params)
        total = None
        for P, A, t in zip(*self._moved(arrays), arrays):
            xp = _trees.array_namespace(t)
            term = xp.sum(P * (t - A) ** 2)
            total = term if total is None else total + term
        return 0.5 * self.lam * (total + self._offset)

    def gradient(self, params: Tree) -> Tree:
        r"""λ Σ_t F^(t) ⊙ (θ − θ*_t) = λ F̄ ⊙ (θ − θ̄), as a tree like ``params``."""
        lv = _trees.split(params, self.backend)
        arrays = self._leaves(params, lv)
        return lv.build([self.lam * P * (t - A) for P, A, t in zip(*self._moved(arrays), arrays)])

    def _moved(self, arrays: list[Array]) -> tuple[list[Array], list[Array]]:
        """F̄ and θ̄ in the namespace, device and dtype of the parameters ``arrays`` (a NumPy
        anchor for torch parameters, say), converted once and kept for the next call."""
        key = tuple((type(t), str(_trees.device(t)), str(t.dtype)) for t in arrays)
        cached = getattr(self, "_cache", None)
        if cached is None or cached[0] != key or cached[1] is not self._precision:
            moved = ([_trees._to(P, t) for P, t in zip(self._precision, arrays)],
                     [_trees._to(A, t) for A, t in zip(self._anchor, arrays)])
            self._cache = (key, self._precision, moved)
        return self._cache[2]

    def _leaves(self, params: Tree, lv: _trees.Leaves | None = None) -> list[Array]:
        if self._precision is None:
            raise ValueError("params: no task was added yet; call add_task(fisher, anchor) first")
        lv = lv or _trees.split(params, self.backend)
        if lv.names != self._names:
            raise ValueError(f"params: expected the leaves {self._names}, got {lv.names}")
        return lv.arrays

    def __repr__(self) -> str:
        return f"EWC(lam={self.lam}, tasks={self.tasks})"
