"""``optax.GradientTransformation`` taking natural-gradient steps from a running Fisher estimate.

The Fisher terms come from :func:`value_grad_and_probes` (one forward, one ``vmap`` of the
pullback over [loss cotangent; K probe cotangents]); the transformation keeps their EMA in its
state, a pytree, and preconditions the gradient. Everything traces under ``jax.jit``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import backends as _backends
from ..core import cotangents
from ..estimators._running import (NO_TARGETS, ONE_LOGIT, _cross_entropy, _sigmoid_training_cotangents, init_state,
                                   layout, state_value, update_state)
from ._cached import Preconditioner
from ._precondition import KINDS, UNIT_SOLVES, Curvature, structure_for

__all__ = ["NaturalGradientState", "natural_gradient", "value_grad_and_probes"]


class NaturalGradientState(NamedTuple):
    count: jax.Array
    fisher: dict  # the running estimate: "m", "s" (terms), "w", "w2", "t"
    momentum: Any
    factors: list  # (F̃ + λI)⁻¹ prepared at the last refresh (Preconditioner.arrays())


def value_grad_and_probes(model: Callable, params: Any, inputs: Any, targets: Any, seed: Any, *,
                          probes: int = 1, loss: Callable | None = None, likelihood: str = "softmax",
                          when: Any = None):
    """(loss, gradient, probe gradients) from one forward and one batched pullback.

    ``loss=None``: mean cross-entropy against class indices ``targets`` (``likelihood="sigmoid"``:
    mean binary cross-entropy against 0/1 targets shaped like the logits, a binary classifier
    with one logit); else ``loss(logits, targets)`` (a scalar). The probes are the
    likelihood's (softmax: B(p)ξ; sigmoid: √σ′(z) ⊙ ξ); one logit under "softmax" is an error
    (its Fisher is 0). ``probe_grads`` has a leading K on every leaf (None for ``probes=0``, a
    plain training step). ``seed`` may be a traced integer or a PRNG key. Pass ``probe_grads``
    and the batch size to the transformation's ``update``. ``loss`` is differentiated with
    respect to the logits only: a penalty on the parameters (L2, EWC) adds its own gradient,
    ``grads = jax.tree_util.tree_map(jnp.add, grads, jax.grad(penalty)(params))``.

    ``when`` (a boolean, traced under ``jax.jit``: ``state.count % 10 == 0``) pulls the probes
    back only when true (``jax.lax.cond``) and otherwise returns zeros of the same shapes, so
    that a training step with a refresh every few steps is one compiled function; pass the same
    ``when`` as the transformation's ``update(..., refresh=when)``.
    """
    if likelihood not in ("softmax", "sigmoid"):
        raise ValueError(f"likelihood: expected 'softmax' or 'sigmoid', got {likelihood!r}")
    if when is not None:
        if probes == 0:
            raise ValueError("when: needs probes > 0 (the refresh steps' probes)")

        def probed():
            return value_grad_and_probes(model, params, inputs, targets, seed, probes=probes, loss=loss,
                                         likelihood=likelihood)

        def plain():  # the loss and its gradient alone; the probe gradients' zeros are never pulled back
            value, grads, _ = value_grad_and_probes(model, params, inputs, targets, seed, probes=0, loss=loss,
                                                    likelihood=likelihood)
            return value, grads, jax.tree_util.tree_map(lambda g: jnp.zeros((probes, *g.shape), g.dtype), grads)

        return jax.lax.cond(jnp.asarray(when, dtype=bool), probed, plain)
    if loss is None and targets is None:
        raise ValueError(NO_TARGETS)
    be = _backends.get("jax")
    logits, vjp = be.linearize(model, params, inputs)
    z = logits.reshape(-1, logits.shape[-1])
    if likelihood == "softmax" and z.shape[-1] == 1:
        raise ValueError(f"logits: shape {tuple(logits.shape)}: {ONE_LOGIT}")
    sigmoid = likelihood == "sigmoid"
    y = None
    if loss is None:
        y = jnp.asarray(targets).astype(z.dtype).reshape(z.shape) if sigmoid else jnp.asarray(targets).reshape(-1)
    if probes == 0:
        if loss is not None:
            value, ct = jax.value_and_grad(loss)(logits, targets)
        elif sigmoid:
            value, ct, _ = _sigmoid_training_cotangents(z, y, jnp.zeros((0, *z.shape), z.dtype))
        else:
            value, ct = _cross_entropy(z, y)
        return value, vjp(ct.reshape(logits.shape)), None
    xi = be.probes(seed, (probes, *z.shape), "rademacher", like=z)
    if loss is None and sigmoid:
        value, ct, hut = _sigmoid_training_cotangents(z, y, xi)
        cts = jnp.concatenate([ct[None], hut], axis=0)
    elif loss is None:  # the loss and probe cotangents from one log-softmax
        value, cts = cotangents.cross_entropy_and_hutchinson(z, y, xi)
    else:
        value, ct = jax.value_and_grad(loss)(logits, targets)
        cts = jnp.concatenate([ct.reshape(z.shape)[None], cotangents.hutchinson(z, xi, likelihood)], axis=0)
    pulled = vjp(cts.reshape(probes + 1, *logits.shape))
    return value, jax.tree_util.tree_map(lambda g: g[0], pulled), jax.tree_util.tree_map(lambda g: g[1:], pulled)


def _cho_solve(L, v):
    return jax.scipy.linalg.cho_solve((L, True), v[..., None])[..., 0]


# Dense blocks: a Cholesky factor at a refresh (a third of an LU solve's work), two triangular
# solves per step (O(S²)).
_CHOLESKY = (jnp.linalg.cholesky, _cho_solve)


def scaled_step(grads: Any, d: Any, lr: Any, kl_clip: float | None, momentum: float, mom: Any) -> tuple[Any, Any]:
    """(−η·d, momentum): η scaled by min(1, √(κ / (η² gᵀd))) (K-FAC's KL clip), then heavy-ball momentum."""
    if kl_clip is not None:
        gd = sum(jnp.vdot(g, x) for g, x in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(d)))
        lr = lr * jnp.minimum(1.0, jnp.sqrt(kl_clip / jnp.maximum(lr * lr * gd, 1e-30)))
    if momentum:
        mom = jax.tree_util.tree_map(lambda m, x: momentum * m + x, mom, d)
        d = mom
    return jax.tree_util.tree_map(lambda x: -lr * x, d), mom


