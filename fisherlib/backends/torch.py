"""The PyTorch adapter: ``nn.Module``, a parameter dict through ``functional_call``, or ``f(params, x)``.

``linearize`` runs the model once with autograd on and keeps the graph; ``vjp(ct)`` pulls back
one cotangent, or a stack of K, with a single ``torch.autograd.grad`` call (K-stacks through
``is_grads_batched``, i.e. ``vmap`` over the backward pass). Per-input products use
``torch.func.vmap`` of ``torch.func.vjp`` with an optional ``chunk_size``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from ._common import (
    BatchNormWarning,
    check_ct,
    check_dist,
    check_per_example_ct,
    check_seed,
    check_shape,
    flatten,
    unflatten,
)

Tree = Any

__all__ = ["TorchBackend"]


def _is_leaf(x: Any) -> bool:
    # Only floating tensors are differentiable parameters; integer buffers stay as they are.
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _warn_batchnorm(model: nn.Module) -> None:
    if model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        warnings.warn(
            f"model: {type(model).__name__} is in training mode and contains batch-norm layers, whose "
            "batch statistics couple the inputs of a batch; fisherlib's estimators assume independent "
            "inputs. Call model.eval() first.",
            BatchNormWarning,
            stacklevel=4,  # the caller of linearize / per_example_vjp
        )


class TorchBackend:
    """PyTorch models on CPU or CUDA, any floating dtype.

    Parameters
    ----------
    chunk_size : int, optional
        Default number of inputs :meth:`per_example_vjp` processes at once (``vmap`` chunks);
        ``None`` processes all of them together.
    warn_batchnorm : bool
        Warn (:class:`~fisherlib.backends.BatchNormWarning`) when a module in training mode
        contains batch-norm layers.
    batch_probes : bool
        Pull a stack of K cotangents back in one batched call (default). ``False`` loops over
        them instead: on a CPU, convolution- and attention-heavy models can be faster that way
        (``docs/benchmarks.md``); the results are the same.

    Notes
    -----
    The model can be

    - an ``nn.Module`` with ``params=None``: its parameters with ``requires_grad=True``,
      named as in ``named_parameters()``; gradients come back as a dict of those names;
    - an ``nn.Module`` with ``params`` a dict ``{name: tensor}`` (nested dicts join names with
      ``"."``), run by ``torch.func.functional_call``; gradients are shaped like ``params``;
    - a callable ``f(params, x)`` over a tree of nested dicts / lists / tuples of tensors.

    In explicit trees every floating tensor is a parameter, whatever its ``requires_grad``.
    """

    name = "torch"

    def __init__(self, *, chunk_size: int | None = None, warn_batchnorm: bool = True, batch_probes: bool = True):
        self.chunk_size = chunk_size
        self.warn_batchnorm = warn_batchnorm
        self.batch_probes = batch_probes

    # -- the model as a function of its parameter leaves -------------------------------------

    def _split(self, model: Any, params: Tree, *, own: bool):
        """(call(leaves, x), leaves, rebuild(grads) -> tree). ``own``: a module's own parameters."""
        if isinstance(model, nn.Module):
            if self.warn_batchnorm:
                _warn_batchnorm(model)
            if params is None:
                named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                names = [n for n, _ in named]
                leaves = [p if own else p.detach() for _, p in named]

                def rebuild(grads):
                    return dict(zip(names, grads))

                if own:  # autograd straight through the module's own parameters
                    return (lambda ls, x: model(x)), leaves, rebuild
            else:
                names, leaves = flatten(params, _is_leaf)

                def rebuild(grads):
                    return unflatten(params, grads, _is_leaf)

            def call(ls, x):
                return torch.func.functional_call(model, dict(zip(names, ls)), (x,))

            return call, leaves, rebuild
        if params is None:
            raise TypeError("params: required when the model is a callable f(params, x) and not an nn.Module")
        if not callable(model):
            raise TypeError(f"model: expected an nn.Module or a callable f(params, x), got {type(model).__name__}")
        _, leaves = flatten(params, _is_leaf)

        def call(ls, x):
            return model(unflatten(params, list(ls), _is_leaf), x)

        def rebuild(grads):
            return unflatten(params, grads, _is_leaf)

        return call, leaves, rebuild

    # -- the protocol ---------------------------------------------------------------------------

    def parameters(self, model: Any, params: Tree) -> Tree:
        """``params``, or (``params=None``) a module's parameters that require grad, detached."""
        if params is not None:
            return params
        _, leaves, rebuild = self._split(model, None, own=False)
        return rebuild(leaves)

    def linearize(self, model: Any, params: Tree, inputs: Any) -> tuple[torch.Tensor, Callable]:
        """Run the model once with autograd on: (detached logits, ``vjp``).

        ``vjp(ct)``: ``ct`` shaped like the logits, or (K, *logits.shape) for K cotangents pulled
        back in one ``torch.autograd.grad`` call; leaves gain the leading K. Parameters the
        logits do not depend on get zeros. The graph lives as long as ``vjp``.
        """
        call, leaves, rebuild = self._split(model, params, own=True)
        if not leaves:
            raise ValueError("params: no floating parameters that require grad")
        if not (isinstance(model, nn.Module) and params is None):
            leaves = [t.detach().requires_grad_(True) for t in leaves]  # aliases, no copies
        with torch.enable_grad():
            out = call(leaves, inputs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: expected a tensor of logits, got {type(out).__name__}")
        shape = tuple(out.shape)

        def pull(ct, batched):
            grads = torch.autograd.grad(
                out, leaves, ct, retain_graph=True, allow_unused=True, is_grads_batched=batched
            )
            lead = (ct.shape[0],) if batched else ()
            return [torch.zeros(lead + tuple(p.shape), dtype=p.dtype, device=p.device) if g is None else g
                    for g, p in zip(grads, leaves)]

        def vjp(ct: torch.Tensor) -> Tree:
            batched = check_ct(ct, shape)
            if batched and not self.batch_probes:
                rows = [pull(c, False) for c in ct]
                return rebuild([torch.stack(col) for col in zip(*rows)])
            return rebuild(pull(ct, batched))

        return out.detach(), vjp

    def per_example_vjp(self, model: Any, params: Tree, inputs: Any, cotangents: torch.Tensor, *,
                        chunk_size: int | None = None) -> Tree:
        """J_nᵀ ct[k, n] for every probe k and input n: leaves (K, N, *leaf.shape).

        ``torch.func.vmap`` over the inputs (each run as a batch of one) of ``torch.func.vjp``,
        ``vmap``-ed over the K cotangents. ``chunk_size`` (default: the backend's) bounds how
        many inputs are processed at once.
        """
        call, leaves, rebuild = self._split(model, params, own=False)
        # Parameters that require grad (a dict of a module's own parameters) would otherwise
        # record every chunk's products in an autograd graph kept alive by the result.
        leaves = [t.detach() for t in leaves]
        x0 = torch.utils._pytree.tree_leaves(inputs)[0]
        check_per_example_ct(cotangents, x0.shape[0])

        def one(x_n, ct_n):
            x1 = torch.utils._pytree.tree_map(lambda a: a.unsqueeze(0), x_n)
            _, pull = torch.func.vjp(lambda *ls: call(ls, x1), *leaves)
            return torch.func.vmap(pull)(ct_n.unsqueeze(1))

        rows = torch.func.vmap(
            one, in_dims=(0, 1), out_dims=1, randomness="different",
            chunk_size=chunk_size if chunk_size is not None else self.chunk_size,
        )(inputs, cotangents)
        return rebuild(list(rows))

    def probes(self, seed: int, shape: tuple[int, ...], dist: str, like: torch.Tensor) -> torch.Tensor:
        """Rademacher, Gaussian or uniform values from a ``torch.Generator`` seeded with ``seed``.

        On ``like``'s device and dtype. The same seed gives the same values on the same kind of
        device; CPU and CUDA generators differ.
        """
        seed, shape, dist = check_seed(seed), check_shape(shape), check_dist(dist)
        if not isinstance(like, torch.Tensor) or not like.is_floating_point():
            raise TypeError(f"like: expected a floating torch tensor, got {getattr(like, 'dtype', type(like))}")
        gen = torch.Generator(device=like.device)
        gen.manual_seed(seed)
        kw = dict(generator=gen, dtype=like.dtype, device=like.device)
        if dist == "rademacher":
            return torch.randint(0, 2, shape, **kw).mul_(2).sub_(1)
        if dist == "gaussian":
            return torch.randn(shape, **kw)
        return torch.rand(shape, **kw)

    def leaves(self, tree: Tree) -> list[tuple[str, torch.Tensor]]:
        """Named leaves: a module's parameters that require grad by ``named_parameters()`` names,
        or a tree's floating tensors by keys and indices joined with ``"."``."""
        if isinstance(tree, nn.Module):
            return [(n, p) for n, p in tree.named_parameters() if p.requires_grad]
        names, leaves = flatten(tree, _is_leaf)
        return list(zip(names, leaves))

    def unflatten(self, tree: Tree, leaves: list[torch.Tensor]) -> Tree:
        """A tree shaped like ``tree`` (a module gives a dict by parameter name) holding ``leaves``."""
        named = self.leaves(tree)
        leaves = list(leaves)
        if len(leaves) != len(named):
            raise ValueError(f"leaves: the tree has {len(named)} leaves, got {len(leaves)}")
        if isinstance(tree, nn.Module):
            return {n: v for (n, _), v in zip(named, leaves)}
        return unflatten(tree, leaves, _is_leaf)

    def __repr__(self) -> str:
        return f"<fisherlib backend {self.name!r}>"
