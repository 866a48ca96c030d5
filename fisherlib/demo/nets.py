"""The demo's network in each framework, and a training loop that needs only the adapter.

The same multilayer perceptron, with the same initial weights, is built natively for each
backend — a ``torch.nn.Sequential`` (parameters passed as a dict, through ``functional_call``),
a pure JAX function of a dict, or :class:`fisherlib.models.MLP` on NumPy — so that every backend
computes the same numbers. Training uses nothing but the backend protocol: the gradient of the
mean cross-entropy is one VJP of the cotangent (p − onehot(y)) / N, and Adam updates the leaves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import backends, simplex
from ..core._compat import array_namespace, device
from ..estimators._estimate import _to_numpy as _numpy
from ..models import MLP

DEMO_BACKENDS = ("torch", "jax", "numpy")


@dataclass
class Net:
    """A model and its parameters as the backend takes them, plus how to feed it NumPy data."""

    backend: Any
    model: Any
    params: Any
    sizes: tuple[int, ...]

    @property
    def xp(self):
        return array_namespace(self.backend.leaves(self.params)[0][1])

    def asarray(self, x: np.ndarray):
        """A NumPy array in the parameters' namespace, dtype (floats) and device."""
        leaf = self.backend.leaves(self.params)[0][1]
        dtype = leaf.dtype if np.issubdtype(x.dtype, np.floating) else None
        return self.xp.asarray(x, dtype=dtype, device=device(leaf))

    def logits(self, x: np.ndarray) -> np.ndarray:
        z, _ = self.backend.linearize(self.model, self.params, self.asarray(x))
        return np.asarray(_numpy(z), dtype=np.float64)


def pick_backend(name: str | None) -> str:
    """``name`` if given, else the first installed of torch, jax, numpy."""
    if name is not None:
        if name not in DEMO_BACKENDS:
            raise ValueError(f"backend: the demo runs on one of {DEMO_BACKENDS}, got {name!r}")
        backends.get(name)  # a clear error naming the extra to install
        return name
    installed = backends.available()
    return next(n for n in DEMO_BACKENDS if n in installed)


def build(name: str, sizes: tuple[int, ...], seed: int) -> Net:
    """The MLP ``sizes`` (tanh) for backend ``name``, float32, initialised from ``seed``."""
    mlp = MLP(sizes, activation="tanh")
    be = backends.get(name)
    if name == "torch":
        import torch

        layers: list = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [torch.nn.Linear(a, b)] + ([torch.nn.Tanh()] if i < len(sizes) - 2 else [])
        module = torch.nn.Sequential(*layers)
        init = mlp.init(seed, xp=torch, dtype=torch.float32)
        names = [n for n, _ in module.named_parameters()]
        return Net(be, module, dict(zip(names, init.values())), sizes)
    if name == "jax":
        import jax.numpy as jnp

        return Net(be, mlp.forward, mlp.init(seed, xp=jnp, dtype=jnp.float32), sizes)
    return Net(be, mlp, mlp.init(seed, xp=np, dtype=np.float32), sizes)


def train(net: Net, x: np.ndarray, y: np.ndarray, *, epochs: int, batch: int = 64, lr: float = 3e-3,
          seed: int = 0, progress: bool = True) -> list[float]:
    """Adam on the mean cross-entropy; returns the training loss of each epoch.

    Each step is one ``linearize`` and one ``vjp`` of (softmax(z) − onehot(y)) / N — the same
    cost as the training step of the framework itself. Batches of a fixed size (the last
    partial one dropped) keep JAX from recompiling.
    """
    be, xp = net.backend, net.xp
    C = net.sizes[-1]
    rng = np.random.default_rng(seed)
    onehot = np.eye(C, dtype=np.float64)
    leaves = [p for _, p in be.leaves(net.params)]
    m = [xp.zeros_like(p) for p in leaves]
    v = [xp.zeros_like(p) for p in leaves]
    b1, b2, eps, t = 0.9, 0.999, 1e-8, 0
    losses = []
    bar = _bar(range(epochs), progress, "training", "epoch")
    for _ in bar:
        order = rng.permutation(len(y))
        total = 0.0
        for i in range(0, len(y) - batch + 1, batch):
            idx = order[i:i + batch]
            z, vjp = be.linearize(net.model, net.params, net.asarray(x[idx]))
            logp = simplex.log_probs(z)
            target = net.asarray(onehot[y[idx]])
            total += float(-xp.sum(logp * target)) / batch
            grads = [g for _, g in be.leaves(vjp((xp.exp(logp) - target) / batch))]
            t += 1
            step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            for j, g in enumerate(grads):
                m[j] = b1 * m[j] + (1 - b1) * g
                v[j] = b2 * v[j] + (1 - b2) * g * g
                leaves[j] = leaves[j] - step * m[j] / (xp.sqrt(v[j]) + eps)
            net.params = be.unflatten(net.params, list(leaves))
        losses.append(total / max(1, len(y) // batch))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _bar(it, show: bool, desc: str, unit: str):
    if not show:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm ships with the demo extra; without it, no bar
        return it
    return tqdm(it, desc=desc, unit=unit, leave=False)
