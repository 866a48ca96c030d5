"""Layer I/O capture for torch modules: each recognised layer's input and output cotangents.

One forward with forward hooks keeps every recognised layer's input x and output y; one
``torch.autograd.grad`` of the logits with respect to all the y, with a batched stack of V logit
cotangents as ``grad_outputs``, gives the cotangents g at every layer's output. Nothing here is
``vmap``-ed over the model, so models that ``torch.func`` cannot trace (HuggingFace attention
masks, data-dependent control flow, dropout in training mode) work. The hooks only reshape what
they see into the canonical forms of :mod:`fisherlib.core.layers` (convolutions are unfolded
into patches, normalisations give their normalised input x̂ by the framework's own function
without the affine part); every reduction happens there.

Recognised modules, and what each owns:

=====================================  =============  ==========================================
module                                 kind           leaves
=====================================  =============  ==========================================
Linear (any leading axes)              dense          weight, bias (positions share the weight)
HuggingFace Conv1D (GPT-2)             dense          weight stored (in, out), bias
Conv1d / Conv2d / Conv3d               dense          weight, bias (over unfolded patches)
Embedding (padding_idx included)       embedding      weight
LayerNorm, RMSNorm, GroupNorm          scale_shift    weight (scale), bias (shift)
BatchNorm1d/2d/3d in eval mode         scale_shift    weight (scale), bias (shift)
=====================================  =============  ==========================================

A leaf is covered only if it has one use in the autograd graph and that use is a recognised
call: a parameter also used directly in the forward (``nn.MultiheadAttention``'s projections, a
positional embedding added as a tensor), a tied weight or a module called twice is counted in
the graph and handed to the generic per-example VJP instead.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import Layer

__all__ = ["LayerCapture", "RECOGNISED", "capture"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
RECOGNISED = (nn.Linear, nn.Embedding) + _CONVS + _NORMS
"""Module types whose parameters the layer rules cover."""

_ROLES = {"dense": ("weight", "bias"), "embedding": ("weight",), "scale_shift": ("weight", "bias")}
_CORE_ROLE = {"scale_shift": {"weight": "scale", "bias": "shift"}}


class StochasticModelWarning(UserWarning):
    """The model draws random numbers in its forward (dropout in training mode)."""

    __module__ = "fisherlib.backends"


class _Call:
    """One recognised module call: the module, its kind, its tracked roles, x and y."""

    __slots__ = ("module", "kind", "roles", "x", "y")

    def __init__(self, module, kind, roles, x, y):
        self.module, self.kind, self.roles, self.x, self.y = module, kind, roles, x, y


def _transposed_linear(m: nn.Module) -> bool:
    """HuggingFace's ``Conv1D`` (GPT, GPT-2): a linear layer whose weight is stored (in, out)."""
    return (type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.ndim == 2 and getattr(m, "nf", None) == m.weight.shape[1])


def _recognised(m: nn.Module) -> bool:
    return isinstance(m, RECOGNISED) or _transposed_linear(m)


def _kind(m: nn.Module) -> str | None:
    if _transposed_linear(m):
        return "dense"
    if isinstance(m, nn.Embedding):
        return None if (m.sparse or m.scale_grad_by_freq) else "embedding"
    if isinstance(m, (nn.Linear,) + _CONVS):
        return "dense"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "scale_shift" if not _batch_statistics(m) else None
    if isinstance(m, _NORMS):
        return "scale_shift"
    return None


def _batch_statistics(m) -> bool:
    return m.training or not m.track_running_stats


