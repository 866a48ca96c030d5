"""The Fisher inside the training loop: probes pulled back with the loss gradient, averaged over steps.

Per training step on a batch of N inputs, the loss cotangent ∂L/∂z and K Hutchinson cotangents
B(p̃)ξ_k are pulled back through the step's own forward pass: in one batched call, or one call
per row where the adapter says that is faster (``batched(like)``: torch on a CPU). Row 0 is the
loss gradient; rows 1..K are probe gradients
g_k = Σ_x J_xᵀ B_x ξ_x with E[g_k g_kᵀ] = F (the batch's Fisher, a sum over inputs), so every
entry of g_k g_kᵀ / N is an unbiased estimate of the same entry of the per-input mean Fisher:

=============  ===============================================  ========================
structure      terms kept (each a mean over the K probes)        memory
=============  ===============================================  ========================
"diag"         g_i²                                              P
"quasidiag"    g_i², and per unit g_{w_j} g_b (bias–weight)      ≈ 2P
"unitwise"     per unit the (n+1)² block of (g_w, g_b)           Σ_units (n+1)²
"blocks"       per leaf its dense block g gᵀ                     Σ_leaves P_leaf²
=============  ===============================================  ========================

The terms are averaged over steps with weights: m ← β m + α q, W ← β W + α, W₂ ← β² W₂ + α²,
with (β, α) = (decay, 1 − decay) for an exponential moving average or (1, 1) for a plain
running mean (``decay=None``). The estimate is m / W (bias-corrected EMA), and its standard
error treats the steps' terms as independent draws of variance σ² (estimated from a
second-moment average s the same way): se = √((s/W − (m/W)²) · W₂ / W² / K). Since θ moves, the
drift of F over the averaging window enters σ² too: the error bar is then conservative for the
current F only if F changes slowly over ~1/(1 − β) steps.

The functions here are pure (state in, state out, arrays of any Array API namespace), so that
an optax transformation can run them under ``jax.jit``; :class:`RunningFisher` wraps them for
eager use.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .. import backends as _backends
from ..core import cotangents
from ..core._compat import array_namespace, device, is_eager
from ..backends._registry import state_class
from ._compiled import warn_compile_fallback
from ._seeds import derive, derive_array
from ._units import STRUCTURES, Layout, Unit, from_units, layout, to_units, units

Array = Any

__all__ = ["Layout", "LogitsWarning", "RunningFisher", "Unit", "fold", "from_units", "init_state", "layout", "probe_terms",
           "to_units", "units", "update_state"]

def probe_terms(lay: Layout, grads: Sequence[Array], n: int) -> dict[str, Array]:
    """Per-probe terms (K, ...) of the estimate from probe gradients ``grads`` (K, *leaf), / n."""
    xp = array_namespace(*grads)
    rows = _rows(grads)
    return {key: xp.stack([_term(lay, key, gs) for gs in rows]) / n for key in lay.keys}


def _rows(grads: Sequence[Array]) -> list[list[Array]]:
    """Per-leaf (K, *leaf) arrays as K rows of leaves (views where the namespace has them)."""
    return [[g[k, ...] for g in grads] for k in range(grads[0].shape[0])]


def _term(lay: Layout, key: str, gs: Sequence[Array], *, overwrite: bool = False) -> Array:
    """One probe's raw term for ``key`` from its leaf gradients ``gs``: g², g_w g_b, v vᵀ or g gᵀ.

    ``overwrite`` squares a diagonal term's gradient in place (it must be the caller's to lose).
    """
    kind, name = key.split(":", 1)
    g = gs[lay.names.index(name)]
    if kind == "diag":  # (no namespace lookup: microseconds a leaf on a small model's step)
        if overwrite:
            g *= g
            return g
        return g * g
    xp = array_namespace(g)
    if kind == "block":
        v = xp.reshape(g, (-1,))
        return v[:, None] * v[None, :]
    u = lay.unit(name)
    v = to_units(u, g, None if u.bias is None else gs[u.bias], lead=0)  # (U, S)
    return v[..., :-1] * v[..., -1:] if kind == "cross" else xp.matmul(v[..., :, None], v[..., None, :])


def init_state(lay: Layout, like: Array, *, stderr: bool = True) -> dict[str, Any]:
    """Zero state (``m``, and ``s`` unless ``stderr=False``, per term; weights ``w``, ``w2``; step
    count ``t``) on ``like``'s device."""
    xp = array_namespace(like)
    dt, dev = like.dtype, device(like)

    def zeros():  # fresh arrays for each moment: the eager update writes them in place
        return {key: xp.zeros(_term_shape(lay, *key.split(":", 1)), dtype=dt, device=dev) for key in lay.keys}

    scalar = xp.zeros((), dtype=dt, device=dev)
    state = {"m": zeros(), "w": scalar, "w2": scalar, "t": xp.zeros((), dtype=dt, device=dev)}
    if stderr:
        state["s"] = zeros()
    return state


