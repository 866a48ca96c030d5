"""Sophia's schedule with fisherlib's Fisher diagonal: ``NaturalGradient(model, preconditioner="sophia")``.

A drop-in ``torch.optim.Optimizer`` for training loops that call ``loss.backward()`` themselves
(HuggingFace ``Trainer``, Lightning, AMP with a ``GradScaler``): the batch of the model's forward
is captured by a forward pre-hook, and every ``refresh`` steps :meth:`step` draws a Hutchinson
probe on it and folds the probe gradient into the running Fisher diagonal
(:class:`fisherlib.estimators.RunningFisher`). The rule and its relation to Sophia-G are in
:class:`FisherSophia`'s docstring and ``docs/natural-gradient.md``, "A cheap preconditioner for
training".
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .. import backends as _backends
from ..backends._common import logits_of
from ..core import cotangents
from ..estimators._running import ONE_LOGIT, RunningFisher, _step_seed
from ._sophia_checks import UNUSED, check_hyper
from ._torch_optim import NaturalGradient, _init_signature

__all__ = ["FisherSophia"]

class FisherSophia(NaturalGradient):
    r"""Sophia's clipped diagonal step with the running Fisher diagonal, refreshed every k steps.

    Made by ``NaturalGradient(model, lr, preconditioner="sophia", ...)`` (or directly). Per step,
    for each parameter entry, with g the gradient in ``p.grad``:

    .. code-block:: text

        m ← β₁ m + (1 − β₁) g
        θ ← θ − lr·wd·θ                                  (decoupled weight decay, as AdamW)
        θ ← θ − lr · clip(m / max(γ h, ε), −1, 1)

    and on every ``refresh``-th step (steps 0, k, 2k, ...) before the update, h ← the
    bias-corrected EMA (decay β₂) of the one-probe Hutchinson estimate of the Fisher diagonal
    on the batch captured from the step's forward: one forward and one backward of the probe
    cotangent B(p̃)ξ (:mod:`fisherlib.estimators._running`). Every coordinate moves by at most
    ``lr`` (plus the decay): where γh is small the step is sign(m)·lr, elsewhere the diagonal
    Newton step m / (γh).

    Use it as any ``torch.optim`` optimizer: ``loss.backward(); opt.step(); opt.zero_grad()``
    (or ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``). The batch is
    the positional and keyword arguments of the model's last forward with gradients enabled
    before a refresh step (a forward pre-hook: no copy, nothing held between refreshes); call
    :meth:`capture` to give it explicitly (a model called through a wrapper the hook does not
    see, a batch of your choice). :meth:`backward` ``(inputs, targets)`` is a convenience
    forward + cross-entropy + backward.

    Parameters
    ----------
    model : nn.Module
        The network whose forward returns logits (a tensor, an output with ``.logits`` or a
        dict with ``"logits"``): its outputs' distribution defines the Fisher.
    lr : float
        η, the largest step of a coordinate (default 1e-4, Sophia-G's).
    params : iterable of tensors or of dicts, optional
        Parameters or parameter groups as ``torch.optim`` takes them (per-group ``lr``,
        ``weight_decay``, ``betas``, ``gamma``, ``eps``); default: the model's parameters that
        require grad. Every parameter must be one of the model's.
    betas : (float, float)
        (β₁, β₂): the EMA decays of the gradient and of the Fisher diagonal (Sophia-G's
        (0.965, 0.99)).
    gamma : float
        γ, the scale of h in the denominator (Sophia-G's ρ; default 0.04 as its code). A larger
        γ clips fewer coordinates and takes smaller Newton steps.
    eps : float
        ε, the floor of γh (a coordinate whose Fisher is 0 takes the step sign(m)·lr).
    weight_decay : float
        Decoupled weight decay (Sophia-G's default 0.1; exclude biases and norms through
        parameter groups as for AdamW).
    refresh : int
        k: the Fisher is re-estimated on steps 0, k, 2k, ... (Sophia-G: 10).
    probes : int
        Hutchinson probes per refresh (one backward each).
    fisher_batch : int, optional
        Estimate the Fisher on the first ``fisher_batch`` rows of the captured batch (every
        tensor argument whose leading axis is the batch's is sliced): a refresh then costs that
        share of a training step. Default: the whole batch.
    stderr : bool
        Keep the second moments of the estimate, for its error bar ``opt.fisher.stderr``
        (one more array the size of the parameters).
    capture : bool
        Install the forward pre-hook (default). ``False``: give the batch with :meth:`capture`
        before every refresh step.
    likelihood : {"softmax", "sigmoid"}
        The outputs' distribution (a softmax over the last axis, or independent Bernoulli
        outputs).
    seed : int
        Refresh r draws its probes from a seed derived from (seed, r).

    Notes
    -----
    **Cost.** A step between refreshes is AdamW's: a few elementwise passes over the
    parameters. A refresh adds one forward and ``probes`` backwards of the captured batch
    (or its first ``fisher_batch`` rows): about 1/k of a training step per step for k =
    ``refresh`` and the whole batch. Memory: m, the EMA of h, and with ``stderr`` its second
    moment (2 or 3 arrays the size of the parameters; AdamW keeps 2).

    **Bias and variance of h.** The probe gradient g = Σ_x J_xᵀ B(p̃_x) ξ_x (Rademacher ξ) gives
    g_i² / n, an unbiased estimate of the i-th diagonal entry of the per-output mean Fisher
    over the n outputs counted (a sequence model's positions; ``attention_mask`` zeros left
    out), with Var ≤ 2 F_ii² / (n·K) per refresh, divided by the EMA's effective number of
    refreshes; ``opt.fisher.stderr`` is its standard error.

    **Against Sophia-G** (Liu et al. 2023, Algorithm 3 and the authors' ``SophiaG``): the same
    m, clip and decoupled decay, with these differences.

    - Sophia-G's diagonal is the Gauss–Newton–Bartlett estimate: labels ŷ sampled from the
      model, ĥ = B · ∇L̂(ŷ) ⊙ ∇L̂(ŷ) for the mean loss over B tokens (one Monte-Carlo draw of
      the Fisher, scaled by the batch size; its code keeps the EMA of ∇L̂⊙∇L̂ and multiplies by
      ``bs`` in the step: ratio = |m| / (ρ · bs · hess + 1e-15)). fisherlib's is the
      Hutchinson estimate above: unbiased for the same per-token mean Fisher, a Rademacher
      probe instead of a sampled label (no sampling from a V-way softmax), with an error bar.
      So γ here is ρ there, with the batch size already inside h.
    - fisherlib's EMA of h is bias-corrected (h = Σ β₂^j ĥ_j / Σ β₂^j); Sophia-G's starts from
      zero, so that its first steps until the EMA fills are all clipped (sign steps).
    - Sophia-G refreshes after the step of iterations k−1, 2k−1, ..., on the *next* batch;
      here the refresh comes before the step, on the step's own batch (step 0 has an h).
    - Sophia-G's training script clips the sampled gradient's norm to 1 before squaring it;
      fisherlib does not (the probe gradient's scale is the Fisher's).
    - Sophia-G adds ε (1e-15) to ρh; here γh is floored at ε (the same for h ≥ 0).

    The refresh runs outside any autocast region and in the model's dtype (float16 and
    bfloat16 probe gradients fold in float32); a model in training mode stays in it (dropout
    draws anew, as Sophia-G's own refresh forward; batch-norm statistics update once more).
    With gradient accumulation the last micro-batch's forward is captured.

    References
    ----------
    H. Liu, Z. Li, D. Hall, P. Liang, T. Ma. Sophia: A Scalable Stochastic Second-order
    Optimizer for Language Model Pre-training. ICLR 2024 (arXiv:2305.14342).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, *, preconditioner: str = "sophia",
                 params: Iterable[Any] | None = None, betas: tuple[float, float] = (0.965, 0.99),
                 gamma: float = 0.04, eps: float = 1e-12, weight_decay: float = 0.1, refresh: int = 10,
                 probes: int = 1, fisher_batch: int | None = None, stderr: bool = True, capture: bool = True,
                 likelihood: str = "softmax", seed: int = 0, **unused: Any):
        for name in unused:
            if name in UNUSED:
                raise TypeError(f"{name}: not an option of preconditioner='sophia' ({UNUSED[name]})")
            raise TypeError(f"{name}: unexpected keyword argument of NaturalGradient(preconditioner='sophia')")
        if preconditioner != "sophia":
            raise ValueError(f"preconditioner: FisherSophia is preconditioner='sophia', got {preconditioner!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        check_hyper(lr=lr, betas=betas, gamma=gamma, eps=eps, weight_decay=weight_decay)
        for name, v in (("refresh", refresh), ("probes", probes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if fisher_batch is not None and (isinstance(fisher_batch, bool) or not isinstance(fisher_batch, int)
                                         or fisher_batch < 1):
            raise ValueError(f"fisher_batch: expected a positive integer or None, got {fisher_batch!r}")
        if likelihood not in ("softmax", "sigmoid"):
            raise ValueError(f"likelihood: expected 'softmax' or 'sigmoid', got {likelihood!r}")
        self.model = model
        by_id = {id(p): n for n, p in model.named_parameters()}
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), gamma=float(gamma),
                        eps=float(eps), weight_decay=float(weight_decay))
        torch.optim.Optimizer.__init__(self, params, defaults)
        names = {}
        for i, group in enumerate(self.param_groups):
            check_hyper(where=f"params[{i}]", lr=group["lr"], betas=group["betas"], gamma=group["gamma"],
                         eps=group["eps"], weight_decay=group["weight_decay"])
            if float(group["betas"][1]) != float(betas[1]):
                raise ValueError(f"params[{i}]: betas[1] (the Fisher's EMA decay) is shared by every group; "
                                 f"got {group['betas'][1]} against {betas[1]}")
            for p in group["params"]:
                if id(p) not in by_id:
                    raise ValueError(f"params: a tensor of shape {tuple(p.shape)} is not a parameter of model")
                names[p] = by_id[id(p)]
        self._names = names
        self.names = list(names.values())
        self.preconditioner, self.refresh, self.probes, self.fisher_batch = "sophia", refresh, probes, fisher_batch
        self.likelihood, self.seed, self.keep_stderr, self.beta2 = likelihood, seed, bool(stderr), float(betas[1])
        self.fisher: RunningFisher | None = None
        self.steps = 0
        self.refreshes = 0
        self._batch: tuple[tuple, dict] | None = None
        self._explicit = False
        self._in_refresh = False
        self._hook = model.register_forward_pre_hook(_capture_hook(weakref.ref(self)), with_kwargs=True) \
            if capture else None

    # -- the batch -----------------------------------------------------------------------------

    def capture(self, *args: Any, **kwargs: Any) -> None:
        """Give the batch for the next refresh: the model's arguments, ``model(*args, **kwargs)``.

        Overrides the hook's capture until a refresh uses it. Nothing is copied.
        """
        if not args and not kwargs:
            raise ValueError("capture: expected the model's arguments, got none")
        self._batch, self._explicit = (tuple(args), dict(kwargs)), True

    def due(self) -> bool:
        """Whether the next :meth:`step` refreshes the Fisher (and so needs a captured batch)."""
        return self.steps % self.refresh == 0

    def remove_hook(self) -> None:
        """Remove the forward pre-hook (after training; the model keeps no reference to the optimizer)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def backward(self, inputs: Any, targets: Any, loss: Callable | None = None) -> torch.Tensor:
        """A plain training step's forward and backward: ``p.grad`` from the mean cross-entropy
        (``likelihood="sigmoid"``: binary cross-entropy), or ``loss(logits, targets)``. The forward
        is captured for the next refresh. Returns the loss value (detached)."""
        active = [(n, p) for p, n in self._names.items() if p.requires_grad]
        if not active:
            raise RuntimeError("backward: every parameter of the optimizer is frozen (requires_grad=False)")
        return self._plain_backward(inputs, targets, loss, active)

    # -- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One update of every parameter with a gradient; refreshes the Fisher first on refresh steps.

        ``closure`` (optional) runs the forward and backward (it may call ``zero_grad``); its
        forward is captured. Returns its value.
        """
        out = None
        if closure is not None:
            with torch.enable_grad():
                out = closure()
        if self.due():
            self._refresh_fisher()
        state = self.fisher.state
        scale = float(self.fisher._unit / (state["w"] + (state["w"] == 0)))
        for group in self.param_groups:
            b1 = group["betas"][0]
            lr, wd, gamma, eps = group["lr"], group["weight_decay"], group["gamma"], group["eps"]
            ps, gs, ms, hs = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"step: parameter {self._names[p]!r} has a sparse gradient; "
                                       "preconditioner='sophia' needs dense gradients")
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ps.append(p)
                gs.append(p.grad)
                ms.append(st["exp_avg"])
                hs.append(state["m"].get("diag:" + self._names[p]))
            if not ps:
                continue
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, gs, alpha=1 - b1)
            if wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
            steps = _clipped_ratio(ms, hs, gamma * scale, eps)
            torch._foreach_add_(ps, steps, alpha=-lr)
        self.steps += 1
        return out

    def _refresh_fisher(self) -> None:
        """Fold one Hutchinson estimate of the diagonal on the captured batch into the running Fisher."""
        if self._batch is None:
            raise RuntimeError(
                "step: this step refreshes the Fisher but no batch was captured since the last refresh: run "
                "the model's forward (with gradients enabled) before step(), or give the batch with "
                "opt.capture(*model_args, **model_kwargs)")
        args, kwargs = _rows(self._batch, self.fisher_batch)
        self._batch, self._explicit = None, False
        active = [(n, p) for p, n in self._names.items() if p.requires_grad]
        if not active:
            raise RuntimeError("step: every parameter of the optimizer is frozen (requires_grad=False)")
        names = [n for n, _ in active]
        if self.fisher is None or (self.fisher.layout is not None and list(self.fisher.layout.names) != names):
            # a parameter frozen or unfrozen since the last refresh: the estimate starts afresh
            self.fisher = RunningFisher("diag", probes=self.probes, decay=self.beta2, seed=self.seed,
                                        likelihood=self.likelihood, stderr=self.keep_stderr, backend="torch")
        be = _backends.get("torch")
        self._in_refresh = True
        try:
            with torch.enable_grad(), _no_autocast(args, kwargs):
                logits = logits_of(self.model(*args, **kwargs))
        finally:
            self._in_refresh = False
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(f"model: expected floating logits, got {type(logits).__name__}")
        C = logits.shape[-1]
        if self.likelihood == "softmax" and C == 1:
            raise ValueError(f"logits: shape {tuple(logits.shape)}: {ONE_LOGIT}")
        z = logits.detach().reshape(-1, C)
        work = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
        z = z.to(work)
        keep = _mask(kwargs.get("attention_mask"), tuple(logits.shape[:-1]), z)
        n = z.shape[0] if keep is None else int(keep.sum())
        if n == 0:
            raise ValueError("capture: the batch's attention_mask counts no position")
        xi = be.probes(_step_seed(self.seed, self.refreshes), (self.probes, *z.shape), "rademacher", like=z)
        ct = cotangents.hutchinson(z, xi, self.likelihood)
        if keep is not None:
            ct = ct * keep[:, None]
        leaves = [p for _, p in active]
        rows = []
        for k in range(self.probes):
            grads = torch.autograd.grad(logits, leaves, ct[k].reshape(logits.shape).to(logits.dtype),
                                        retain_graph=k < self.probes - 1, allow_unused=True)
            rows.append([torch.zeros_like(p, dtype=work) if g is None else g.to(work) for g, p in zip(grads, leaves)])
        stacked = [torch.stack(col) for col in zip(*rows)]
        self.fisher.update(stacked, names, n)
        self.refreshes += 1

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        sd = torch.optim.Optimizer.state_dict(self)
        sd["sophia"] = {"fisher": None if self.fisher is None or self.fisher.state is None else self.fisher.state_dict(),
                        "steps": self.steps, "refreshes": self.refreshes}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("sophia", None)
        torch.optim.Optimizer.load_state_dict(self, state_dict)
        if extra is None:
            return
        self.steps, self.refreshes = int(extra["steps"]), int(extra["refreshes"])
        if extra["fisher"] is not None:
            self.fisher = RunningFisher("diag", probes=self.probes, decay=self.beta2, seed=self.seed,
                                        likelihood=self.likelihood, stderr=self.keep_stderr, backend="torch")
            self.fisher.load_state_dict(extra["fisher"])

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (f"NaturalGradient(preconditioner='sophia', lr={g['lr']:.3g}, betas={g['betas']}, "
                f"gamma={g['gamma']:.3g}, weight_decay={g['weight_decay']:.3g}, refresh={self.refresh}, "
                f"probes={self.probes}, groups={len(self.param_groups)})")


FisherSophia.__signature__ = _init_signature(FisherSophia)


def _clipped_ratio(ms: list[torch.Tensor], hs: list, scale: float, eps: float) -> list[torch.Tensor]:
    """clip(m / max(scale·H, eps), −1, 1) per leaf (H the Fisher's raw moment; None: no estimate, H = 0)."""
    same = all(h is not None and h.dtype == m.dtype and h.device == m.device for m, h in zip(ms, hs))
    if same:
        den = torch._foreach_mul(hs, scale)
        torch._foreach_clamp_min_(den, eps)
        torch._foreach_reciprocal_(den)
        torch._foreach_mul_(den, ms)
    else:  # low-precision parameters (their Fisher kept in float32), or a leaf with no estimate yet
        den = []
        for m, h in zip(ms, hs):
            d = torch.full_like(m, eps) if h is None else (h * scale).clamp_min_(eps).to(m.dtype)
            den.append(m / d)
    torch._foreach_clamp_min_(den, -1.0)
    torch._foreach_clamp_max_(den, 1.0)
    return den


def _capture_hook(ref: weakref.ref):
    """The forward pre-hook: keep the arguments of the last forward with gradients before a refresh
    step (only a reference; held until the refresh uses it)."""
    def hook(module, args, kwargs):
        opt = ref()
        if opt is None or opt._in_refresh or opt._explicit or not torch.is_grad_enabled() or not opt.due():
            return None
        opt._batch = (tuple(args), dict(kwargs))
        return None

    return hook


def _rows(batch: tuple[tuple, dict], count: int | None) -> tuple[tuple, dict]:
    """The batch's first ``count`` rows: every tensor whose leading axis is the first tensor's."""
    args, kwargs = batch
    if count is None:
        return args, kwargs
    tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim > 0]
    if not tensors:
        raise ValueError("fisher_batch: the captured batch holds no tensor to take rows from")
    N = tensors[0].shape[0]

    def cut(v):
        return v[:count] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == N else v

    return tuple(cut(v) for v in args), {k: cut(v) for k, v in kwargs.items()}


def _mask(mask: Any, lead: tuple[int, ...], z: torch.Tensor) -> torch.Tensor | None:
    """An ``attention_mask`` shaped like the logits' leading axes as 0/1 weights of the N rows, or None."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != lead:
        return None
    keep = (mask.reshape(-1) != 0).to(device=z.device, dtype=z.dtype)
    return None if bool(keep.all()) else keep


class _no_autocast:
    """The refresh's forward outside the caller's autocast (float32 probe gradients of a float32 model)."""

    def __init__(self, args, kwargs):
        dev = next((v.device.type for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)), "cpu")
        self.ctx = torch.autocast(device_type=dev if dev in ("cuda", "cpu", "xpu", "mps") else "cpu", enabled=False)

    def __enter__(self):
        self.ctx.__enter__()

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)

