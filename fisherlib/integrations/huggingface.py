r"""A HuggingFace ``Trainer`` callback that keeps a running Fisher and writes it at the end.

::

    from fisherlib.integrations.huggingface import FisherCallback

    cb = FisherCallback("fisher.safetensors", every=10, probes=1, decay=0.9)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()              # writes fisher.safetensors; cb.estimate is the FisherEstimate

Every ``every`` optimizer steps the callback draws a batch from the Trainer's training
dataloader (or from ``batches``), pulls K Hutchinson probes back through the model at its
current weights (:func:`fisherlib.fisher` with ``structure="sketch"``: the K probe gradients
g_k = Σ_x J_xᵀ B_x ξ_xk of the batch, HuggingFace dict batches, padding masks and -100 labels
as ``fisher()`` takes them), and folds them into a :class:`~fisherlib.RunningFisher`: the
per-output mean diag F, a plain mean over the samples (``decay=None``) or an exponential moving
average that follows the weights as they move (``decay=β``). At the end of training it is a
:class:`~fisherlib.FisherEstimate` (``reduction="mean"``) with its standard error, saved to
``path`` (safetensors: tensors named as the model's parameters) — the input of EWC
(:class:`fisherlib.uses.EWC`), Fisher merging (:func:`fisherlib.uses.fisher_merge`) or any tool
that reads safetensors.

Cost: a callback cannot reach the training step's own backward, so each sample is one extra
forward pass and one batched backward of K cotangents (what ``RunningFisher.step`` folds into the
training step itself when you write the loop); amortised over ``every`` steps that is
≈ (1 + K)/(3·every) of training's compute for K probes. Bias: each sample is unbiased for the
per-output Fisher of its batch at that step's weights; the mean over samples weighs every step
alike, the EMA the recent ones. Variance per diagonal entry of one sample: ≤ 2 F_ii²/K
(Rademacher), divided by the effective number of samples W²/W₂.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

from transformers import TrainerCallback

import fisherlib
from fisherlib.estimators import FisherEstimate, RunningFisher

__all__ = ["FisherCallback"]


class FisherCallback(TrainerCallback):
    """Keep a running diagonal Fisher during ``Trainer.train`` and write it at the end.

    Parameters
    ----------
    path : str or path-like, optional
        Where to write the estimate when training ends (``.safetensors`` or ``.npz``); None keeps
        it in :attr:`estimate` only.
    every : int
        Sample the Fisher at the optimizer steps s >= ``start`` (counted from 1) with s − ``start``
        divisible by ``every``.
    probes : int
        K Hutchinson probes per sample (one batched backward).
    decay : float or None
        EMA decay β in [0, 1) of :class:`~fisherlib.RunningFisher`; None averages all samples.
    seed : int
        Sample j draws its probes from (seed, j).
    start : int
        First optimizer step to sample at (skip the early, far-from-final weights).
    batches : iterable, optional
        Batches to sample from (cycled); default: the Trainer's training dataloader.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, every: int = 10, probes: int = 1,
                 decay: float | None = None, seed: int = 0, start: int = 0, batches: Iterable | None = None):
        for name, value, least in (("every", every, 1), ("probes", probes, 1), ("start", start, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
        self.path, self.every, self.probes, self.seed, self.start = path, every, probes, seed, start
        self.running = RunningFisher("diag", probes=probes, decay=decay, seed=seed)
        self.batches = batches
        self.samples = 0
        self.inputs = 0
        self.outputs = 0
        self._iter = None
        self._names: list[str] | None = None
        self.estimate: FisherEstimate | None = None

    # -- Trainer events ---------------------------------------------------------------------------

    def on_step_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        step = state.global_step
        if step < self.start or (step - self.start) % self.every:
            return
        import torch

        # A fresh dataloader iterator draws its shuffling seed from torch's global generator:
        # fork it, so that training (dropout, the next epoch's order) runs as without the callback.
        with torch.random.fork_rng(devices=[]):
            self.sample(model, self._next_batch(train_dataloader))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.samples == 0:
            return
        self.estimate = self.to_estimate()
        if self.path is not None and getattr(state, "is_world_process_zero", True):
            self.estimate.save(self.path)

    # -- the running estimate ---------------------------------------------------------------------

    def sample(self, model: Any, batch: Any) -> None:
        """Fold one batch's K probe gradients at the model's current weights into the estimate."""
        training = model.training
        model.eval()  # no dropout in the Fisher's forward
        try:
            g = fisherlib.fisher(model, None, [batch], structure="sketch", probes=self.probes,
                                 seed=self.seed, first_batch=self.samples)
        finally:
            model.train(training)
        n = g.n_outputs or g.n_inputs
        self.running.update(list(g.parts), g.names, n)
        self._names = list(g.names)
        self.samples += 1
        self.inputs += g.n_inputs
        self.outputs += n

    def to_estimate(self) -> FisherEstimate:
        """The running estimate as a :class:`~fisherlib.FisherEstimate` (per-output mean, NumPy).

        ``value`` is the running mean (or EMA) of diag F per output; ``stderr`` its standard error
        (the spread of the K probes and the samples, :class:`~fisherlib.RunningFisher`).
        ``n_inputs`` counts the inputs sampled; ``draws`` the samples' seeds.
        """
        if self.samples == 0:
            raise ValueError("FisherCallback: no sample yet (training ran fewer than `start` steps?)")
        value, error = self.running.value, self.running.stderr
        n = self.inputs  # value = parts[0] / n_inputs for reduction="mean"
        parts = []
        for name in self._names:
            v = _numpy(value[f"diag:{name}"])
            e = _numpy(error[f"diag:{name}"]) if self.probes >= 2 else np.zeros_like(v)
            parts.append(np.stack([v * n, (e * n) ** 2]))  # running moments of a "mean" estimate
        kind = "probes" if self.probes >= 2 else "bound"
        return FisherEstimate(names=list(self._names), parts=parts, method="hutchinson", structure="diag",
                              likelihood="softmax", bound=None, rank=1, reduction="mean", n_inputs=n,
                              n_probes=self.probes, per_example=False, dist="rademacher", stderr_kind=kind,
                              seed=self.seed, draws=((self.seed, 0, self.samples),), n_outputs=self.outputs,
                              moments=True)

    def _next_batch(self, loader):
        source = self.batches if self.batches is not None else loader
        if source is None:
            raise ValueError("batches: the Trainer passed no training dataloader; give FisherCallback(batches=...)")
        if self._iter is None:
            self._iter = iter(source)
        try:
            return next(self._iter)
        except StopIteration:  # cycle
            self._iter = iter(source)
            return next(self._iter)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype.itemsize < 4:
            x = x.float()
        return x.numpy()
    return np.asarray(x)