def _term_shape(lay: Layout, kind: str, name: str) -> tuple[int, ...]:
    shape = lay.shapes[lay.names.index(name)]
    if kind == "diag":
        return shape
    if kind == "block":
        P = math.prod(shape)
        return (P, P)
    u = lay.unit(name)
    return (u.units, u.fan_in) if kind == "cross" else (u.units, u.size, u.size)


def update_state(lay: Layout, state: dict, grads: Sequence[Array], n: int, decay: float | None) -> dict:
    """New state after one step's probe gradients ``grads`` (K, *leaf) over ``n`` inputs (pure).

    m ← β m + (α/n) mean_k q_k and s ← β s + (α/n²) mean_k q_k² for the raw terms q_k (g², g_w g_b,
    unit outer products).
    """
    return fold(lay, state, _rows(grads), n, decay)


def fold(lay: Layout, state: dict, rows: Sequence[Sequence[Array]], n: int, decay: float | None,
         probes: int | None = None) -> dict:
    """:func:`update_state` from K ``rows`` of leaf gradients (one list of leaves per probe), pure:
    what a compiled (JAX) step runs; eager steps use :func:`fold_scaled` in place.

    ``probes``: the K that :func:`state_stderr` will divide by (default: this step's K); a step
    of K ≠ ``probes`` rows adds α²·probes/K to W₂, so that the error bar counts its K draws.
    """
    beta, alpha = _ema_weights(decay)
    K = len(rows)
    c = alpha / (n * K)  # m's weight of each probe's raw term; s's is (α/(n²K)) = c² · K/α
    w2_step = alpha * alpha * (1.0 if probes is None else probes / K)
    out = {"m": {}, "w": beta * state["w"] + alpha, "w2": beta * beta * state["w2"] + w2_step,
           "t": state["t"] + 1}
    moments = ("m", "s") if "s" in state else ("m",)
    for part in moments[1:]:
        out[part] = {}
    for key in lay.keys:
        acc = {part: beta * state[part][key] for part in moments}  # new arrays, added to below
        for gs in rows:
            q = _term(lay, key, gs)
            q *= c
            acc["m"] += q
            if "s" in acc:
                q *= q
                q *= K / alpha
                acc["s"] += q
        for part in moments:
            out[part][key] = acc[part]
    return out


def _ema_weights(decay: float | None) -> tuple[float, float]:
    """(β, α) of m ← β m + α q: (decay, 1 − decay), or (1, 1) for a plain running sum."""
    return (1.0, 1.0) if decay is None else (float(decay), 1.0 - float(decay))


def fold_scaled(lay: Layout, state: dict, rows: Sequence[Sequence[Array]], *, gain: float, own_rows: bool) -> None:
    """Eager in-place form of :func:`fold` for moments kept in a shrinking unit u (m = M·u, s = S·u).

    With u' = β u and the rows' gradients already multiplied by σ = √(α / (n K u')), the update
    m ← β m + (α/(nK)) Σ_k q_k becomes M ← M + Σ_k q'_k (q' = σ² q, the terms of the scaled
    gradients), and s ← β s + (α/(n²K)) Σ_k q_k² becomes S ← S + ``gain`` Σ_k q'_k² with
    gain = K u'/α: no pass to decay the state, none to weight the terms. The caller folds σ into
    the cotangents and renormalises (M, S ← M u, S u; u ← 1) before u underflows.
    """
    # Diagonal terms last: squaring a leaf in place must come after the unit terms that read it.
    for key in sorted(lay.keys, key=lambda k: k.startswith("diag:")):
        M, S = state["m"][key], state.get("s", {}).get(key)
        for gs in rows:
            q = _term(lay, key, gs, overwrite=own_rows)
            M += q
            if S is not None:
                q *= q
                q *= gain
                S += q
        state["m"][key] = M  # the same array, or (immutable arrays: JAX) the new one
        if S is not None:
            state["s"][key] = S


def state_value(state: dict, unit: float = 1.0) -> dict[str, Array]:
    """The estimate m / W of every term (zeros before the first step); m = M·``unit``."""
    w = state["w"]
    scale = unit / (w + (w == 0))  # once for every term
    return {k: v * scale for k, v in state["m"].items()}


def state_stderr(state: dict, probes: int, unit: float = 1.0) -> dict[str, Array]:
    """The standard error of every term (see the module's notes); m = M·``unit``, s = S·``unit``."""
    if "s" not in state:
        raise ValueError("stderr: this running estimate keeps no second moments (made with stderr=False)")
    w, w2 = state["w"], state["w2"]
    out = {}
    for k, m in state["m"].items():
        xp = array_namespace(m)
        safe = w + (w == 0)
        mean = m * (unit / safe)
        var = xp.clip(state["s"][k] * (unit / safe) - mean * mean, min=0.0)
        out[k] = xp.sqrt(var * w2 / (safe * safe) / probes)
    return out


