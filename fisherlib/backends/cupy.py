"""The CuPy adapter: explicit-VJP models on CuPy arrays, or torch / JAX models fed CuPy data.

CuPy has no automatic differentiation. Two ways to run a model on CuPy arrays:

- an explicit-VJP model (``forward(params, x)``, ``vjp(params, x, ct)``; e.g.
  :class:`fisherlib.models.MLP` with CuPy parameters), run directly;
- a torch or JAX model (anything the ``torch`` or ``jax`` adapter takes) with CuPy inputs: the
  inputs, cotangents and any CuPy parameters cross to the framework through DLPack, without a
  copy, and the logits and gradients come back as CuPy arrays the same way.

Probes come from ``cupy.random.default_rng(seed)`` on ``like``'s device.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any, Callable

from . import _common
from ._common import check_dist, check_per_example_ct, check_seed, check_shape, flatten, unflatten
from ._explicit import ExplicitBackend

Array = Any
Tree = Any

__all__ = ["CupyBackend"]


def _is_explicit(model: Any) -> bool:
    return callable(getattr(model, "forward", None)) and callable(getattr(model, "vjp", None))


def _to_framework(name: str) -> Callable[[Array], Any]:
    if name == "torch":
        import torch

        return torch.from_dlpack
    import jax.dlpack

    return jax.dlpack.from_dlpack


class CupyBackend(ExplicitBackend):
    """CuPy arrays on the GPU: explicit-VJP models, or torch / JAX models through DLPack.

    Parameters
    ----------
    via : {"torch", "jax"}, optional
        The framework that differentiates a model that is not explicit-VJP. By default it is
        found from the model (an ``nn.Module`` means torch) or from the parameters' type;
        name it when the parameters are CuPy arrays too.
    """

    name = "cupy"
    _array_module = "cupy"  # the array library; the tests swap in NumPy to run without a GPU

    def __init__(self, *, via: str | None = None):
        if via not in (None, "torch", "jax"):
            raise ValueError(f"via: expected 'torch', 'jax' or None, got {via!r}")
        self.via = via
        self.xp = importlib.import_module(self._array_module)

    # -- crossing to the framework and back ----------------------------------------------------

    def _is_ours(self, x: Any) -> bool:
        return type(x).__module__.split(".")[0] == self._array_module and hasattr(x, "__dlpack__")

    def _inner(self, model: Any, params: Tree):
        from . import _registry

        if self.via is not None:
            return _registry.get(self.via)
        if "torch" in sys.modules:
            import torch

            if isinstance(model, torch.nn.Module):
                return _registry.get("torch")
        if params is not None:
            try:
                owner = _registry.infer(params)
            except TypeError:
                owner = None
            if owner is not None and owner.name in ("torch", "jax"):
                return owner
        raise TypeError(
            f"model: {type(model).__name__} is not an explicit-VJP model (forward and vjp) and its "
            "framework cannot be told from CuPy parameters; pass CupyBackend(via='torch') or via='jax'"
        )

    def _enter(self, model, params):
        """(inner adapter, params handed to it, cross(tree) to the framework, back(grads) to ours)."""
        inner = self._inner(model, params)
        to_fw = _to_framework(inner.name)

        def one(a):
            try:
                return to_fw(a)
            except Exception:  # a layout the importer rejects (e.g. strided views): copy once
                return to_fw(self.xp.array(a, copy=True))

        def cross(tree):
            if self._is_ours(tree):
                return one(tree)
            _, leaves = flatten(tree, self._is_ours)
            return unflatten(tree, [one(a) for a in leaves], self._is_ours) if leaves else tree

        fw_params = None if params is None else cross(params)
        ours = params is not None and bool(flatten(params, self._is_ours)[1])
        if ours:
            # Gradients come back in the inner adapter's leaf order (JAX sorts dict keys); match
            # them to the caller's tree by identity of the parameter leaves handed over.
            order = {id(a): i for i, (_, a) in enumerate(inner.leaves(fw_params))}
            _, fw_leaves = flatten(fw_params, lambda a: id(a) in order)
            perm = [order[id(a)] for a in fw_leaves]

        def back(tree):
            got = [self.xp.from_dlpack(_detached(a)) for _, a in inner.leaves(tree)]
            if not ours:
                return inner.unflatten(tree, got)
            return unflatten(params, [got[i] for i in perm], self._is_ours)

        return inner, fw_params, cross, back

    # -- the protocol ---------------------------------------------------------------------------

    def linearize(self, model: Any, params: Tree, inputs: Array):
        """(logits, ``vjp``) as CuPy arrays; see :meth:`ExplicitBackend.linearize`.

        For a torch or JAX model, the inputs (and CuPy parameters) are handed to that framework
        through DLPack, and ``vjp(ct)`` takes CuPy cotangents (shaped like the logits, or with a
        leading K) and returns a tree of CuPy gradients.
        """
        if _is_explicit(model):
            return super().linearize(model, params, inputs)
        inner, fw_params, cross, back = self._enter(model, params)
        logits, pull = inner.linearize(model, fw_params, cross(inputs))

        def vjp(ct: Array) -> Tree:
            return back(pull(cross(ct)))

        return self.xp.from_dlpack(_detached(logits)), vjp

    def per_example_vjp(self, model: Any, params: Tree, inputs: Array, cotangents: Array, **options: Any) -> Tree:
        """Per-input VJPs (K, N, *leaf.shape) as CuPy arrays; options go to the torch / JAX adapter."""
        if _is_explicit(model):
            return super().per_example_vjp(model, params, inputs, cotangents)
        check_per_example_ct(cotangents, inputs.shape[0])
        inner, fw_params, cross, back = self._enter(model, params)
        rows = inner.per_example_vjp(model, fw_params, cross(inputs), cross(cotangents), **options)
        return back(rows)

    def probes(self, seed: int, shape: tuple[int, ...], dist: str, like: Array) -> Array:
        """Rademacher (±1), Gaussian or uniform values from ``cupy.random.default_rng(seed)``.

        On ``like``'s device, with its dtype (drawn in float64 for float64, else in float32).
        """
        seed, shape, dist = check_seed(seed), check_shape(shape), check_dist(dist)
        import numpy as np

        xp = self.xp
        if not (self._is_ours(like) and np.issubdtype(like.dtype, np.floating)):
            raise TypeError(f"like: expected a floating {self._array_module} array, got {type(like).__name__}")
        draw = xp.float64 if like.dtype == xp.float64 else xp.float32
        device = getattr(like, "device", None)
        with device if isinstance(device, contextlib.AbstractContextManager) else contextlib.nullcontext():
            out = _common.draw(xp.random.default_rng(seed), shape, dist, draw, xp.int8)
            return out.astype(like.dtype, copy=False)


def _detached(a: Any) -> Any:
    # torch refuses to export a tensor that requires grad; detach() is an alias, not a copy.
    return a.detach() if hasattr(a, "detach") and getattr(a, "requires_grad", False) else a
