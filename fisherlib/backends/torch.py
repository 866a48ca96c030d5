"""The PyTorch adapter: ``nn.Module``, a parameter dict through ``functional_call``, or ``f(params, x)``.

``linearize`` runs the model once with autograd on and keeps the graph; ``vjp(ct)`` pulls back
one cotangent, or a stack of K, with a single ``torch.autograd.grad`` call (K-stacks through
``is_grads_batched``, i.e. ``vmap`` over the backward pass). Per-input products use
``torch.func.vmap`` of ``torch.func.vjp`` with an optional ``chunk_size``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import math
import warnings
from typing import Any, Callable

import torch
from array_api_compat import is_array_api_obj
from torch import nn

from .torch_layers import frozen_statistics
from ._common import (
    BatchNormWarning,
    check_ct,
    check_dist,
    check_per_example_ct,
    check_seed,
    call_args,
    check_shape,
    flatten,
    logits_of,
    unflatten,
)

Tree = Any

__all__ = ["TorchBackend"]


def _is_leaf(x: Any) -> bool:
    # Only floating tensors are differentiable parameters; integer buffers stay as they are.
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _check_foreign_leaves(params: Tree) -> None:
    """TypeError for a floating array of another framework in a parameter tree.

    ``flatten`` skips what is not a torch tensor, so a NumPy (or JAX, CuPy) weight would be
    silently left out of the Fisher while the model still uses it as a constant.
    """
    def foreign(x):
        if isinstance(x, torch.Tensor) or not is_array_api_obj(x):
            return False
        return getattr(getattr(x, "dtype", None), "kind", "f") in "fc"  # integer arrays may be indices

    for name, leaf in zip(*flatten(params, lambda x: isinstance(x, torch.Tensor) or foreign(x))):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"params: leaf {name!r} is a {type(leaf).__module__}.{type(leaf).__name__} of dtype "
                f"{leaf.dtype}, not a torch tensor, so it would be left out of the Fisher; convert "
                "it with torch.as_tensor"
            )


def _check_names(model: nn.Module, params: Tree, names: list[str]) -> None:
    """ValueError for a name that is not one of the module's parameters (misspelt, a buffer)."""
    if isinstance(params, nn.Module):
        raise TypeError(
            f"params: got the module {type(params).__name__} itself; pass params=None for all its "
            "parameters that require grad, or a dict of some of them, e.g. "
            "{n: p for n, p in model.named_parameters() if n.startswith('classifier.')}")
    own = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for name in names:
        if name in own:
            continue
        if name in buffers:
            raise ValueError(
                f"params: {name!r} is a buffer of the module, not a parameter (a state_dict() holds "
                "buffers too); pass params=None, dict(model.named_parameters()), or a dict of some "
                "of them")
        close = difflib.get_close_matches(name, list(own), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else (
            f"; its parameters are {list(own)[:10]}{' ...' if len(own) > 10 else ''}")
        raise ValueError(f"params: the module {type(model).__name__} has no parameter {name!r}{hint}")


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
    batch_probes : bool or None
        ``True`` pulls a stack of K cotangents back through one graph in one batched call
        (``is_grads_batched``); ``False`` loops over them (the results are the same). ``None``
        (default) loops on a CPU, where the batched backward was slower on every model measured
        (``docs/natural-gradient.md``, "Cost"), and batches elsewhere; the layer-I/O capture
        and :meth:`jvp` batch unless ``False``.
    layer_io : bool
        Offer :meth:`layer_io` (default), so that per-example methods work from each recognised
        layer's input and output cotangents (``docs/per-example.md``); ``False`` leaves the
        generic per-example VJP (``torch.func.vmap`` of the whole model) for every parameter.

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
    output: Callable | None = None  # where the logits are in the model's output (with_output)
    vjp_fresh = True  # autograd returns new gradient tensors: estimators may overwrite them

    def __init__(self, *, chunk_size: int | None = None, warn_batchnorm: bool = True, batch_probes: bool | None = None,
                 layer_io: bool = True):
        self.chunk_size = chunk_size
        self.warn_batchnorm = warn_batchnorm
        self.batch_probes = batch_probes
        if not layer_io:  # the capability is absent: the estimators take the generic per-example VJP
            self.layer_io = None

    def with_output(self, output: Callable[[Any], torch.Tensor]) -> TorchBackend:
        """A copy of this backend that takes the logits as ``output(model_output)``."""
        new = copy.copy(self)
        new.output = output
        return new

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
                    def call_own(ls, x):
                        args, kwargs = call_args(x)
                        return logits_of(model(*args, **kwargs), self.output)

                    return call_own, leaves, rebuild
            else:
                _check_foreign_leaves(params)
                names, leaves = flatten(params, _is_leaf)
                _check_names(model, params, names)

                def rebuild(grads):
                    return unflatten(params, grads, _is_leaf)

            def call(ls, x):
                args, kwargs = call_args(x)
                return logits_of(torch.func.functional_call(model, dict(zip(names, ls)), args, kwargs), self.output)

            return call, leaves, rebuild
        if params is None:
            raise TypeError("params: required when the model is a callable f(params, x) and not an nn.Module")
        if not callable(model):
            raise TypeError(f"model: expected an nn.Module or a callable f(params, x), got {type(model).__name__}")
        _check_foreign_leaves(params)
        _, leaves = flatten(params, _is_leaf)

        def call(ls, x):  # a callable f(params, x) gets the batch as it is, a dict included
            return logits_of(model(unflatten(params, list(ls), _is_leaf), x), self.output)

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

    def linearize(self, model: Any, params: Tree, inputs: Any, *, statistics: bool = False
                  ) -> tuple[torch.Tensor, Callable]:
        """Run the model once with autograd on: (detached logits, ``vjp``).

        ``vjp(ct)``: ``ct`` shaped like the logits, or (K, *logits.shape) for K cotangents pulled
        back in one ``torch.autograd.grad`` call; leaves gain the leading K. Parameters the
        logits do not depend on get zeros. The graph lives as long as ``vjp``, or until
        ``vjp(ct, last=True)``, which frees the forward's saved activations layer by layer as
        the backward passes them, as a training step's ``loss.backward()`` does (the peak
        memory of a language model's backward was 1.36× a training step's with the graph
        kept, 1.04× without: ``docs/language-models.md``); ``vjp`` cannot be called again
        after it (``vjp.frees_graph`` is True: the protocol's execution hint). Batch-norm
        running statistics stay as they are unless ``statistics=True`` (:meth:`train_linearize`).
        """
        call, leaves, rebuild = self._split(model, params, own=True)
        if not leaves:
            raise ValueError("params: no floating parameters that require grad")
        if not (isinstance(model, nn.Module) and params is None):
            leaves = [t.detach().requires_grad_(True) for t in leaves]  # aliases, no copies
        with torch.enable_grad(), (contextlib.nullcontext() if statistics else frozen_statistics(model)):
            out = call(leaves, inputs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: expected a tensor of logits, got {type(out).__name__}")
        shape = tuple(out.shape)

        def pull(ct, batched, retain=True):
            grads = torch.autograd.grad(
                out, leaves, ct, retain_graph=retain, allow_unused=True, is_grads_batched=batched
            )
            lead = (ct.shape[0],) if batched else ()
            return [torch.zeros(lead + tuple(p.shape), dtype=p.dtype, device=p.device) if g is None else g
                    for g, p in zip(grads, leaves)]

        def vjp(ct: torch.Tensor, *, last: bool = False) -> Tree:
            batched = check_ct(ct, shape)
            if batched and ct.shape[0] == 1:  # one cotangent: a plain backward; vmap costs more on CPU
                return rebuild([g.unsqueeze(0) for g in pull(ct[0], False, not last)])
            if batched and not self.batched(ct):
                rows = [pull(c, False, not (last and k == ct.shape[0] - 1)) for k, c in enumerate(ct)]
                return rebuild([torch.stack(col) for col in zip(*rows)])
            return rebuild(pull(ct, batched, not last))

        vjp.frees_graph = True  # vjp(ct, last=True): see _protocol.py's execution hints

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

        # Outside autograd: with a dict of some of a module's parameters, the others still
        # require grad, and the products would carry their graph (memory growing per batch).
        with torch.no_grad():
            rows = torch.func.vmap(
                one, in_dims=(0, 1), out_dims=1, randomness="different",
                chunk_size=chunk_size if chunk_size is not None else self.chunk_size,
            )(inputs, cotangents)
        return rebuild(list(rows))

    def layer_io(self, model: Any, params: Tree, inputs: Any):
        """One forward with hooks: (detached logits, ``capture``), for layer-wise per-example products.

        ``capture(ct)`` pulls a stack ``ct`` (V, *logits.shape) back to the output of every
        recognised layer in one batched backward and returns :class:`fisherlib.core.layers.Layer`
        records; ``capture.uncovered`` names the leaves no recognised layer owns (see
        :mod:`fisherlib.backends.torch_layers`). Only for ``nn.Module`` models; a plain callable
        has no layers to recognise, so every leaf is uncovered.
        """
        from . import torch_layers

        call, leaves, rebuild = self._split(model, params, own=True)
        names = [n for n, _ in self.leaves(rebuild(leaves))]
        if not (isinstance(model, nn.Module) and params is None):
            leaves = [t.detach().requires_grad_(True) for t in leaves]  # aliases, as linearize's

        def run(ls, x):
            out = call(ls, x)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"model: expected a tensor of logits, got {type(out).__name__}")
            return out

        return torch_layers.capture(model, names, leaves, inputs, run, batch_probes=self.batch_probes is not False)

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
        if dist == "rademacher":  # eight signs per random byte, through a table of the 256 bytes' bits
            n = math.prod(shape)
            return _signs(_sign_bytes(gen, n, like.device), 0, n, like).reshape(shape)
        if dist == "gaussian":
            return torch.randn(shape, **kw)
        return torch.rand(shape, **kw)

    def probe_rows(self, seed: int, shape: tuple[int, ...], dist: str, like: torch.Tensor) -> Callable:
        """``rows(a, b)`` = ``probes(seed, shape, dist, like)[:, a:b]``, without the whole array.

        Rademacher signs are kept as their random bytes (one bit per sign: 1/32 of the float32
        array) and expanded to ±1 a slice at a time, so that a caller going through the rows
        in chunks (a language model's (K, N·T, V) probes: :func:`fisherlib.core.cotangents.by_rows`)
        never holds them all; the values are those of :meth:`probes` with the same arguments.
        Other distributions are drawn whole and sliced. ``rows.shape`` is ``shape``.
        """
        seed, shape, dist = check_seed(seed), check_shape(shape), check_dist(dist)
        if len(shape) < 2:
            raise ValueError(f"shape: probe_rows needs a leading probe axis and rows, got {shape}")
        if dist != "rademacher":
            whole = self.probes(seed, shape, dist, like)
            return _Rows(shape, lambda a, b: whole[:, a:b, ...])
        if not isinstance(like, torch.Tensor) or not like.is_floating_point():
            raise TypeError(f"like: expected a floating torch tensor, got {getattr(like, 'dtype', type(like))}")
        gen = torch.Generator(device=like.device)
        gen.manual_seed(seed)
        n = math.prod(shape)
        data = _sign_bytes(gen, n, like.device)
        per_probe, per_row = math.prod(shape[1:]), math.prod(shape[2:])

        def rows(a: int, b: int) -> torch.Tensor:
            if not 0 <= a <= b <= shape[1]:
                raise ValueError(f"rows: expected 0 <= a <= b <= {shape[1]}, got {(a, b)}")
            parts = [_signs(data, k * per_probe + a * per_row, k * per_probe + b * per_row, like)
                     for k in range(shape[0])]
            return (parts[0][None] if len(parts) == 1 else torch.stack(parts)).reshape(shape[0], b - a, *shape[2:])

        return _Rows(shape, rows)

    def batched(self, like: torch.Tensor) -> bool:
        """Whether K cotangents on ``like``'s device go back in one batched call (``batch_probes``)."""
        return self.batch_probes if self.batch_probes is not None else like.device.type != "cpu"

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

    # -- optional capability: Jacobian-vector products (fisherlib.spectral) --------------------

    def jvp(self, model: Any, params: Tree, inputs: Any, tangents: Tree) -> torch.Tensor:
        """J t: the logits' change along ``tangents``, by forward mode (``torch.func.jvp``).

        ``tangents`` is shaped like the gradients (a dict by parameter name for a module with
        ``params=None``), or has a leading axis K on every leaf for K directions at once: then
        the result is (K, *logits.shape), from one ``torch.func.vmap`` of the JVP (a loop with
        ``batch_probes=False``).
        """
        call, leaves, _ = self._split(model, params, own=False)
        leaves = tuple(t.detach() for t in leaves)
        if isinstance(model, nn.Module) and params is None:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            if not hasattr(tangents, "keys"):
                raise TypeError(f"tangents: expected a dict by parameter name, got {type(tangents).__name__}")
            missing = [n for n in names if n not in tangents]
            if missing:
                raise ValueError(f"tangents: missing {missing}")
            ts = [tangents[n] for n in names]
        else:
            ts = flatten(tangents, _is_leaf)[1]
        batched = _check_tangents(ts, leaves)

        def one(*t):
            return torch.func.jvp(lambda *ls: call(ls, inputs), leaves, t)[1]

        if not batched:
            return one(*ts)
        if self.batch_probes is not False:
            return torch.func.vmap(one)(*ts)
        return torch.stack([one(*[t[k] for t in ts]) for k in range(ts[0].shape[0])])


    # -- optional capability: training-loop reuse (fisherlib.estimators.RunningFisher) ----------

    def train_linearize(self, model: Any, params: Tree, inputs: Any) -> tuple[torch.Tensor, Callable]:
        """The training step's forward: :meth:`linearize`, but batch-norm layers in training mode
        update their running statistics, as the same step without fisherlib would."""
        return self.linearize(model, params, inputs, statistics=True)

    def loss_linearize(self, model: Any, params: Tree, inputs: Any, loss: Callable,
                       targets: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable]:
        """The training step's forward: (detached logits, loss value, ∂loss/∂logits, ``vjp``).

        ``loss(logits, targets)`` returns a scalar tensor. Its logit cotangent comes from a
        backward through the loss alone (on detached logits), so that the caller can stack it
        with probe cotangents and pull all of them back through the network in ONE ``vjp`` call
        (``is_grads_batched``) of this forward.
        """
        logits, vjp = self.train_linearize(model, params, inputs)
        z = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            value = loss(z, targets)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise TypeError(f"loss: expected a scalar tensor, got {getattr(value, 'shape', type(value).__name__)}")
        (ct,) = torch.autograd.grad(value, z)
        return logits, value.detach(), ct, vjp


class _Rows:
    """A draw by rows: ``rows(a, b)`` is rows a..b-1 (axis 1) of an array of ``shape``."""

    def __init__(self, shape: tuple[int, ...], take: Callable):
        self.shape, self._take = tuple(shape), take

    def __call__(self, a: int, b: int) -> torch.Tensor:
        return self._take(a, b)


def _sign_bytes(gen: torch.Generator, n: int, device) -> torch.Tensor:
    """The ⌈n/8⌉ random bytes of n Rademacher signs (uint8: the values int64 draws would hold)."""
    return torch.randint(0, 256, (-(-n // 8),), generator=gen, device=device, dtype=torch.uint8)


def _signs(data: torch.Tensor, e0: int, e1: int, like: torch.Tensor) -> torch.Tensor:
    """Signs e0..e1-1 (flat) of the draw whose bytes are ``data``: bit e % 8 of byte e // 8, as ±1."""
    if e1 <= e0:
        return torch.empty(0, dtype=like.dtype, device=like.device)
    byte = data[e0 // 8:(e1 - 1) // 8 + 1].to(torch.int32)
    out = _sign_table(like.dtype, like.device).index_select(0, byte).reshape(-1)
    return out[e0 % 8:e0 % 8 + (e1 - e0)]


@functools.lru_cache(maxsize=16)
def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8): row b holds the bits of b, least significant first, as -1 / +1."""
    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    return (2 * bits - 1).to(dtype)


def _check_tangents(ts: list, leaves) -> bool:
    """True when every tangent has a leading axis K in front of its parameter's shape."""
    if len(ts) != len(leaves):
        raise ValueError(f"tangents: expected {len(leaves)} leaves, got {len(ts)}")
    shapes = [tuple(p.shape) for p in leaves]
    got = [tuple(t.shape) for t in ts]
    if got == shapes:
        return False
    if all(len(g) == len(s) + 1 and g[1:] == s for g, s in zip(got, shapes)) and len({g[0] for g in got}) == 1:
        return True
    raise ValueError(f"tangents: expected leaves shaped {shapes}, or all with one leading K, got {got}")