def natural_gradient(learning_rate: float | Callable, *, preconditioner: str = "ollivier", damping: float = 1e-2,
                     decay: float | None = 0.95, momentum: float = 0.0, kl_clip: float | None = 1e-2,
                     unit_solve: str = "auto", pinv: bool = False, relative_damping: bool = False,
                     kfac: Any = None, **sophia_options: Any) -> optax.GradientTransformationExtraArgs:
    r"""Natural-gradient steps −η·(F̃ + λI)⁻¹ g as an optax transformation.

    ``update(grads, state, params=None, *, probe_grads=None, n=None, refresh=None)``: with
    ``probe_grads`` (from :func:`value_grad_and_probes`, over ``n`` inputs) the Fisher's EMA is
    updated and factorised first; without them (steps between refreshes) the kept factorisation
    is applied. With ``refresh`` (a boolean, traced under ``jax.jit``, e.g.
    ``state.count % 10 == 0``) the choice is ``jax.lax.cond``'s instead: pass ``probe_grads`` every
    step (zeros between refreshes: ``value_grad_and_probes(..., when=refresh)``), and the whole
    update, the refresh included, is one pure function that compiles once.

    Parameters
    ----------
    learning_rate : float or schedule
        η, or an optax schedule of the step count (e.g. set from λ_max with
        :func:`~fisherlib.natural.lr_from_lambda_max`).
    preconditioner, damping, unit_solve, pinv
        See :func:`~fisherlib.natural.precondition`; the defaults (Ollivier's step, λ = 10⁻²)
        are :class:`~fisherlib.natural.NaturalGradient`'s. Probe every 10 steps, as its
        ``refresh=10`` does (``probes=0`` in between). ``preconditioner="kfac"``: Kronecker
        factors instead of the running estimate (:func:`kfac_natural_gradient`, docs/kfac.md):
        pass a first ``kfac=fisher(f, params, batch, structure="kfac", reduction="mean")`` and,
        at each refresh, ``update(..., kfac=<the refresh batch's estimate>)``.
        ``preconditioner="sophia"``: Sophia's clipped diagonal step with the running Fisher
        diagonal (:func:`~fisherlib.natural.sophia`, which takes ``sophia_options``: ``betas``,
        ``gamma``, ``eps``, ``weight_decay``, ``mask``, ``stderr``; the solve options here are
        then an error).
    relative_damping : bool
        λ_l = ``damping`` · mean diag F̃ over each leaf (see :class:`~fisherlib.natural.NaturalGradient`).
    decay : float or None
        EMA decay of the Fisher terms (None: running mean).
    momentum : float
        Heavy-ball momentum on the preconditioned direction.
    kl_clip : float or None
        Scales the step by min(1, √(κ / (η² gᵀd))) (K-FAC's trust region).

    Notes
    -----
    The state is a pytree (``NaturalGradientState``): checkpoint it as any optax state. The
    probes' refresh interval is the caller's: call :func:`value_grad_and_probes` with
    ``probes=K`` every few steps and ``probes=0`` in between. A refresh factorises F̃ + λI
    (:class:`~fisherlib.natural.Preconditioner`) and keeps the factors in the state; the steps
    in between only apply them (dense blocks: a Cholesky factor, then two triangular solves per
    step instead of an LU solve).
    """
    if preconditioner == "sophia":  # Sophia's clipped diagonal step, not a damped solve
        from ._sophia_checks import UNUSED
        from ._sophia_optax import sophia

        given = dict(damping=(damping, 1e-2), decay=(decay, 0.95), momentum=(momentum, 0.0), kl_clip=(kl_clip, 1e-2),
                     unit_solve=(unit_solve, "auto"), pinv=(pinv, False), relative_damping=(relative_damping, False),
                     kfac=(kfac, None))
        for name, (value, default) in given.items():
            if value != default:
                raise TypeError(f"{name}: not an option of preconditioner='sophia' ({UNUSED[name]})")
        return sophia(learning_rate, **sophia_options)
    if sophia_options:
        raise TypeError(f"{sorted(sophia_options)[0]}: unexpected keyword argument of natural_gradient "
                        f"(preconditioner={preconditioner!r}; betas, gamma, eps, ... are preconditioner='sophia''s)")
    if preconditioner == "kfac":  # Kronecker factors from fisher(structure="kfac"), not the running diagonal
        if kfac is None:
            raise ValueError("kfac: preconditioner='kfac' needs a first K-FAC estimate, "
                             "kfac=fisher(f, params, batch, structure='kfac', reduction='mean')")
        from ._kronecker_optax import kfac_natural_gradient

        return kfac_natural_gradient(learning_rate, kfac, damping=damping, decay=0.0 if decay is None else decay,
                                     momentum=momentum, kl_clip=kl_clip)
    if preconditioner not in KINDS:
        raise ValueError(f"preconditioner: expected one of {KINDS + ('kfac', 'sophia')}, got {preconditioner!r}")
    if kfac is not None:
        raise ValueError(f"kfac: only used with preconditioner='kfac', got preconditioner={preconditioner!r}")
    if unit_solve not in UNIT_SOLVES:
        raise ValueError(f"unit_solve: expected one of {UNIT_SOLVES}, got {unit_solve!r}")
    if kl_clip is not None and not kl_clip > 0:
        raise ValueError(f"kl_clip: expected a positive number or None, got {kl_clip!r}")
    be = _backends.get("jax")
    structure = structure_for(preconditioner, unit_solve)
    lr_fn = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def _layout(params):
        named = be.leaves(params)
        return layout([n for n, _ in named], [tuple(x.shape) for _, x in named], structure)

    def _factorise(lay, fisher):
        return Preconditioner(Curvature(lay, state_value(fisher)), preconditioner, damping, unit_solve=unit_solve,
                              pinv=pinv, factor=_CHOLESKY, static=True, relative_damping=relative_damping)

    def init(params):
        leaves = jax.tree_util.tree_leaves(params)
        mom = jax.tree_util.tree_map(jnp.zeros_like, params) if momentum else optax.EmptyState()
        lay = _layout(params)
        fisher = init_state(lay, leaves[0], stderr=False)
        return NaturalGradientState(jnp.zeros((), jnp.int32), fisher, mom, _factorise(lay, fisher).arrays())

    def refreshed(lay, fisher, probe_grads, n):
        """The new estimate and its factorisation (F̃ + λI)⁻¹."""
        if n is None:
            raise ValueError("n: the batch size is needed with probe_grads")
        if not isinstance(n, (int, float)):  # traced: in the estimate's dtype (no promotion)
            n = jnp.asarray(n).astype(fisher["w"].dtype)
        fisher = update_state(lay, fisher, [x for _, x in be.leaves(probe_grads)], n, decay)
        return fisher, _factorise(lay, fisher)

    def update(updates, state, params=None, *, probe_grads=None, n=None, refresh=None, **extra):
        lay = _layout(updates)
        fisher = state.fisher
        if refresh is not None:  # one program: lax.cond between the refresh and the kept factorisation
            if probe_grads is None:
                raise ValueError("probe_grads: update(refresh=...) needs the probe gradients every step "
                                 "(zeros between refreshes: value_grad_and_probes(..., when=refresh))")

            def fresh(f):
                f, pre = refreshed(lay, f, probe_grads, n)
                return f, pre.arrays()

            fisher, factors = jax.lax.cond(jnp.asarray(refresh, dtype=bool), fresh, lambda f: (f, state.factors),
                                           fisher)
            pre = _factorise(lay, fisher).with_arrays(factors)  # (its own factorisation: dead code under jit)
        elif probe_grads is not None:  # refresh: factorise the new estimate, keep it in the state
            fisher, pre = refreshed(lay, fisher, probe_grads, n)
            factors = pre.arrays()
        else:  # between refreshes: apply the kept factorisation (what builds `pre` is dead code under jit)
            factors = state.factors
            pre = _factorise(lay, fisher).with_arrays(factors)
        d = be.unflatten(updates, pre.apply([x for _, x in be.leaves(updates)]))
        lr = lr_fn(state.count)
        out, mom = scaled_step(updates, d, lr, kl_clip, momentum, state.momentum)
        return out, NaturalGradientState(state.count + 1, fisher, mom, factors)

    return optax.GradientTransformationExtraArgs(init, update)