@contextlib.contextmanager
def frozen_statistics(model: Any):
    """Run a forward without changing any batch-norm running statistics.

    Modules in training mode update copies of their buffers, and get their own back afterwards:
    restoring values in place instead would change tensors the backward pass has saved.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    names = ("running_mean", "running_var", "num_batches_tracked")
    saved = [(m, {n: getattr(m, n) for n in names}) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m, buffers in saved:
        for n, b in buffers.items():
            if b is not None:
                setattr(m, n, b.clone())
    try:
        yield
    finally:
        for m, buffers in saved:
            for n, b in buffers.items():
                setattr(m, n, b)


def capture(model: nn.Module, names: list[str], leaves: list[torch.Tensor], inputs: Any, run: Callable, *,
            batch_probes: bool = True):
    """Forward once with hooks: (detached logits, :class:`LayerCapture`).

    ``run(leaves, inputs)`` is the adapter's forward returning the logits tensor; ``leaves`` are
    the tracked parameter tensors, named by ``names``; ``batch_probes``: one batched backward
    for a stack of cotangents, else one backward per row.
    """
    if not leaves:
        raise ValueError("params: no floating parameters that require grad")
    if not isinstance(model, nn.Module):  # f(params, x): no layers to recognise, all leaves generic
        with torch.enable_grad():
            out = run(leaves, inputs)
        return out.detach(), LayerCapture([], out, names, leaves, batch_probes)
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and _batch_statistics(m)]
    if bn:
        raise ValueError(
            f"model: {type(bn[0]).__name__} normalises with the statistics of the batch (training mode), "
            "which couples the inputs, so per-example Fisher products are not defined; call model.eval() "
            "first, or use a batch method (method='hutchinson' or 'mc' with per_example=False)")
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in model.modules()):
        warnings.warn(
            f"model: {type(model).__name__} is in training mode with dropout, so its forward is random; "
            "the per-example products are those of one forward (method='exact' gives the exact Fisher "
            "of that forward). Call model.eval() for a deterministic Fisher.",
            StochasticModelWarning, stacklevel=4)
    index = {id(t): i for i, t in enumerate(leaves)}
    calls: list[_Call] = []
    clone: set[int] = set()  # modules whose output is changed in place later
    expand: set[int] = set()  # modules whose (1, ...) output broadcasts over the batch
    n = [0]

    def hook(module, args, out):
        kind = _kind(module)
        if kind is None or not args or not isinstance(out, torch.Tensor) or not isinstance(args[0], torch.Tensor):
            return None
        roles = {r: index[id(p)] for r in _ROLES[kind]
                 if isinstance(p := getattr(module, r, None), torch.Tensor) and id(p) in index}
        if not roles:
            return None
        x, y, new = args[0].detach(), out, None
        if id(module) in expand:  # one output for the whole batch: make every input's row its own
            x, y = x.expand(n[0], *x.shape[1:]), out.expand(n[0], *out.shape[1:])
            new = y
        if id(module) in clone:
            # ReLU(inplace=True) after the layer would overwrite its output: hand the rest of the
            # model a copy, whose gradient flows back to the recorded output.
            new = y.clone()
        calls.append(_Call(module, kind, roles, x, y))
        return new

    def forward():
        calls.clear()
        handles = [m.register_forward_hook(hook) for m in model.modules() if _recognised(m)]
        try:
            with torch.enable_grad(), frozen_statistics(model):
                logits = run(leaves, inputs)
        finally:
            for h in handles:
                h.remove()
        return logits

    rng = _rng_state()
    out = forward()
    n[0] = N = out.shape[0] if out.ndim else 1
    drop = {id(c.module) for c in calls if c.x.ndim == 0 or c.x.shape[0] not in (1, N)}
    expand.update(id(c.module) for c in calls if N > 1 and c.x.ndim and c.x.shape[0] == 1 and c.y.shape[:1] == (1,))
    clone.update(id(c.module) for c in calls if c.y._version != 0)
    if expand or clone:
        first = out.detach()
        _set_rng_state(rng)  # the same dropout masks
        out = forward()
        if expand and not torch.equal(out.detach(), first):  # it was not broadcast over the batch
            drop |= expand
            expand.clear()
            _set_rng_state(rng)
            out = forward()
    drop |= _not_batch_major(model, inputs, out, calls)
    calls[:] = [c for c in calls if id(c.module) not in drop]
    return out.detach(), LayerCapture(calls, out, names, leaves, batch_probes)


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _not_batch_major(model, inputs, out, calls) -> set[int]:
    """Modules whose rows are not one per input (a (T, N, d) sequence-first layout, say).

    The cotangent of input 0's logits alone must vanish on every other input's rows of a
    layer's output; one backward shows it, once per model and input shapes.
    """
    N = out.shape[0] if out.ndim else 1
    if N < 2 or not calls:
        return set()
    key = tuple(tuple(a.shape) for a in torch.utils._pytree.tree_leaves(inputs) if isinstance(a, torch.Tensor))
    seen = _LAYOUTS.setdefault(model, {})
    if key not in seen:
        ct = torch.zeros_like(out)
        ct[0] = torch.randn(out.shape[1:], dtype=out.dtype, device=out.device)
        gs = torch.autograd.grad(out, [c.y for c in calls], ct, retain_graph=True, allow_unused=True)
        seen[key] = {id(c.module) for c, g in zip(calls, gs) if g is not None and bool(g[1:].ne(0).any())}
    return seen[key]


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class LayerCapture:
    """The records of one forward; :meth:`__call__` pulls cotangents back to every layer output."""

    def __init__(self, calls, out, names, leaves, batch_probes):
        self.out = out
        self.names = names
        self.batch_probes = batch_probes
        uses = _graph_uses(out, leaves)
        recorded = [0] * len(leaves)
        for c in calls:
            for i in c.roles.values():
                recorded[i] += 1
        # A leaf is covered when its one use in the graph is one recognised call; a leaf used
        # twice (tied weights, a module called twice) needs its uses summed per input before
        # squaring, which the generic path does.
        covered = {i for i, n in enumerate(recorded) if n == 1 and uses.get(id(leaves[i]), 0) == 1}
        self.calls = []
        for c in calls:
            c.roles = {r: i for r, i in c.roles.items() if i in covered}
            if c.roles:
                self.calls.append(c)
        # Leaves the logits do not depend on are neither: their products are zero.
        self.uncovered = [names[i] for i in range(len(leaves)) if i not in covered and uses.get(id(leaves[i]))]
        self.shapes = [tuple(t.shape) for t in leaves]
        self.elements = sum(c.y.numel() for c in self.calls)  # cotangent entries per column
        # Every recognised output is the logits themselves (a linear head on fixed features).
        self.logits_only = bool(self.calls) and all(c.y is out for c in self.calls)
        # Set by the estimator for such a head with positions (a language model's output
        # projection): dense layers whose output is the logits record every position as its
        # own input, so that one column √diag I(z) gives the exact diagonal in closed form.
        self.positions_as_inputs = False
        # A layer's captured input in its core shape, formed once per forward and reused by every
        # chunk of columns: unfolding a CNN's patches per chunk was a third of its exact diagonal.
        self._inputs: dict[int, torch.Tensor] = {}

    def __call__(self, ct: torch.Tensor) -> list[Layer]:
        """Layers for a stack ``ct`` (V, *logits.shape) of logit cotangents, one batched backward."""
        ys = [c.y for c in self.calls]
        if not ys:
            return []
        if self.batch_probes:
            gs = torch.autograd.grad(self.out, ys, ct, retain_graph=True, allow_unused=True, is_grads_batched=True)
        else:
            rows = [torch.autograd.grad(self.out, ys, c, retain_graph=True, allow_unused=True) for c in ct]
            gs = [None if r[0] is None else torch.stack(r) for r in zip(*rows)]
        for c, g in zip(self.calls, gs):
            if g is None:  # its parameters reach the logits, so its output must too
                raise RuntimeError(
                    f"model: no cotangent reached the output of {type(c.module).__name__} although its "
                    "parameters shape the logits (activation checkpointing recomputes it?); pass "
                    "backend=fisherlib.backends.get('torch', layer_io=False) for the generic path")
        return [self._layer(c, g) for c, g in zip(self.calls, gs)]

    def _layer(self, c: _Call, g: torch.Tensor) -> Layer:
        V, N = g.shape[0], c.x.shape[0]
        m = c.module
        roles = {_CORE_ROLE.get(c.kind, {}).get(r, r): i for r, i in c.roles.items()}
        leaves = {r: self.names[i] for r, i in roles.items()}
        shapes = {r: self.shapes[i] for r, i in roles.items()}
        if isinstance(m, nn.Linear) or _transposed_linear(m):
            if self.positions_as_inputs and c.y is self.out:  # (N·T, 1, 1, I): a position per row
                return Layer("dense", leaves, shapes, c.x.reshape(-1, 1, 1, c.x.shape[-1]),
                             g.reshape(V, -1, 1, 1, g.shape[-1]), layout="oi" if isinstance(m, nn.Linear) else "io")
            x = c.x.reshape(N, -1, 1, c.x.shape[-1])
            return Layer("dense", leaves, shapes, x, g.reshape(V, N, -1, 1, g.shape[-1]),
                         layout="oi" if isinstance(m, nn.Linear) else "io")
        if isinstance(m, _CONVS):
            G = m.groups
            x = self._input(c)
            g = g.reshape(V, N, G, m.out_channels // G, -1).permute(0, 1, 4, 2, 3)
            return Layer("dense", leaves, shapes, x, g)
        if isinstance(m, nn.Embedding):
            return Layer("embedding", leaves, shapes, c.x.reshape(N, -1), g.reshape(V, N, -1, g.shape[-1]),
                         num=m.num_embeddings, padding=m.padding_idx)
        xhat = self._input(c)  # (N, S, C)
        C = xhat.shape[-1]
        if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):  # channels on axis 1
            g = g.reshape(V, N, C, -1).transpose(2, 3)
        else:  # LayerNorm, RMSNorm: the trailing normalised_shape
            g = g.reshape(V, N, -1, C)
        return Layer("scale_shift", leaves, shapes, xhat, g)

    def _input(self, c: _Call) -> torch.Tensor:
        """A convolution's unfolded patches (N, L, G, C·Πk / G) or a normalisation's x̂ (N, S, C)."""
        x = self._inputs.get(id(c))
        if x is not None:
            return x
        m, N = c.module, c.x.shape[0]
        if isinstance(m, _CONVS):
            x = _patches(m, c.x)  # (N, L, C·Πk)
            x = x.reshape(N, x.shape[1], m.groups, -1)
        else:
            x = _normalised(m, c.x)
            if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):  # channels on axis 1
                x = x.reshape(N, x.shape[1], -1).transpose(1, 2)
            else:  # LayerNorm, RMSNorm: the trailing normalised_shape
                x = x.reshape(N, -1, math.prod(m.normalized_shape))
        self._inputs[id(c)] = x
        return x


def _normalised(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂: the module's normalisation of x by the framework's function, without its affine part."""
    with torch.no_grad():
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        return F.rms_norm(x, m.normalized_shape, None, m.eps)


