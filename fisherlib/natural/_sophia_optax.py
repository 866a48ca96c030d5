"""Sophia's schedule with fisherlib's Fisher diagonal as an ``optax.GradientTransformation``.

The optax twin of ``NaturalGradient(model, preconditioner="sophia")``
(:class:`~fisherlib.natural.FisherSophia`): the same rule, its state a pytree, its update
traceable under ``jax.jit``. The probe gradients come as those of
:func:`~fisherlib.natural.natural_gradient` do: from :func:`~fisherlib.natural.value_grad_and_probes`
(one forward and one ``vmap`` of the pullback over the loss and probe cotangents), with
``probes=1`` on refresh steps and ``probes=0`` between them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import backends as _backends
from ..estimators._running import init_state, layout, state_value, update_state
from ._sophia_checks import check_hyper

__all__ = ["SophiaState", "sophia"]


class SophiaState(NamedTuple):
    count: jax.Array
    exp_avg: Any  # m, shaped like the parameters
    fisher: dict  # the running diagonal: "m" (and "s"), "w", "w2", "t" (fisherlib.estimators._running)


def scale_by_sophia(*, betas: tuple[float, float] = (0.965, 0.99), gamma: float = 0.04, eps: float = 1e-12,
                    stderr: bool = False) -> optax.GradientTransformationExtraArgs:
    """clip(m / max(γ h, ε), −1, 1) with m the gradient's EMA and h the running Fisher diagonal (no
    learning rate, no decay): the core of :func:`sophia`. ``update(..., probe_grads=, n=)`` refreshes h."""
    be = _backends.get("jax")
    b1, b2 = float(betas[0]), float(betas[1])

    def _layout(tree):
        named = be.leaves(tree)
        return layout([n for n, _ in named], [tuple(x.shape) for _, x in named], "diag")

    def init(params):
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves:
            raise ValueError("params: expected at least one array leaf, got an empty tree")
        return SophiaState(jnp.zeros((), jnp.int32), jax.tree_util.tree_map(jnp.zeros_like, params),
                           init_state(_layout(params), leaves[0], stderr=stderr))

    def refreshed(lay, fisher, probe_grads, n):
        if n is None:
            raise ValueError("n: the number of outputs the probes ran over is needed with probe_grads")
        if not isinstance(n, (int, float)):  # traced: in the estimate's dtype (no promotion)
            n = jnp.asarray(n).astype(fisher["w"].dtype)
        return update_state(lay, fisher, [x for _, x in be.leaves(probe_grads)], n, b2)

    def update(updates, state, params=None, *, probe_grads=None, n=None, refresh=None, **extra):
        del params, extra
        lay = _layout(updates)
        fisher = state.fisher
        if refresh is not None:  # one program: lax.cond between folding the probes in and keeping h
            if probe_grads is None:
                raise ValueError("probe_grads: update(refresh=...) needs the probe gradients every step "
                                 "(zeros between refreshes: value_grad_and_probes(..., when=refresh))")
            fisher = jax.lax.cond(jnp.asarray(refresh, dtype=bool), lambda f: refreshed(lay, f, probe_grads, n),
                                  lambda f: f, fisher)
        elif probe_grads is not None:  # a refresh: fold the probe gradients into the running diagonal
            fisher = refreshed(lay, fisher, probe_grads, n)
        h = state_value(fisher)
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.exp_avg, updates)
        named = be.leaves(m)
        steps = [jnp.clip(x / jnp.maximum(gamma * h["diag:" + name].astype(x.dtype), eps), -1.0, 1.0)
                 for name, x in named]
        return be.unflatten(m, steps), SophiaState(state.count + 1, m, fisher)

    return optax.GradientTransformationExtraArgs(init, update)


def sophia(learning_rate: float | Callable, *, betas: tuple[float, float] = (0.965, 0.99), gamma: float = 0.04,
           eps: float = 1e-12, weight_decay: float = 0.1, mask: Any = None,
           stderr: bool = False) -> optax.GradientTransformationExtraArgs:
    r"""Sophia's clipped diagonal step with fisherlib's running Fisher diagonal, as optax.

    θ ← θ − η (clip(m / max(γ h, ε), −1, 1) + wd·θ), m ← β₁ m + (1 − β₁) g, and on refresh steps
    h ← the bias-corrected EMA (β₂) of the Hutchinson diagonal of the probe gradients: the rule
    of ``NaturalGradient(model, preconditioner="sophia")`` (:class:`~fisherlib.natural.FisherSophia`,
    where the differences from Sophia-G are listed). ``natural_gradient(lr, preconditioner="sophia",
    ...)`` returns the same.

    ``update(grads, state, params, *, probe_grads=None, n=None)``: with ``probe_grads`` (from
    :func:`~fisherlib.natural.value_grad_and_probes` over ``n`` outputs) h is refreshed first;
    without them the last h is used (before the first refresh h = 0: every step sign(m)·η).
    Refresh every k steps by calling ``value_grad_and_probes`` with ``probes=1`` when
    ``step % k == 0`` and ``probes=0`` otherwise (two compilations of a jitted step), or, as
    :func:`~fisherlib.natural.natural_gradient`, compile the step once: ``refresh = count % k == 0``
    (traced), ``value_grad_and_probes(..., probes=1, when=refresh)`` and
    ``update(..., probe_grads=, n=, refresh=refresh)``, which chooses by ``jax.lax.cond``.

    Parameters
    ----------
    learning_rate : float or schedule
        η, or an optax schedule of the step count.
    betas, gamma, eps
        As :class:`~fisherlib.natural.FisherSophia`'s (Sophia-G's (0.965, 0.99), 0.04).
    weight_decay : float
        Decoupled weight decay (``optax.add_decayed_weights``); needs ``params`` in ``update``.
    mask : pytree or callable, optional
        Which leaves decay (``optax.add_decayed_weights``'s ``mask``): the parameter groups of
        the torch optimizer.
    stderr : bool
        Keep the second moments of the estimate (its error bar from
        :func:`fisherlib.estimators._running.state_stderr`).

    Returns
    -------
    optax.GradientTransformationExtraArgs
        Its state is a pytree: ``(SophiaState(count, exp_avg, fisher), decay state, lr state)``.
    """
    check_hyper(lr=learning_rate if not callable(learning_rate) else 1.0, betas=betas, gamma=gamma, eps=eps,
                 weight_decay=weight_decay)
    parts = [scale_by_sophia(betas=betas, gamma=gamma, eps=eps, stderr=stderr)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