class RunningFisher:
    """A running (EMA or cumulative) Fisher estimate fed by the training step's own backward pass.

    Parameters
    ----------
    structure : {"diag", "quasidiag", "unitwise", "blocks"}
        Terms to keep (module notes): enough for the diagonal, quasi-diagonal / Ollivier,
        unit-wise and per-layer preconditioners of :mod:`fisherlib.natural`.
    probes : int
        K, Hutchinson probes per step, pulled back in the same batched backward as the loss.
    decay : float or None
        EMA decay β in [0, 1); ``None`` keeps a plain running mean over all steps.
    dist : {"rademacher", "gaussian"}
    likelihood : {"softmax", "sigmoid"}
        The outputs' distribution: a softmax over C ≥ 2 classes (``loss=None``: the mean
        cross-entropy against class indices), or C independent Bernoulli outputs (a binary
        classifier with one logit; ``loss=None``: the mean binary cross-entropy over the N·C
        outputs against 0/1 targets shaped like the logits, as torch's
        ``binary_cross_entropy_with_logits``). One logit under "softmax" is an error (its Fisher is 0).
    seed : int
        Step t draws its probes from a seed derived from (seed, t).
    backend
        A backend name or object; default: inferred from the parameters.
    stderr : bool
        Keep the second moments for :attr:`stderr` (``False`` saves their memory and about half
        the update's work: what an optimizer needs).
    ignore_index : int or None
        Class-index targets equal to it (HuggingFace's -100 marks padding and prompt tokens)
        count in neither the loss nor the Fisher: the loss is the mean over the counted outputs,
        and the estimate is the per-output mean Fisher over them (as ``fisher(ignore_index=)``).
        ``None``: every target must be a class index.

    Notes
    -----
    Under JAX the estimate is a pytree (its state's arrays the leaves): pass it into your own
    jitted training step and return it (``rf, loss, g = train(rf, ...)`` with
    ``loss, g = rf.step(...)`` inside); the probes' seed follows the traced step count, so the
    steps equal the eager ones. A jitted function that captures an estimate holding a state,
    rather than taking it as an argument, raises an error: later calls would not count.

    Cost per step: the forward pass of the training step and the backward of 1 + K cotangents
    through its graph (JAX ``vmap`` of the pullback; torch one ``autograd.grad`` per row on a CPU,
    ``is_grads_batched`` elsewhere), plus O(N·C) for the cotangents and two in-place passes over
    the terms (five with ``stderr``; :func:`fold_scaled`). Bias: each step's terms are unbiased for the per-input
    mean Fisher at that step's θ; the EMA weights recent steps. Variance of a diagonal entry of
    one step: ≤ 2 F_ii² / K (Rademacher), divided by the effective number of steps W²/W₂.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherlib.estimators import RunningFisher
    >>> from fisherlib.models import Linear
    >>> model = Linear(4, 3); params = model.init(seed=0, like=np.zeros(1))
    >>> x, y = np.random.default_rng(0).normal(size=(32, 4)), np.arange(32) % 3
    >>> rf = RunningFisher("quasidiag", probes=2, decay=0.9)
    >>> loss, grads = rf.step(model, params, x, y)
    >>> sorted(rf.value)
    ['cross:weight', 'diag:bias', 'diag:weight']
    """

    def __init__(self, structure: str = "diag", *, probes: int = 1, decay: float | None = 0.95,
                 dist: str = "rademacher", likelihood: str = "softmax", seed: int = 0, backend: Any = None,
                 stderr: bool = True, ignore_index: int | None = -100):
        if structure not in STRUCTURES:
            raise ValueError(f"structure: expected one of {STRUCTURES}, got {structure!r}")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes: expected a positive integer, got {probes!r}")
        if decay is not None and (isinstance(decay, bool) or not 0.0 <= decay < 1.0):
            raise ValueError(f"decay: expected a number in [0, 1) or None, got {decay!r}")
        if dist not in ("rademacher", "gaussian"):
            raise ValueError(f"dist: expected 'rademacher' or 'gaussian', got {dist!r}")
        if likelihood not in ("softmax", "sigmoid"):
            raise ValueError(f"likelihood: expected 'softmax' (cross-entropy training) or 'sigmoid' (binary "
                             f"cross-entropy), got {likelihood!r}")
        self.structure, self.probes, self.decay, self.dist, self.seed = structure, probes, decay, dist, seed
        self.likelihood = likelihood
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise ValueError(f"ignore_index: expected an integer or None, got {ignore_index!r}")
        self.backend, self.keep_stderr, self.ignore_index = backend, bool(stderr), ignore_index
        self.layout: Layout | None = None
        self.state: dict | None = None
        self._unit = 1.0  # eager state: m = M·unit, s = S·unit (fold_scaled)
        self._shared = _Shared()  # compiled functions, shared with the copies a jit trace makes
        state_class(type(self))  # JAX: a pytree, passed in and out of the caller's jax.jit

    # -- a pytree (JAX): the state's arrays are the leaves, everything else is static ---------

    def _tree_flatten(self):
        aux = (self.structure, self.probes, self.decay, self.dist, self.seed, self.likelihood, self.backend,
               self.keep_stderr, self.ignore_index, self.layout, self._unit, self._shared)
        return (self.state,), aux

    @classmethod
    def _tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        (obj.structure, obj.probes, obj.decay, obj.dist, obj.seed, obj.likelihood, obj.backend, obj.keep_stderr,
         obj.ignore_index, obj.layout, obj._unit, obj._shared) = aux
        obj.state = children[0]
        return obj

    # -- the training step --------------------------------------------------------------------

    def step(self, model: Any, params: Any, inputs: Any, targets: Any, *, loss: Any = None,
             update: bool = True) -> tuple[Any, Any]:
        """One forward and the backward of 1 + K cotangents through it: (loss value, loss gradient tree).

        ``loss=None`` is the mean cross-entropy of the logits against class indices ``targets``,
        computed in the core; a framework callable ``loss(logits, targets) -> scalar`` needs the
        adapter's ``loss_linearize`` capability (torch, JAX). ``update=False`` skips the probes
        (a plain training step through the same path).
        """
        be = self._backend(params if params is not None else inputs)
        error = None
        if loss is None and update and self.likelihood == "softmax":
            got = self._whole_step(be, model, params, inputs, targets)
            if isinstance(got, Exception):
                error = got
            elif got is not None:
                return got
        sigmoid = self.likelihood == "sigmoid"
        if loss is None:  # the step's own forward: batch-norm statistics update where the adapter can
            logits, vjp = (getattr(be, "train_linearize", None) or be.linearize)(model, params, inputs)
            z = self._check(logits)
            if sigmoid:
                y, keep, counted = _binary_targets(targets, z, tuple(logits.shape)), None, z.shape[0]
            else:
                y, keep, counted = _labels(targets, z, self.ignore_index, tuple(logits.shape[:-1]))
        else:
            lin = getattr(be, "loss_linearize", None)
            if lin is None:
                raise TypeError(f"loss: a framework loss needs the backend's loss_linearize capability, "
                                f"which {be!r} lacks; pass loss=None (cross-entropy)")
            logits, value, ct_loss, vjp = lin(model, params, inputs, loss, targets)
            z = self._check(logits)
            ct_loss = _flat(ct_loss)
            keep, counted = ((None, z.shape[0]) if sigmoid else
                             _framework_targets(targets, z, self.ignore_index, tuple(logits.shape[:-1])))
        xp = array_namespace(z)
        N, C = z.shape
        K = self.probes if update else 0
        xi = (be.probes(self._step_seed(), (K, N, C), self.dist, like=z) if update
              else xp.zeros((0, N, C), dtype=z.dtype, device=device(z)))
        if loss is None and sigmoid:
            value, ct_loss, hut = self._fn(be, "train-sigmoid", _sigmoid_training_cotangents)(z, y, xi)
        elif loss is None:  # loss and probe cotangents from one softmax
            value, ct_loss, hut = self._fn(be, "train", cotangents.training_cotangents)(z, y, xi, keep)
        elif update:
            hut = self._fn(be, f"probe-{self.likelihood}",
                           lambda z, xi: cotangents.hutchinson(z, xi, self.likelihood))(z, xi)
            if keep is not None:
                hut *= xp.astype(keep, hut.dtype)[:, None]
        if not update:
            return value, vjp(xp.reshape(ct_loss, tuple(logits.shape)))
        N = counted
        eager = getattr(be, "compile", None) is None
        if eager:  # the EMA's weights ride on the probe cotangents (fold_scaled)
            hut *= self._scale(N)
        shape = tuple(logits.shape)
        batched = getattr(be, "batched", None)
        if batched is None or batched(z):  # one call for the 1 + K rows: leaves (1 + K, *leaf)
            cts = xp.concat([ct_loss[None, ...], hut], axis=0)
            pulled = vjp(xp.reshape(cts, (self.probes + 1, *shape)))
            named = be.leaves(pulled)
            grads = be.unflatten(pulled, [g[0, ...] for _, g in named])
            probes = {"stacked": [g[1:, ...] for _, g in named]}
        else:  # a call per row, never stacking P-sized results
            pulled = [vjp(xp.reshape(ct, shape)) for ct in [ct_loss] + [hut[k, ...] for k in range(self.probes)]]
            grads, named = pulled[0], be.leaves(pulled[0])
            probes = {"rows": [[g for _, g in be.leaves(t)] for t in pulled[1:]]}
        self._fold([name for name, _ in named], N, be, owned=getattr(be, "vjp_fresh", False), scaled=eager, **probes)
        warn_compile_fallback(error, "RunningFisher.step")
        return value, grads

    def _check(self, logits):
        """The logits flattened to (N, C): one logit under softmax is an error naming
        likelihood='sigmoid'; on the first step, outputs that look like probabilities warn."""
        z = _flat(logits)
        if self.likelihood == "softmax":
            if z.shape[-1] == 1:
                raise ValueError(f"logits: shape {tuple(logits.shape)}: {ONE_LOGIT}")
            if self.state is None:
                warn_if_probabilities(z, "logits")
        return z

    def _whole_step(self, be, model, params, inputs, targets):
        """The step as one compiled call (forward, cotangents, batched pullback, fold), where the
        adapter offers ``compile``: (loss, gradients), or None for the eager path (no compile
        capability, traced arguments, a step it cannot take: the eager path raises its errors), or
        the exception the compiled step raised (the eager path warns if it then takes the step)."""
        if getattr(be, "compile", None) is None or params is None:
            return None
        named = be.leaves(params)
        if not named:
            return None
        if targets is not None and not hasattr(targets, "shape"):
            targets = np.asarray(targets)
        first = self.state is None
        lay = self.layout or layout([n for n, _ in named], [tuple(x.shape) for _, x in named], self.structure)
        state = self.state if not first else init_state(lay, named[0][1], stderr=self.keep_stderr)
        opts = (self.probes, self.dist, self.decay, self.ignore_index)
        fn = self._fn(be, ("whole", model, tuple(lay.names), tuple(lay.shapes)), lambda p, x, y, st, s: _whole(be, model, lay, opts, p, x, y, st, s))
        try:
            seed = self._step_seed()
            value, grads, new, flags = fn(params, inputs, targets, state, np.uint32(seed) if isinstance(seed, int) else seed)
        except Exception as err:  # noqa: BLE001 - the eager path takes the step and raises its own error
            return err
        if not is_eager(flags):  # inside the caller's jit (traced inputs or state): no value checks
            self._keep(lay, new)
            return value, grads
        bad_targets, none_counted, like_probs = (bool(v) for v in np.asarray(flags))  # one sync
        if bad_targets or none_counted or (first and like_probs):
            return None  # the eager path: its error, or (first step) its warning
        self.layout, self.state = lay, new
        return value, grads

    def _step_seed(self):
        """The seed of this step's probes, derived from (seed, steps so far): an int, or under the
        caller's jit (a traced step count) the same 32-bit value as a traced uint32 scalar."""
        if self.state is None:
            return _step_seed(self.seed, 0)
        t = self.state["t"]
        if is_eager(t):
            return _step_seed(self.seed, int(t))
        return derive_array(self.seed, t, 7)

    def _fn(self, be, key, fn):
        """``fn``, compiled once by the adapter when it offers ``compile`` (JAX: ``jax.jit``)."""
        cache = self._shared.compiled
        if key not in cache:
            comp = getattr(be, "compile", None)
            cache[key] = comp(fn) if comp is not None else fn
        return cache[key]

    def update(self, probe_grads: Sequence[Array], names: Sequence[str], n: int, *, backend: Any = None) -> None:
        """Fold one step's probe gradients (K, *leaf) over ``n`` inputs into the estimate.

        The step's terms are the mean over the K rows given, whatever ``probes`` says (as the
        pure :func:`update_state`); the standard error counts K draws for this step.
        """
        K = {int(g.shape[0]) for g in probe_grads}
        if len(K) != 1 or 0 in K:
            raise ValueError(f"probe_grads: expected one leading probe axis K >= 1 shared by every leaf, "
                             f"got shapes {[tuple(g.shape) for g in probe_grads]}")
        self._fold(names, n, backend, stacked=list(probe_grads), owned=False)

    def _scale(self, n: int, K: int | None = None) -> float:
        """σ = √(α / (n K u')) for the next step's K probes (default ``probes``), u' = β u; renormalises M, S first when
        u gets small (one pass over the state every ~log(10⁶)/log(1/β) steps)."""
        beta, alpha = _ema_weights(self.decay)
        if self._unit < 1e-6 and self.state is not None:
            for part in ("m", "s"):
                terms = self.state.get(part, {})
                for k in terms:
                    terms[k] *= self._unit  # stored back: JAX arrays rebind
            self._unit = 1.0
        return math.sqrt(alpha / (n * (self.probes if K is None else K) * self._unit * beta))

    def _fold(self, names, n, backend, *, rows=None, stacked=None, owned=True, scaled=False):
        """Fold K probes, given as ``rows`` (K lists of leaves) or ``stacked`` leaves (K, *leaf);
        ``scaled``: their cotangents were multiplied by :meth:`_scale`'s σ."""
        if self.layout is None:
            shapes = [tuple(g.shape) for g in rows[0]] if rows is not None else [tuple(g.shape[1:]) for g in stacked]
            self.layout = layout(names, shapes, self.structure)
            self.state = init_state(self.layout, (rows[0] if rows is not None else stacked)[0], stderr=self.keep_stderr)
        elif len(names) != len(self.layout.names) or list(names) != list(self.layout.names):
            gone = [n for n in self.layout.names if n not in names]
            new = [n for n in names if n not in self.layout.names]
            raise ValueError(f"params: the parameter leaves differ from those of the estimate's first step (left "
                             f"out: {gone}, new: {new}), e.g. a parameter frozen or unfrozen since; start a new "
                             "RunningFisher for the new set (NaturalGradient does)")
        lay, decay = self.layout, self.decay
        comp = getattr(backend, "compile", None) if backend is not None else None
        if comp is None:  # eager: the state (ours) updated in place, and the probes too when ours
            rows = rows if rows is not None else _rows(stacked)
            K = len(rows)
            if not scaled:
                sigma = self._scale(n, K)
                rows, owned = [[g * sigma for g in gs] for gs in rows], True
            beta, alpha = _ema_weights(self.decay)
            unit = self._unit * beta
            fold_scaled(lay, self.state, rows, gain=len(rows) * unit / alpha, own_rows=owned)
            st = self.state
            # W₂ in units of a step of ``probes`` draws: a step of K draws counts probes/K as much.
            st.update(w=beta * st["w"] + alpha, w2=beta * beta * st["w2"] + alpha * alpha * (self.probes / K),
                      t=st["t"] + 1)
            self._unit = unit
            return
        K = len(rows) if rows is not None else int(stacked[0].shape[0])
        key = ("update", "rows" if rows is not None else "stacked", K)  # n an argument: traced under the caller's jit

        def update(st, ps, n):  # (JAX traces an int n as a scalar array: one compilation for every n)
            if not isinstance(n, (int, float)):
                n = array_namespace(st["w"]).astype(n, st["w"].dtype)
            return fold(lay, st, ps if rows is not None else _rows(ps), n, decay, probes=self.probes)

        self._keep(lay, self._fn(backend, key, update)(self.state, rows if rows is not None else stacked, n))

    def _keep(self, lay, new):
        """Take the new state; a traced one replacing a concrete one means this object was captured by
        the caller's jitted function rather than passed through it: its steps could not persist."""
        if self.state is not None and is_eager(self.state["t"]) and not is_eager(new["t"]):
            raise RuntimeError(CAPTURED)
        self.layout, self.state = lay, new

    def _backend(self, params):
        if self.backend is None or isinstance(self.backend, str):
            self.backend = _backends.infer(params) if self.backend is None else _backends.get(self.backend)
        return self.backend

    # -- results ------------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        return 0 if self.state is None else int(self.state["t"])

    @property
    def value(self) -> dict[str, Array]:
        """``{term key: estimate}`` (keys as in :class:`Layout`)."""
        self._require()
        return state_value(self.state, self._unit)

    @property
    def stderr(self) -> dict[str, Array]:
        self._require()
        return state_stderr(self.state, self.probes, self._unit)

    def _require(self):
        if self.state is None:
            raise ValueError("RunningFisher: no step yet; call step() or update() first")

    def state_dict(self) -> dict:
        """The state as a flat ``{name: array}`` dict plus the layout and options (no pickle needed).

        The arrays are copies: later steps update the estimate's own arrays in place. The moments
        are stored as M, S with m = M·``unit``, s = S·``unit`` (see :func:`fold_scaled`).
        """
        self._require()
        flat = {f"m/{k}": _copy(v) for k, v in self.state["m"].items()}
        flat.update({f"s/{k}": _copy(v) for k, v in self.state.get("s", {}).items()})
        flat.update({"w": self.state["w"], "w2": self.state["w2"], "t": self.state["t"]})
        return {"arrays": flat, "unit": self._unit, "names": list(self.layout.names), "shapes": [list(s) for s in self.layout.shapes],
                "structure": self.structure, "probes": self.probes, "decay": self.decay, "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        if sd["structure"] != self.structure:
            raise ValueError(f"state: structure {sd['structure']!r} differs from this estimate's {self.structure!r}")
        self.layout = layout(sd["names"], [tuple(s) for s in sd["shapes"]], self.structure)
        a = sd["arrays"]  # copied: the steps update the state in place, not the caller's arrays
        self.state = {"m": {k: _copy(a[f"m/{k}"]) for k in self.layout.keys}, "w": a["w"], "w2": a["w2"], "t": a["t"]}
        if all(f"s/{k}" in a for k in self.layout.keys):
            self.state["s"] = {k: _copy(a[f"s/{k}"]) for k in self.layout.keys}
        self._unit = float(sd.get("unit", 1.0))


class _Shared:
    """What the copies of one estimate share (compiled functions); hashed by identity."""

    __slots__ = ("compiled",)

    def __init__(self):
        self.compiled: dict = {}


def _whole(be, model, lay, opts, params, inputs, targets, state, seed):
    """One training step with K probes, pure (what :meth:`RunningFisher._whole_step` compiles):
    (loss, gradient tree, new state, flags [targets out of range, none counted, rows like probabilities])."""
    K, dist, decay, ignore_index = opts
    logits, vjp = (getattr(be, "train_linearize", None) or be.linearize)(model, params, inputs)
    z = _flat(logits)
    xp = array_namespace(z)
    N, C = z.shape
    lead = tuple(logits.shape[:-1])
    y = targets
    if len(lead) > 1 and tuple(y.shape) == lead:
        y = xp.reshape(y, (N,))
    if tuple(y.shape) != (N,) or not xp.isdtype(y.dtype, "integral") or C == 1:
        raise ValueError("targets or logits: the eager step words the error")
    keep = None if ignore_index is None else y != ignore_index
    bad = (y < 0) | (y >= C)
    w = None if keep is None else xp.astype(keep, z.dtype)
    if keep is not None:
        bad = bad & keep
        y = xp.where(keep, y, xp.zeros_like(y))
    counted = N if w is None else xp.sum(w)
    xi = be.probes(seed, (K, N, C), dist, like=z)
    value, ct_loss, hut = cotangents.training_cotangents(z, y, xi, w)
    pulled = vjp(xp.reshape(xp.concat([ct_loss[None, ...], hut], axis=0), (K + 1, *logits.shape)))
    named = be.leaves(pulled)
    grads = be.unflatten(pulled, [g[0, ...] for _, g in named])
    new = fold(lay, state, _rows([g[1:, ...] for _, g in named]), counted, decay)
    # warn_if_probabilities' condition (rows in [0, 1] summing to 1): a flag sends the step eager
    like_probs = xp.all((z >= 0) & (z <= 1)) & xp.all(xp.abs(xp.sum(z, axis=-1) - 1) <= 1e-4 * C)
    flags = xp.stack([xp.any(bad), xp.asarray(counted) == 0, like_probs])
    return value, grads, new, flags


def _cross_entropy(z, y):
    """(mean cross-entropy, its logit cotangent (p − e_y)/N) from logits z (N, C) and classes y."""
    xp = array_namespace(z)
    value, ct, _ = cotangents.training_cotangents(z, y, xp.zeros((0, *z.shape), dtype=z.dtype, device=device(z)))
    return value, ct


def _stack(z, ct_loss, xi):
    """[loss cotangent; K Hutchinson cotangents B(p̃)ξ_k]: (1 + K, N, C)."""
    xp = array_namespace(z)
    return xp.concat([ct_loss[None, ...], cotangents.hutchinson(z, xi)], axis=0)


def _copy(a: Array) -> Array:
    return array_namespace(a).asarray(a, copy=True)


def _step_seed(seed: int, t: int) -> int:
    return derive(seed, t, 7)


def _flat(logits):
    xp = array_namespace(logits)
    return xp.reshape(logits, (-1, logits.shape[-1]))


CAPTURED = ("RunningFisher.step inside jax.jit: pass the estimate into the jitted function and return it (it is "
            "a pytree): `def train(rf, params, x, y): loss, g = rf.step(f, params, x, y); return rf, loss, g`. An "
            "estimate captured from outside the function would hold the trace's values, and later calls of the "
            "compiled function run no Python, so its steps would not be counted")


ONE_LOGIT = ("a model with one logit under likelihood='softmax' has a Fisher that is identically zero (the "
             "softmax of one logit is 1 whatever its value). For a binary classifier trained with BCE, or a "
             "model with one output per input, pass likelihood='sigmoid' (Bernoulli outputs), or give the "
             "model two logits")


class LogitsWarning(UserWarning):
    """The model's outputs do not look like logits (e.g. probabilities already softmaxed)."""


def warn_if_probabilities(z: Array, where: str) -> None:
    """Warn when eager logits ``z`` (N, C), C ≥ 2, look like probabilities: every entry in [0, 1]
    and every row summing to 1 (to 10⁻⁴ of C). One device sync for logits (two for probabilities);
    callers run it on a first batch."""
    xp = array_namespace(z)
    if z.shape[-1] < 2 or z.shape[0] == 0 or not is_eager(z):
        return
    # Two reductions, no bool array of z's size (four passes over a language model's (N·T, V)
    # logits took 0.4 s of a 20 s GPT-2 small batch); the rows' sums only for values in [0, 1].
    if not bool((xp.min(z) >= 0) & (xp.max(z) <= 1)):
        return
    rows = xp.sum(z, axis=-1)
    tol = 1e-4 * z.shape[-1]
    if bool(xp.all(xp.abs(rows - 1) <= tol)):
        import warnings

        warnings.warn(f"{where}: every row of the model's outputs lies in [0, 1] and sums to 1: they look like "
                      "probabilities, but fisherlib takes them as logits and applies a softmax. Return the "
                      "logits (the outputs before the softmax); for independent 0/1 outputs use "
                      "likelihood='sigmoid' with their logits", LogitsWarning, stacklevel=3)


NO_TARGETS = ("targets: got None; the default loss (mean cross-entropy) needs class indices. A HuggingFace "
              "batch carries them as batch['labels']: pass them as targets (a causal LM shifts them by one "
              "position inside the model; shift them the same way), or pass loss=fn")


def _labels(targets, z, ignore_index, lead=None):
    """(class indices, 0/1 weights or None, how many outputs count) for the core's cross-entropy.

    Targets shaped like the logits' leading axes ``lead`` (a sequence model's (N, T) labels)
    are flattened like the logits. Ignored targets become class 0 with weight 0; eager targets
    outside [0, C) are an error.
    """
    xp = array_namespace(z)
    if targets is None:
        raise ValueError(NO_TARGETS)
    if type(targets) is not type(z):
        import numpy as np

        targets = xp.asarray(np.asarray(targets), device=device(z))
    N, C = z.shape
    if lead is not None and len(lead) > 1 and tuple(targets.shape) == lead:
        targets = xp.reshape(targets, (N,))
    if tuple(targets.shape) != (N,):
        want = f"({N},)" + (f" or {lead}" if lead is not None and len(lead) > 1 else "")
        raise ValueError(f"targets: expected class indices of shape {want}, got {tuple(targets.shape)}")
    if not xp.isdtype(targets.dtype, "integral"):
        raise ValueError(f"targets: expected integer class indices, got dtype {targets.dtype}")
    if not is_eager(targets):  # traced (the caller's jit): no checks; ignored outputs left out, their count traced
        if ignore_index is None:
            return targets, None, N
        keep = targets != ignore_index
        return xp.where(keep, targets, xp.zeros_like(targets)), keep, xp.sum(xp.astype(keep, z.dtype))
    keep = None if ignore_index is None else targets != ignore_index
    bad = (targets < 0) | (targets >= C)
    if keep is not None:
        bad = bad & keep
    n_bad, counted = _counts(bad, keep, N)
    if n_bad:
        raise ValueError(f"targets: class indices must lie in [0, {C}); got {int(targets[bad][0])}"
                         + (f" (ignore_index={ignore_index} marks outputs to leave out)" if ignore_index is not None else ""))
    if counted == 0:
        raise ValueError(f"targets: every target equals ignore_index={ignore_index}; no output counts")
    if counted == N:
        return targets, None, N
    return xp.where(keep, targets, xp.zeros_like(targets)), keep, counted


def _binary_targets(targets, z, shape):
    """0/1 targets of the sigmoid likelihood as z's dtype (N, C), from an array shaped like the
    logits ``shape`` or like z, or (N,) for one output per input."""
    xp = array_namespace(z)
    if targets is None:
        raise ValueError("targets: got None; likelihood='sigmoid' needs 0/1 targets shaped like the logits")
    if type(targets) is not type(z):
        import numpy as np

        targets = xp.asarray(np.asarray(targets), device=device(z))
    N, C = z.shape
    got = tuple(targets.shape)
    if got not in (tuple(shape), (N, C)) and not (C == 1 and got == (N,)) and not (
            got == tuple(shape[:-1]) and C == 1):
        raise ValueError(f"targets: likelihood='sigmoid' expects 0/1 targets shaped like the logits {tuple(shape)}"
                         f"{' or (N,)' if C == 1 else ''}, got {got}")
    y = xp.reshape(xp.astype(targets, z.dtype), (N, C))
    if is_eager(y) and not bool(xp.all((y >= 0) & (y <= 1))):
        raise ValueError("targets: likelihood='sigmoid' expects targets in [0, 1] (labels or probabilities)")
    return y


def _sigmoid_training_cotangents(z, y, xi):
    """(mean binary cross-entropy over the N·C outputs, its cotangent (σ(z) − y)/(N·C), the
    Hutchinson cotangents √(σ'(z)) ⊙ ξ (K, N, C)), as torch's ``binary_cross_entropy_with_logits``
    averages."""
    from ..core._lib import log_sigmoid

    xp = array_namespace(z)
    N, C = z.shape
    loss = -xp.sum(y * log_sigmoid(z, xp=xp) + (1 - y) * log_sigmoid(-z, xp=xp)) / (N * C)
    ct = -cotangents.label_residual(z, y, "sigmoid") / (N * C)
    return loss, ct, cotangents.hutchinson(z, xi, "sigmoid")


def _counts(bad, keep, N) -> tuple[int, int]:
    """(Σ bad, Σ keep or N) with one device sync: both counts are at most N, so they travel as
    one integer Σ bad · (N + 1) + Σ keep."""
    xp = array_namespace(bad)
    code = xp.count_nonzero(bad) * (N + 1)
    if keep is not None:
        code = code + xp.count_nonzero(keep)
    n_bad, counted = divmod(int(code), N + 1)
    return n_bad, counted if keep is not None else N


def _framework_targets(targets, z, ignore_index, lead=None):
    """With a framework loss: the 0/1 weights of the probes' outputs when ``targets`` are class
    indices holding ``ignore_index`` (None: every output counts), and how many count."""
    N = z.shape[0]
    xp = array_namespace(z)
    if lead is not None and len(lead) > 1 and type(targets) is type(z) and tuple(targets.shape) == lead:
        targets = xp.reshape(targets, (N,))
    if (ignore_index is None or type(targets) is not type(z) or tuple(targets.shape) != (N,)
            or not xp.isdtype(targets.dtype, "integral")):
        return None, N
    keep = targets != ignore_index
    if not is_eager(keep):  # traced: the count stays traced
        return keep, xp.sum(xp.astype(keep, z.dtype))
    _, counted = _counts(xp.zeros_like(keep), keep, N)
    if counted == 0:
        raise ValueError(f"targets: every target equals ignore_index={ignore_index}; no output counts")
    return (None, N) if counted == N else (keep, counted)