def _patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches (N, L, C_in·Πk) of a convolution, in the order of weight.reshape(O, -1)."""
    d = x.ndim - 2
    k, s, dil = m.kernel_size, m.stride, m.dilation
    if isinstance(m.padding, str):
        pads = [0] * d if m.padding == "valid" else [dil[i] * (k[i] - 1) for i in range(d)]
        lr = [(p // 2, p - p // 2) for p in pads]
    else:
        lr = [(p, p) for p in m.padding]
    flat = [v for pair in reversed(lr) for v in pair]  # F.pad: last axis first
    if any(flat):
        x = F.pad(x, flat, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    for i in range(d):  # windows of every spatial axis, appended as trailing axes
        x = x.unfold(2 + i, dil[i] * (k[i] - 1) + 1, s[i])
    if any(v != 1 for v in dil):
        x = x[(Ellipsis, *[slice(None, None, v) for v in dil])]
    N, C = x.shape[:2]
    out = x.shape[2:2 + d]
    # (N, C, o..., k...) -> (N, o..., C, k...) -> (N, L, C·Πk)
    x = x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return x.reshape(N, math.prod(out), -1)


def _graph_uses(out: torch.Tensor, leaves: list[torch.Tensor]) -> dict[int, int]:
    """How many edges of the autograd graph of ``out`` end at each leaf (by ``id``)."""
    ids = {id(t) for t in leaves}
    uses: dict[int, int] = {}
    seen = set()
    stack = [out.grad_fn] if out.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                if id(var) in ids:
                    uses[id(var)] = uses.get(id(var), 0) + 1
            else:
                stack.append(nxt)
    return uses
