"""The driver: loop over batches, ask the core for cotangents, the backend for VJPs, accumulate."""

from __future__ import annotations

import functools
import itertools
import math
import operator
import time
import warnings
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Callable, Iterable

import numpy as np

from .. import backends as _backends
from ..core import cotangents, kronecker
from ..core._compat import (LOGITS_PROBLEMS, array_namespace, as_floating, device, is_eager, logits_problem,
                             logits_problem_code)
from ..core._lib import widen
from . import _blocks, _kfac, _outputs, _products
from ._batches import batches as _batches
from ._batches import leaves_of as _leaves_of
from ._batches import n_of as _batches_n_of
from ._batches import signature as _signature
from ._compiled import warn_compile_fallback
from ._estimate import DETERMINISTIC, FisherEstimate, probe_moments, stderr_kind
from ._kronecker import KroneckerEstimate
from ._running import ONE_LOGIT, warn_if_probabilities
from ._seeds import derive

Array = Any

__all__ = ["fisher"]

METHODS = ("hutchinson", "exact", "mc", "empirical")
STRUCTURES = ("diag", "blocks", "sketch", "trace", "kfac", "ekfac")
KRONECKER = ("kfac", "ekfac")
BOUNDS = (None, "upper", "lower")
DISTS = ("rademacher", "gaussian")
REDUCTIONS = ("sum", "mean")


def fisher(
    model: Any,
    params: Any,
    batches: Any,
    *,
    structure: str = "diag",
    method: str = "hutchinson",
    likelihood: str = "softmax",
    bound: str | None = None,
    rank: int = 1,
    probes: int = 1,
    dist: str = "rademacher",
    per_example: bool | None = None,
    seed: int = 0,
    first_batch: int | None = None,
    batch_indices: Iterable[int] | None = None,
    reduction: str = "sum",
    blocks: Any = None,
    backend: Any = None,
    progress: bool = False,
    chunk_size: int | None = None,
    keep_probes: bool | None = None,
    labels: str | None = "labels",
    logits: Callable[[Any], Array] | None = None,
    mask: str | Callable[[Any], Array] | None = "attention_mask",
    ignore_index: int | None = -100,
    kfac_approx: str = "expand",
    basis: KroneckerEstimate | None = None,
) -> FisherEstimate | KroneckerEstimate:
    r"""Estimate the Fisher information F(θ) = Σ_x J_xᵀ I(z_x) J_x of a classifier.

    Parameters
    ----------
    model, params
        The network and its parameters, as the backend takes them (a torch ``nn.Module`` with
        ``params=None`` or a dict; a JAX ``f(params, x)`` with a pytree; an explicit-VJP model).
    batches
        An iterable of batches: inputs, or ``(inputs, labels)`` pairs, or dicts (a tokenizer's
        output) whose ``labels`` entry holds the labels. Inputs are an array or a tree of
        arrays (dict, tuple, list) with the inputs along the first axis: an ``nn.Module`` takes
        a dict as keyword arguments and a tuple as positional ones (``((x1, x2), y)``); a
        function ``f(params, x)`` gets it as ``x``. A single array or dict is one batch; one
        ``(inputs, labels)`` pair must be given as ``[(inputs, labels)]``. Labels are used by
        ``method="empirical"`` (and mark ignored positions, see ``ignore_index``). A torch
        DataLoader works.
    structure : {"diag", "blocks", "sketch", "trace", "kfac", "ekfac"}
        What to estimate: the diagonal (a tree shaped like ``params``), dense blocks (see
        ``blocks``), a low-rank sketch F̂ = G Gᵀ/K, the trace, or Kronecker factors per layer
        (K-FAC, or EK-FAC's re-fitted eigenbasis diagonal: a :class:`KroneckerEstimate`,
        ``docs/kfac.md``).
    method : {"hutchinson", "exact", "mc", "empirical"}
        See Notes.
    likelihood : {"softmax", "sigmoid"}
        Multi-class (simplex) or multi-label (hypercube) outputs.
    bound : {None, "upper", "lower"}
        Estimate (or, with ``method="exact"``, compute) F_UB = Σ Jᵀ diag(p) J or
        F_LB = Σ λ_C (Jᵀv_C)(Jᵀv_C)ᵀ instead of F (softmax only).
    rank : int
        With ``bound="lower"``: the rank-k lower envelope Σ_{top k} λ_j v_j v_jᵀ.
    probes : int
        K, the number of probes (Hutchinson) or sampled labels (Monte-Carlo) per batch.
    dist : {"rademacher", "gaussian"}
        Probe distribution.
    per_example : bool, optional
        Square per-input gradients instead of batch sums (lower variance, N times the VJP
        work). Always on for "exact" and "empirical".
    seed : int
        Seed of every random draw; the batch with global index b uses a seed derived from
        (seed, b), so its draws do not depend on which process or device runs it.
    first_batch : int, optional
        Global index of the first batch (the others follow: first_batch + 1, ...). A worker or
        a resumed run over batches [k, k + n) of a longer stream passes ``first_batch=k`` and
        draws exactly what one run over the whole stream draws for them. Default: 0 (random
        methods); deterministic methods then record no batch range (see Notes).
    batch_indices : iterable of int, optional
        Global index of every batch, one per batch, all distinct (for strided shards, e.g.
        ``range(rank, n_batches, world)``); exclusive with ``first_batch``.
    reduction : {"sum", "mean"}
        F as a sum over inputs (the paper's) or divided by their number.
    blocks
        With ``structure="blocks"``: None (one block per parameter leaf), "unitwise", or groups
        of leaf names (a list of lists, or a dict {name: list}).
    backend
        A backend name ("torch", "jax", "numpy", "cupy"), a backend object, or None to infer it
        from the type of ``params``.
    progress : bool
        Show a tqdm progress bar with inputs per second.
    chunk_size : int, optional
        Inputs per per-example VJP call (default: what fits 2^24 gradient entries).
    keep_probes : bool, optional
        Keep the K per-probe partial sums (K × P numbers: :meth:`FisherEstimate.first_probes`
        needs them), or only running moments (2 × P: the sum of each batch's probe mean and of
        its variance s²/K, which give the same value and an unbiased standard error). Default:
        keep them while K × P stays under 2^26 entries. A sketch always keeps them.
    labels : str or None
        The key of the labels in dict batches, taken out before the model is called.
    logits : callable, optional
        ``logits(output)``: the logits in the model's output. By default the output itself, its
        ``.logits`` (HuggingFace ``ModelOutput``) or its ``"logits"`` entry.
    mask : str, callable or None
        For logits with positions, (N, T, C): which outputs count. The key of a 0/1 mask
        (N, T) in dict inputs (default ``"attention_mask"``; ignored when the logits have no
        positions, as for a sequence classifier), a callable ``mask(inputs)``, or None.
    ignore_index : int or None
        Positions whose label equals it count for no method (as in torch's cross-entropy).
        The Fisher is token-level, F = Σ_n Σ_t m_nt J_ntᵀ I(z_nt) J_nt over counted positions;
        ``n_inputs`` counts inputs and ``n_outputs`` the positions counted
        (``docs/huggingface-and-sequences.md``).
    kfac_approx : {"expand", "reduce"}
        With ``structure="kfac"`` or ``"ekfac"``: how positions sharing a weight (sequence
        positions, convolution patches) enter the factors (Eschenhagen et al., 2023): each
        (input, position) as an example ("expand", the default) or each input with its inputs
        averaged and cotangents summed over positions ("reduce"); see :mod:`fisherlib.core.kronecker`.
    basis : KroneckerEstimate, optional
        With ``structure="ekfac"``: re-fit the diagonal in this K-FAC estimate's eigenbasis
        in one pass (e.g. one all-reduced across ranks, so that the shards' estimates merge);
        by default a first pass over ``batches`` computes the K-FAC factors it comes from.

    Returns
    -------
    FisherEstimate or KroneckerEstimate

    Notes
    -----
    Per batch of N inputs with logits z (C classes) and P parameters:

    =============  =========================  ==========================  ========================
    method         cost (VJPs per batch)      bias                        variance of diag entry
    =============  =========================  ==========================  ========================
    hutchinson     1 batched call of K        unbiased for F (or bound)   <= 2 F_ii² / K
    ... per_ex.    N·K per-example            unbiased                    smaller (no cross terms)
    mc             1 batched call of K        unbiased                    unbounded CV
    exact          N·C per-example            exact                       0
    empirical      N per-example              biased (observed labels)    0 (deterministic)
    =============  =========================  ==========================  ========================

    The Hutchinson cotangent is B(p̃)ξ with B = diag(√p) − p√pᵀ and p̃ detached, so that
    g = Σ_x J_xᵀ B_x ξ_x has E[g gᵀ] = F: cross terms between inputs vanish in expectation,
    which is why one VJP per batch suffices. For Rademacher ξ, Var(ĝ_i²) = 2(F_ii² − Σ_k w_ik⁴)
    <= 2F_ii² (theory.md §5.2), so the coefficient of variation is at most √(2/K).

    The estimate records the draws it rests on (``FisherEstimate.draws``: seed and global batch
    ranges), so that :meth:`FisherEstimate.merge` joins shards of one stream with one seed and
    refuses to count a batch (or reuse a draw) twice. Deterministic methods record their batch
    range only when ``first_batch`` or ``batch_indices`` says where it lies.

    References
    ----------
    K. Sun, "Deterministic Bounds and Random Estimates of Metric Tensors on Neuromanifolds",
    arXiv:2505.13614 (ICLR 2026), Propositions 6 and 12.

    Examples
    --------
    >>> import numpy as np
    >>> import fisherlib
    >>> from fisherlib.models import Linear
    >>> model = Linear(4, 3)
    >>> params = model.init(seed=0, like=np.zeros(1))
    >>> x = np.random.default_rng(0).normal(size=(32, 4))
    >>> exact = fisherlib.fisher(model, params, x, method="exact")
    >>> est = fisherlib.fisher(model, params, x, probes=64, seed=1)
    >>> bool(np.all(np.abs(est.value["weight"] - exact.value["weight"]) < 5 * est.stderr["weight"] + 1e-12))
    True
    """
    opts = _validate(structure, method, likelihood, bound, rank, probes, dist, per_example, reduction,
                     blocks, seed, chunk_size, kfac_approx, basis)
    probes, rank, seed = opts["probes"], opts["rank"], opts["seed"]  # NumPy integers become ints
    if structure == "ekfac" and basis is None:  # two passes: the factors' eigenbases, then the diagonal
        if iter(batches) is batches:
            raise ValueError("batches: structure='ekfac' passes over the batches twice (the K-FAC factors, "
                             "then the diagonal in their eigenbasis); give a list or a DataLoader, not an iterator")
        kw = dict(method=method, likelihood=likelihood, bound=bound, rank=rank, probes=probes, dist=dist,
                  per_example=per_example, seed=seed, first_batch=first_batch, batch_indices=batch_indices,
                  reduction=reduction, backend=backend, progress=progress, chunk_size=chunk_size,
                  keep_probes=keep_probes, labels=labels, logits=logits, mask=mask, ignore_index=ignore_index,
                  kfac_approx=kfac_approx)
        with warnings.catch_warnings():  # the second pass names the same fallback leaves
            warnings.simplefilter("ignore", _kfac.KroneckerFallbackWarning)
            first = fisher(model, params, batches, structure="kfac", **kw)
        return fisher(model, params, batches, structure="ekfac", basis=first, **kw)
    kron = None
    index = _global_indices(first_batch, batch_indices, method in DETERMINISTIC)
    done: list[int | None] = []  # global index of every batch run
    be = None
    parts: list[Array] | None = None
    moments = None
    n_inputs = 0
    n_outputs = 0
    bar = _Progress(_batches(batches, labels), progress)
    step = nonfinite = None  # the whole batch step compiled once, where the adapter can (compile)
    finite_fn = None  # the compiled finiteness check of the sums, once at the end (compiled batches)
    pending: list = []  # (batch, flags) of the compiled batches, checked at the end with one sync
    template, C = None, None
    for b, (inputs, y) in enumerate(bar):
        if be is None:  # a module with params=None is identified by its inputs
            be = _with_output(_resolve_backend(backend, params if params is not None else inputs), logits)
            if structure not in KRONECKER and params is not None:
                step = _compiled_step(be, model, opts, structure, blocks, mask, ignore_index, keep_probes)
            elif params is not None:
                template = params
                names = [n for n, _ in be.leaves(template)]
                shapes = [tuple(x.shape) for _, x in be.leaves(template)]
                kron = _kron_accumulator(opts, structure, keep_probes, basis, names, kfac_approx)
                step = _compiled_kron_step(be, model, opts, structure, mask, ignore_index, kron, keep_probes)
        done.append(next(index))
        s = _batch_seed(opts["seed"], b if done[-1] is None else done[-1], opts.get("stream", 0))
        got = step(params, inputs, y, s, b, parts, moments) if step is not None else None
        if got is not None:  # one compiled call: the batch's step and the running sums' update
            parts, flags, moments, C = got[0], got[1], got[2], got[3] or C
            finite_fn = step.nonfinite
            if template is None:
                template = params
                names = [n for n, _ in be.leaves(template)]
                shapes = [tuple(x.shape) for _, x in be.leaves(template)]
                plan = _blocks.plan(names, shapes, blocks) if structure == "blocks" else None
            n_inputs += _batches_n_of(inputs)
            pending.append((b, flags))
            bar.inputs(n_inputs)
            continue
        error = getattr(step, "error", None)
        if step is not None or pending:  # a batch the step could not take: eager from here
            n_outputs += _raise_flagged(pending, C, likelihood) if pending else 0
            step, finite_fn, pending = None, None, []
        out, vjp, capture, cts, m, y = _batch_cotangents(be, model, params, inputs, y, b, s, opts, structure, mask, ignore_index)
        warn_compile_fallback(error, f"fisher(): batch {b}")  # the eager path took it: no error of its own
        shape = tuple(out.shape)
        if parts is None:
            template = _parameter_tree(be, model, params, out, vjp, inputs)
            names = [n for n, _ in be.leaves(template)]
            shapes = [tuple(x.shape) for _, x in be.leaves(template)]
            plan = _blocks.plan(names, shapes, blocks) if structure == "blocks" else None
            if structure in KRONECKER:
                kron = _kron_accumulator(opts, structure, keep_probes, basis, names, kfac_approx)
        n = shape[0]  # inputs; z has a row per output (position)
        if kron is not None:
            kron.add(be, model, params, inputs, cts, capture, m, shape, names, shapes, opts["chunk_size"])
            del out, vjp, capture, cts  # before the next batch's forward (see below)
            parts = kron.parts  # marks the first batch done
            n_inputs += n
            n_outputs += _outputs.count(m, shape)
            bar.inputs(n_inputs, n_outputs)
            continue
        contrib = _contributions(be, model, params, inputs, vjp, capture, cts, opts, structure, plan, shapes, names)
        if moments is None:  # decided once the size of the per-probe sums is known
            moments = _moments(keep_probes, structure, method, probes, contrib)
        if moments:
            contrib = [probe_moments(c) for c in contrib]
        parts = contrib if parts is None else _add(parts, contrib, inplace=not opts["per_example"])
        n_inputs += n
        n_outputs += _outputs.count(m, shape)
        bar.inputs(n_inputs, n_outputs)
        # This batch's arrays go now, not when the next batch's replace them: its contributions
        # (the size of the parameters, once added into the sums) and its logits and cotangents
        # would otherwise be held through the next batch's forward and backward.
        del out, vjp, capture, cts, contrib
    if kron is not None:
        if pending:
            n_outputs += _raise_flagged(pending, C, likelihood)
        _check_sums(kron.parts, [f"{name} ({role})" for role, name in kron.roles], finite_fn)
        return _kronecker_estimate(kron, opts, structure, be, template, names, shapes, n_inputs, n_outputs,
                                   done, reduction)
    if parts is None:
        raise ValueError("batches: no batch was given")
    if pending:
        n_outputs += _raise_flagged(pending, C, likelihood)

    out_names = names if structure in ("diag", "sketch") else (
        ["trace"] if structure == "trace" else [blk.name for blk in plan])
    _check_sums(parts, out_names, finite_fn, nonfinite)
    deterministic = method in DETERMINISTIC
    K = 0 if deterministic else probes
    kind = stderr_kind(method, probes)
    tree = (lambda arrays: be.unflatten(template, arrays)) if structure == "diag" else None
    return FisherEstimate(
        names=out_names, parts=parts, method=method, structure=structure, likelihood=likelihood,
        bound=bound, rank=rank if bound == "lower" else 1, reduction=reduction, n_inputs=n_inputs,
        n_probes=K, per_example=opts["per_example"], dist=dist if method == "hutchinson" else "none",
        stderr_kind=kind, seed=seed if not deterministic else None,
        block_shapes=_blocks.shapes_of(plan) if plan else {}, _tree=tree, n_outputs=n_outputs,
        draws=_record(done, None if deterministic else seed), moments=bool(moments),
        _compile=getattr(be, "compile", None),
    )


# --------------------------------------------------------------------------- one batch


def _batch_cotangents(be, model, params, inputs, y, b, s, opts, structure, mask, ignore_index):
    """One batch's forward and logit cotangents: (logits, vjp, capture, cotangent stacks, output
    weights m or None, labels as used). ``s``: the batch's seed (an int, or traced)."""
    method, likelihood = opts["method"], opts["likelihood"]
    # Per-example methods run the layer-I/O forward where the adapter has one.
    got = _products.forward(be, model, params, inputs) if opts["per_example"] else None
    out, vjp, capture = (got[0], None, got[1]) if got else (*be.linearize(model, params, inputs), None)
    z, _ = _check_logits(out, b, likelihood)
    shape = tuple(out.shape)
    m, y = _outputs.weights(inputs, y, out, mask=mask, ignore_index=ignore_index, likelihood=likelihood,
                            b=b, needed=method == "empirical")
    if method == "exact":  # the C columns in chunks, never the dense (C, n, C) stack
        cts = _products.exact_cotangents(z, shape, opts, capture, structure)
    else:
        cts = [_reshape_like(_cotangent(be, z, y, b, opts, seed=s), out)]  # (K, *logits.shape)
    if m is not None:  # masked outputs and ignored labels: zero cotangents
        cts = _outputs.masked(cts, m, shape)
    if method == "empirical" and _outputs.positions(shape) > 1:  # token-level: a column per position
        cts = _outputs.by_position(cts, shape, _products.ELEMENTS)
    return out, vjp, capture, cts, m, y


def _contributions(be, model, params, inputs, vjp, capture, cts, opts, structure, plan, shapes, names):
    """One batch's contributions (per probe, or summed for deterministic methods) to every part."""
    if opts["per_example"]:
        return _products.per_example(
            be, model, params, inputs, cts, capture, structure=structure, plan=plan, shapes=shapes,
            names=names, summed=opts["method"] in DETERMINISTIC, chunk_size=opts["chunk_size"])
    # The batch's last pull-back: a vjp that can (frees_graph) frees the forward's graph as
    # its backward passes it, so the peak memory is a training step's (docs/language-models.md).
    g = vjp(cts[0], last=True) if getattr(vjp, "frees_graph", False) else vjp(cts[0])
    grads = [g for _, g in be.leaves(g)]
    if structure == "diag":  # one term per probe: squares, without summing a size-1 axis
        return [_square(g, getattr(be, "vjp_fresh", False)) for g in grads]
    return _products.accumulate([g[:, None, ...] for g in grads], structure, plan, sum_probes=False)


def _compiled_step(be, model, opts, structure, blocks, mask, ignore_index, keep_probes):
    """The batch step as one compiled function of (params, inputs, labels, seed), where the
    adapter offers ``compile``; None otherwise. Cached by the adapter under the model and the
    options, so that later calls with the same shapes reuse the compilation.

    It returns ``run(params, inputs, labels, seed, b)``: (contributions, logits, outputs
    counted), or None when the step cannot take the batch (a model that does not trace, a
    batch whose labels or inputs are not arrays, any error at tracing: the eager path then
    runs the batch and raises its own, precise, error).
    """
    comp = getattr(be, "compile", None)
    if comp is None:
        return None
    method, likelihood = opts["method"], opts["likelihood"]

    def pure(params, inputs, y, s):
        out, vjp, capture, cts, m, y = _batch_cotangents(be, model, params, inputs, y, 0, s, opts, structure, mask,
                                                         ignore_index)
        named = be.leaves(params)
        names, shapes = [n for n, _ in named], [tuple(x.shape) for _, x in named]
        plan = _blocks.plan(names, shapes, blocks) if structure == "blocks" else None
        contrib = _contributions(be, model, params, inputs, vjp, capture, cts, opts, structure, plan, shapes, names)
        return contrib, out, _flags(out, y, m, method, likelihood)

    try:
        # The backend object too: a wrapper (distributed.jax_fisher's traced seed) gets its own.
        key = ("fisher.step", be, model, structure, tuple(sorted(opts.items())), repr(blocks), mask, ignore_index)
        hash(key)
    except TypeError:  # an unhashable model or mask: not cached, not compiled
        return None
    shapes_of = getattr(comp(pure, key=key), "eval_shape", None)  # shapes without running (jax.jit's)
    if shapes_of is None:
        return None

    def fused(moments):  # the step and the running sums' update in one call
        fold = _fold_fn(moments)

        def step_fold(params, inputs, y, s, parts):
            contrib, _, flags = pure(params, inputs, y, s)
            return fold(parts, contrib), flags  # the logits stay inside: no (N, T, C) output

        return comp(step_fold, key=key + ("fold", bool(moments)))

    def run(params, inputs, y, s, b, parts, moments):
        """(parts, flags, moments, C) after this batch."""
        leaf = _leaves_of(params)[:1]
        if not all(is_eager(a) for a in _leaves_of(inputs)[:1] + leaf):
            return None  # inside the caller's jit, which compiles the whole loop anyway
        if y is not None and not hasattr(y, "shape"):
            y = np.asarray(y)
        seed = np.uint32(s)
        try:
            if parts is None:  # the first batch: the contributions' shapes say what the sums hold
                contrib, out = _step_shapes(shapes_of, key, be, params, inputs, y, seed)
                moments = _moments(keep_probes, structure, method, opts["probes"], contrib)
                # The zero sums from one compiled call (on the parameters' device): an eager zeros per
                # leaf compiled a program per shape, seconds for a transformer's few dozen leaves.
                specs = tuple(((2, *c.shape[1:]) if moments else tuple(c.shape), c.dtype) for c in contrib)
                parts = comp(functools.partial(_zeros, specs), key=("fisher.zeros", specs))(leaf[0])
                C = out.shape[-1]
            else:
                C = None
            new, flags = fused(moments)(params, inputs, y, seed, parts)
        except Exception as err:  # noqa: BLE001 - the eager path runs the batch and raises its own error
            run.error = err
            return None
        if b == 0:  # the first batch at once (one sync): its errors and the probabilities warning come
            if np.asarray(flags)[:3].any():  # from the eager path, which takes the whole call then
                return None
        return new, flags, moments, C  # later batches' flags: checked at the end

    # The sums' finiteness once after the last batch (inf and NaN stay in a sum), not per batch:
    # a pass over the parameters' size each batch was a tenth of a small model's step.
    run.nonfinite = comp(_any_nonfinite, key=("fisher.nonfinite",))
    run.error = None  # what the compiled step raised, for the warning once the eager path has run
    return run


def _kron_accumulator(opts, structure, keep_probes, basis, names, kfac_approx) -> _kfac.Accumulator:
    method = opts["method"]
    return _kfac.Accumulator(
        kfac_approx, method in DETERMINISTIC,
        lambda c: _moments(keep_probes, structure, method, opts["probes"], c),
        basis=_kfac.eigenbases(basis, names) if structure == "ekfac" else None,
        blocks=basis.blocks if structure == "ekfac" else None,
        fallback=list(basis.fallback) if structure == "ekfac" else [])


def _compiled_kron_step(be, model, opts, structure, mask, ignore_index, kron, keep_probes):
    """:func:`_compiled_step` for K-FAC and EK-FAC: one compiled call per batch adds the
    batch's factor terms into ``kron``'s sums (op by op, a JAX batch cost 12-37 training steps).

    The first batch's blocks, fallback leaves and ``moments`` come from an abstract evaluation
    of the step (cached per signature, as :func:`_step_shapes`); they are static in the
    compiled step, and the eigenbases of EK-FAC are its arguments. ``run`` has
    :func:`_compiled_step`'s signature and sets ``kron``'s state; None where the step cannot
    take the batch (the eager path then runs it, and raises its own errors).
    """
    comp = getattr(be, "compile", None)
    if comp is None:
        return None
    method, likelihood = opts["method"], opts["likelihood"]
    try:
        key = ("fisher.kron", be, model, structure, tuple(sorted(opts.items())), mask, ignore_index, keep_probes,
               kron.setting, kron.summed,
               None if kron.blocks is None else repr([b.to_dict() for b in kron.blocks]), tuple(kron.fallback))
        hash(key)
    except TypeError:
        return None

    def pure(acc):
        def step(params, inputs, y, s, basis):
            out, _, capture, cts, m, y = _batch_cotangents(be, model, params, inputs, y, 0, s, opts, structure,
                                                           mask, ignore_index)
            named = be.leaves(params)
            acc.basis = basis
            new = acc.terms(be, model, params, inputs, cts, capture, m, tuple(out.shape), [n for n, _ in named],
                            [tuple(x.shape) for _, x in named], opts["chunk_size"])
            return new, out, _flags(out, y, m, method, likelihood)

        return step

    fold = {}  # "fn": the compiled step and sums' update, once the first batch has fixed the blocks

    def run(params, inputs, y, s, b, parts, moments):
        """(parts, flags, moments, C) after this batch; ``kron`` holds them too."""
        leaf = _leaves_of(params)[:1]
        if not all(is_eager(a) for a in _leaves_of(inputs)[:1] + leaf):
            return None
        if y is not None and not hasattr(y, "shape"):
            y = np.asarray(y)
        seed = np.uint32(s)
        try:
            C = None
            if parts is None:  # the first batch: the blocks, fallback and moments from the shapes
                def trace():
                    acc = replace(kron, parts=None, moments=None, fallback=list(kron.fallback))
                    new, out, _ = comp(pure(acc)).eval_shape(params, inputs, y, seed, kron.basis)
                    return (acc.blocks, acc.fallback, acc.moments, tuple((tuple(t.shape), t.dtype) for t in new),
                            out.shape[-1])

                blocks, fallback, moments, specs, C = _traced_once(key, be, params, inputs, y, trace)
                parts = comp(functools.partial(_zeros, specs), key=("fisher.zeros", specs))(leaf[0])

                def fold_step(params, inputs, y, s, basis, parts):
                    acc = replace(kron, parts=None, moments=moments, blocks=blocks, fallback=list(fallback))
                    new, _, flags = pure(acc)(params, inputs, y, s, basis)
                    return [a + t for a, t in zip(parts, new)], flags

                planned = (repr([b.to_dict() for b in blocks]), tuple(fallback), moments)
                fold["fn"] = comp(fold_step, key=key + ("fold",) + planned)
                # kron's plan now: a batch that goes eager instead starts a new accumulator
                kron.blocks, kron.fallback, kron.moments = blocks, list(fallback), moments
            new, flags = fold["fn"](params, inputs, y, seed, kron.basis, parts)
        except Exception as err:  # noqa: BLE001 - the eager path runs the batch and raises its own error
            run.error = err
            return None
        if b == 0 and np.asarray(flags)[:3].any():  # the eager path raises, or warns, for the first batch
            return None
        if kron.parts is None:
            _kfac.warn_fallback(kron.fallback, stacklevel=5)
        kron.parts = new
        return new, flags, moments, C

    run.nonfinite = comp(_any_nonfinite, key=("fisher.nonfinite",))
    run.error = None
    return run


# (step key, signature of the arguments) -> (contributions, logits); K-FAC steps' keys ("fisher.kron")
# -> (blocks, fallback, moments, term shapes, C)
_SHAPES: OrderedDict = OrderedDict()
_SHAPES_SIZE = 64


def _step_shapes(shapes_of, key, be, params, inputs, y, seed) -> tuple:
    """The compiled step's contribution and logit shapes for these arguments, traced once per
    signature (structure, shapes, dtypes): a new abstract evaluation each call cost 0.4 ms,
    a fifth of the fixed cost of a call on a small model."""
    return _traced_once(key, be, params, inputs, y, lambda: shapes_of(params, inputs, y, seed)[:2])


def _traced_once(key, be, params, inputs, y, trace: Callable[[], Any]) -> Any:
    """``trace()`` (an abstract evaluation of a compiled step), cached by the step's ``key`` and
    the arguments' signature (structure, shapes, dtypes) in :data:`_SHAPES`."""
    sig = _signature((inputs, y))
    if sig is None:  # a leaf that is not an array: nothing to key on
        return trace()
    sig = (key, tuple((n, tuple(x.shape), str(x.dtype)) for n, x in be.leaves(params)), sig)
    hit = _SHAPES.get(sig)
    if hit is None:
        hit = _SHAPES[sig] = trace()
        if len(_SHAPES) > _SHAPES_SIZE:
            _SHAPES.popitem(last=False)
    else:
        _SHAPES.move_to_end(sig)
    return hit


def _raise_flagged(flags: list, C: int, likelihood: str) -> int:
    """The outputs counted over the compiled batches, after one sync: or the error the eager
    checks would have raised for the first batch whose flags are up."""
    # Stacked on the host: a device-side stack compiled three small programs (0.07 s) on a first call.
    rows = np.stack([np.asarray(_to_host(f)) for _, f in flags])
    for (b, _), (problem, _, bad_labels, _) in zip(flags, rows):
        if problem:
            raise ValueError(f"batches: batch {b} gave non-finite logits: {LOGITS_PROBLEMS[int(problem)]}")
        if bad_labels:
            raise ValueError(f"batches: batch {b} has labels outside 0..{C - 1}" if likelihood == "softmax" else
                             f"batches: batch {b} has multi-label targets other than 0 and 1")
    return int(round(float(rows[:, 3].sum())))


def _flags(out, y, m, method, likelihood):
    """[what is wrong with the logits (an index into LOGITS_PROBLEMS), rows that look like
    probabilities, labels out of range, outputs counted]: what the eager checks of one batch
    look at, as one array."""
    xp = array_namespace(out)
    z = xp.reshape(out, (-1, out.shape[-1]))
    bad = logits_problem_code(z, xp, softmax=likelihood == "softmax", finite=likelihood == "sigmoid")
    # What warn_if_probabilities warns about (rows in [0, 1] summing to 1), not just values in
    # [0, 1]: two logits of a fresh model often lie there, and each flag sends the batch eager.
    C = z.shape[-1]
    probs = (xp.all((z >= 0) & (z <= 1)) & xp.all(xp.abs(xp.sum(z, axis=-1) - 1) <= 1e-4 * C)
             if likelihood == "softmax" and C >= 2 else xp.asarray(False, device=device(z)))
    labels = xp.asarray(False)
    if method == "empirical" and y is not None:  # the range checks of _labels
        C = z.shape[-1]
        ok = xp.all((y >= 0) & (y < C)) if likelihood == "softmax" else xp.all((y == 0) | (y == 1))
        labels = ~ok
    count = _outputs.count(m, tuple(out.shape))
    return xp.stack([xp.astype(bad, z.dtype), xp.astype(probs, z.dtype), xp.astype(labels, z.dtype),
                     xp.astype(xp.asarray(count, device=device(z)), z.dtype)])


def _zeros(specs, like):
    """Zero arrays of the (shape, dtype) ``specs`` (``like`` places them), pure."""
    xp = array_namespace(like)
    return [xp.zeros(shape, dtype=dtype) for shape, dtype in specs]


def _fold_fn(moments):
    """fold(parts, contrib) -> parts, pure: the per-probe moments when kept, and the addition."""
    def fold(parts, contrib):
        if moments:
            contrib = [probe_moments(c) for c in contrib]
        return contrib if parts is None else [a + c for a, c in zip(parts, contrib)]

    return fold


# --------------------------------------------------------------------------- helpers


def _kronecker_estimate(kron, opts, structure, be, template, names, shapes, n_inputs, n_outputs, done,
                        reduction) -> KroneckerEstimate:
    method, probes = opts["method"], opts["probes"]
    deterministic = method in DETERMINISTIC
    return KroneckerEstimate(
        names=names, shapes=shapes, blocks=kron.blocks, fallback=kron.fallback, parts=kron.parts,
        method=method, structure=structure, setting=kron.setting, likelihood=opts["likelihood"],
        reduction=reduction, n_inputs=n_inputs, n_probes=0 if deterministic else probes,
        dist=opts["dist"] if method == "hutchinson" else "none", stderr_kind=stderr_kind(method, probes),
        seed=None if deterministic else opts["seed"], draws=_record(done, None if deterministic else opts["seed"]),
        n_outputs=n_outputs, moments=bool(kron.moments), basis=kron.basis,
        _tree=lambda arrays: be.unflatten(template, arrays),
        _leaves_of=lambda tree: [x for _, x in be.leaves(tree)])


def _square(g: Array, fresh: bool) -> Array:
    """g² of a probe gradient, in place when the adapter's VJP returns fresh arrays: on a CPU a
    new P-sized array costs more than squaring (a page-faulted buffer once past the allocator's
    cache)."""
    xp = array_namespace(g)
    w = widen(g, xp=xp)
    if fresh or w is not g:  # ours to overwrite
        w *= w
        return w
    return w * w


def _add(parts: list, contrib: list, *, inplace: bool) -> list:
    """Running sums over batches; ``inplace`` adds into ``parts`` (arrays this loop made)."""
    if not inplace:
        return [a + c for a, c in zip(parts, contrib)]
    out = []
    for a, c in zip(parts, contrib):
        a += c  # in place, or (JAX) a new array bound to ``a``: the list holds the result either way
        out.append(a)
    return out


# Per-probe partial sums kept by default up to this many entries (K × P); beyond, running moments.
_KEEP_PROBES = 1 << 26


def _moments(keep_probes, structure, method, probes, contrib) -> bool:
    """Whether the estimate keeps running moments instead of its K per-probe partial sums."""
    if keep_probes is not None and not isinstance(keep_probes, bool):
        raise TypeError(f"keep_probes: expected True, False or None, got {keep_probes!r}")
    if method in DETERMINISTIC or probes < 2 or structure == "sketch":
        if keep_probes is False and structure == "sketch":
            raise ValueError("keep_probes: a sketch is its K probe gradients; it cannot keep moments only")
        return False
    if keep_probes is not None:
        return not keep_probes
    return sum(math.prod(c.shape) for c in contrib) > _KEEP_PROBES


def _with_output(be, logits):
    """The backend taking the logits from the model's output with ``logits`` (when given)."""
    if logits is None:
        return be
    if not callable(logits):
        raise TypeError(f"logits: expected a callable taking the model's output to its logits, "
                        f"got {type(logits).__name__}")
    with_output = getattr(be, "with_output", None)
    if with_output is None:
        raise TypeError(f"logits: the {getattr(be, 'name', type(be).__name__)!r} backend takes models "
                        "that return their logits; it has no with_output(fn)")
    return with_output(logits)


def _resolve_backend(backend, params):
    if backend is None:
        return _backends.infer(params)
    if isinstance(backend, str):
        return _backends.get(backend)
    return backend


def _parameter_tree(be, model, params, logits, vjp, inputs):
    """The tree gradients are shaped like: ``params``, or a model's own (``params=None``).

    Adapters may say what a model owns (``be.parameters``); otherwise one pull-back of zeros
    shows it, at the cost of one more VJP (and one more forward after a layer-I/O forward).
    """
    if params is not None:
        return params
    own = getattr(be, "parameters", None)
    if own is not None:
        return own(model, None)
    if vjp is None:
        logits, vjp = be.linearize(model, params, inputs)
    xp = array_namespace(logits)
    z = xp.reshape(logits, (-1, logits.shape[-1]))
    g = vjp(_reshape_like(z[None, ...] * 0, logits))
    return be.unflatten(g, [x[0, ...] for _, x in be.leaves(g)])


def _validate(structure, method, likelihood, bound, rank, probes, dist, per_example, reduction, blocks,
              seed, chunk_size, kfac_approx="expand", basis=None):
    for name, value, allowed in (("structure", structure, STRUCTURES), ("method", method, METHODS),
                                 ("likelihood", likelihood, cotangents.LIKELIHOODS),
                                 ("bound", bound, BOUNDS), ("dist", dist, DISTS),
                                 ("reduction", reduction, REDUCTIONS)):
        if value not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    probes, rank = _integer("probes", probes, 1), _integer("rank", rank, 1)
    seed = _integer("seed", seed, 0)
    chunk_size = None if chunk_size is None else _integer("chunk_size", chunk_size, 1)
    deterministic = method in DETERMINISTIC
    if bound is not None and method in ("mc", "empirical"):
        raise ValueError(f"bound: {bound!r} is estimated by method='hutchinson' or computed by "
                         f"method='exact', not by method={method!r}")
    if bound is not None and likelihood != "softmax":
        raise ValueError("bound: the bounds F_LB and F_UB concern the softmax simplex; with "
                         "likelihood='sigmoid' the Fisher kernel is already diagonal")
    if rank != 1 and bound != "lower":
        raise ValueError(f"rank: only used with bound='lower', got rank={rank} with bound={bound!r}")
    if deterministic and probes != 1:
        raise ValueError(f"probes: method={method!r} draws nothing at random; leave probes=1")
    if deterministic and per_example is False:
        raise ValueError(f"per_example: method={method!r} always works per example")
    if structure == "sketch" and deterministic:
        raise ValueError(f"structure: 'sketch' keeps K random probe gradients; method={method!r} "
                         "is not random (use structure='blocks' or 'diag')")
    if structure == "sketch" and per_example:
        raise ValueError("per_example: a sketch sums probe gradients over inputs, so per-example "
                         "VJPs would give the same sketch at N times the cost")
    if blocks is not None and structure != "blocks":
        raise ValueError(f"blocks: only used with structure='blocks', got structure={structure!r}")
    if kfac_approx not in kronecker.SETTINGS:
        raise ValueError(f"kfac_approx: expected one of {kronecker.SETTINGS}, got {kfac_approx!r}")
    if kfac_approx != "expand" and structure not in KRONECKER:
        raise ValueError(f"kfac_approx: only used with structure='kfac' or 'ekfac', got structure={structure!r}")
    if basis is not None and structure != "ekfac":
        raise ValueError(f"basis: only used with structure='ekfac', got structure={structure!r}")
    if basis is not None and (not isinstance(basis, KroneckerEstimate) or basis.structure != "kfac"):
        raise TypeError(f"basis: expected the KroneckerEstimate of fisher(..., structure='kfac'), "
                        f"got {getattr(basis, 'structure', type(basis).__name__)!r}")
    if structure in KRONECKER and per_example is False:
        raise ValueError(f"per_example: structure={structure!r} sums per-example outer products "
                         "g gᵀ of each layer's cotangents; it cannot use batch sums")
    return {"method": method, "likelihood": likelihood, "bound": bound, "rank": rank, "probes": probes,
            "dist": dist, "per_example": bool(per_example) or deterministic or structure in KRONECKER,
            "seed": seed, "stream": 1 if structure == "ekfac" else 0,
            "chunk_size": chunk_size}


def _integer(name: str, value: Any, least: int) -> int:
    """``value`` as an int (Python or NumPy integers; bools are not numbers here) >= ``least``."""
    try:
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}") from None
    if number < least:
        raise ValueError(f"{name}: expected an integer >= {least}, got {number}")
    return number


class _Progress:
    """Iterate batches, with a tqdm bar showing inputs (and tokens) per second when asked for."""

    def __init__(self, it, show: bool):
        self.bar = None
        if show:
            try:
                from tqdm.auto import tqdm
            except ImportError as e:  # pragma: no cover - tqdm ships with the test/demo extras
                raise ImportError("progress=True needs tqdm: pip install 'fisherlib[demo]'") from e
            it = self.bar = tqdm(it, desc="fisher", unit="batch")
        self.it = it
        self.t0 = time.perf_counter()

    def __iter__(self):
        return iter(self.it)

    def inputs(self, n: int, outputs: int | None = None) -> None:
        """Show inputs per second, and counted outputs (tokens) per second when they differ."""
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            rates = {"inputs_per_s": f"{n / dt:.0f}"}
            if outputs is not None and outputs != n:  # positions: a language model's tokens
                rates["tokens_per_s"] = f"{outputs / dt:.0f}"
            self.bar.set_postfix(**rates)


def _check_logits(logits, b, likelihood):
    xp = array_namespace(logits)
    if logits.ndim < 2:
        raise ValueError(f"batches: batch {b} gave logits of shape {tuple(logits.shape)}; expected (N, C)")
    C = logits.shape[-1]
    try:
        as_floating(logits, "logits", xp)
    except TypeError:
        raise TypeError(f"batches: batch {b} gave logits of dtype {logits.dtype}; the model must "
                        "return real floating logits") from None
    z = xp.reshape(logits, (-1, C))
    if C == 1 and likelihood == "softmax":
        raise ValueError(f"batches: batch {b} gave logits of shape {tuple(logits.shape)}: {ONE_LOGIT}")
    if is_eager(z):
        problem = logits_problem(z, xp, softmax=likelihood == "softmax", finite=likelihood == "sigmoid")
        if problem is not None:
            raise ValueError(f"batches: batch {b} gave non-finite logits: {problem}")
        if b == 0 and likelihood == "softmax":
            warn_if_probabilities(z, f"batches: batch {b}")
    return z, C


def _check_finite(parts: list, names: list | None, nonfinite: Array | None = None) -> None:
    """One device sync: the accumulated sums are finite, or an error that says where to look
    (the logits were checked per batch; an inf input can still give finite logits, through a
    saturating activation, and NaN gradients). ``nonfinite``: the flags, already computed."""
    if not parts or not is_eager(parts[0]):
        return
    if nonfinite is None:
        nonfinite = _nonfinite_flags(parts)
    bad = np.asarray(_to_host(nonfinite))
    if bad.any():
        where = [names[i] if names and i < len(names) else f"part {i}" for i in np.flatnonzero(bad)]
        raise ValueError(f"batches: the Fisher has non-finite entries (inf or NaN) in {', '.join(where)}, "
                         "although the logits were finite: an input or a parameter holds inf or NaN, "
                         "or the gradients overflowed")


def _check_sums(parts: list, names: list, any_nonfinite: Callable | None, nonfinite: Array | None = None) -> None:
    """The sums' finiteness once after the last batch (inf and NaN stay in a sum): through the
    compiled batches' ``any_nonfinite`` first where they give one (op by op JAX compiled a
    program per part shape), then :func:`_check_finite`, whose error names the parts."""
    if any_nonfinite is not None and parts and is_eager(parts[0]):
        if not bool(np.asarray(_to_host(any_nonfinite(parts)))):
            return
        nonfinite = None
    _check_finite(parts, names, nonfinite)


def _nonfinite_flags(parts: list) -> Array:
    """Whether each part holds inf or NaN, pure. Two reductions per part, no bool array of its
    size: NaN propagates through max and min, ±inf shows in one of them (isfinite + any took 1 s
    of a 7 s GPT-2 small batch)."""
    xp = array_namespace(*parts)
    return xp.stack([~(xp.isfinite(xp.max(x)) & xp.isfinite(xp.min(x))) if math.prod(x.shape)
                     else xp.asarray(False, device=device(x)) for x in parts])


def _any_nonfinite(parts: list) -> Array:
    """Whether any part holds inf or NaN, pure: one max and one min over all the parts at once (a
    program that compiles in a fraction of :func:`_nonfinite_flags`' two reductions per part)."""
    xp = array_namespace(*parts)
    flat = xp.concat([xp.reshape(x, (-1,)) for x in parts])
    if flat.shape[0] == 0:
        return xp.asarray(False)
    return ~(xp.isfinite(xp.max(flat)) & xp.isfinite(xp.min(flat)))


def _to_host(a):
    from ._estimate import _to_numpy

    return _to_numpy(a)


def _reshape_like(ct, logits):
    xp = array_namespace(ct)
    return xp.reshape(ct, (ct.shape[0], *logits.shape))


def _batch_seed(seed: int, b: int, stream: int = 0) -> int:
    return derive(seed, b, stream)


def _global_indices(first_batch, batch_indices, deterministic):
    """Each batch's global index (None: unknown, for deterministic methods by default)."""
    if first_batch is not None and batch_indices is not None:
        raise ValueError("first_batch: give first_batch or batch_indices, not both")
    if first_batch is not None and (isinstance(first_batch, bool) or not isinstance(first_batch, int)
                                    or first_batch < 0):
        raise ValueError(f"first_batch: expected a non-negative integer, got {first_batch!r}")
    if batch_indices is None:
        if first_batch is None and deterministic:
            return itertools.repeat(None)
        return itertools.count(first_batch or 0)
    if isinstance(batch_indices, (str, bytes)) or not hasattr(batch_indices, "__iter__"):
        raise TypeError(f"batch_indices: expected an iterable of integers, got "
                        f"{type(batch_indices).__name__}")
    return _checked_indices(batch_indices)


def _checked_indices(batch_indices):
    seen = set()
    for i in batch_indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"batch_indices: expected non-negative integers, got {i!r}")
        if int(i) in seen:
            raise ValueError(f"batch_indices: batch index {int(i)} appears twice (its draws would repeat)")
        seen.add(int(i))
        yield int(i)
    raise ValueError("batch_indices: fewer indices than batches")


def _record(indices, seed) -> tuple:
    """(seed, start, stop) triples covering the known global batch indices."""
    out: list[tuple] = []
    for i in sorted(i for i in indices if i is not None):
        if out and out[-1][2] == i:
            out[-1] = (seed, out[-1][1], i + 1)
        else:
            out.append((seed, i, i + 1))
    return tuple(out)


def _cotangent(be, z, labels, b, opts, index=None, *, seed=None):
    method, lik, K = opts["method"], opts["likelihood"], opts["probes"]
    n, C = z.shape
    if opts["bound"] == "lower" and opts["rank"] > C:
        raise ValueError(f"rank: the lower envelope has at most C={C} eigenpairs (classes), "
                         f"got rank={opts['rank']}")
    s = seed if seed is not None else _batch_seed(opts["seed"], b if index is None else index, opts.get("stream", 0))
    if method == "exact":
        return cotangents.exact_columns(z, lik, opts["bound"], opts["rank"])
    if method == "empirical":
        if labels is None:
            raise ValueError("batches: method='empirical' needs (inputs, labels) pairs")
        return cotangents.label_residual(z, _labels(labels, z, lik, b), lik)[None, ...]
    if method == "mc":
        u = be.probes(s, (K, n) if lik == "softmax" else (K, n, C), "uniform", like=z)
        return cotangents.monte_carlo(z, u, lik)  # e_ŷ − p from one softmax per chunk of positions
    if opts["bound"] == "lower":
        return cotangents.lower_bound(z, be.probes(s, (K, n, opts["rank"]), opts["dist"], like=z))
    if opts["bound"] == "upper":
        return cotangents.upper_bound(z, be.probes(s, (K, n, C), opts["dist"], like=z))
    # A draw by rows where the adapter offers one (the same values): the probes are then formed
    # a chunk of positions at a time with the cotangent, never as a whole (K, N·T, V) array.
    rows = _probe_rows(be)
    xi = rows(s, (K, n, C), opts["dist"], like=z) if rows is not None else be.probes(s, (K, n, C), opts["dist"], like=z)
    return cotangents.hutchinson(z, xi, lik)


def _probe_rows(be):
    """The adapter's ``probe_rows`` where the same class (or a subclass) defines it and ``probes``:
    a wrapper that redefines ``probes`` (another seed, a fault) and forwards the rest by
    ``__getattr__``, or a subclass that overrides ``probes`` only, keeps its own draws."""
    def owner(name):
        return next((k for k in type(be).__mro__ if name in vars(k)), None)

    mine, draws = owner("probe_rows"), owner("probes")
    return be.probe_rows if mine is not None and draws is not None and issubclass(mine, draws) else None


def _labels(labels, z, likelihood, b):
    xp = array_namespace(z)
    try:  # on the logits' device (a CUDA model with CPU labels)
        y = xp.asarray(labels if type(labels) is type(z) else np.asarray(labels), device=device(z))
    except Exception as e:  # noqa: BLE001 - any conversion failure is a bad label array
        raise TypeError(f"batches: batch {b} labels could not be read as an array: {e}") from None
    n, C = z.shape
    if likelihood == "softmax" and not xp.isdtype(y.dtype, "integral"):
        # 1.5 (or True) matches no class: the residual would silently be -p.
        raise TypeError(f"batches: batch {b} labels have dtype {y.dtype}; expected integer class "
                        "indices for likelihood='softmax'")
    want = (n,) if likelihood == "softmax" else (n, C)
    if tuple(y.shape) != want:
        raise ValueError(f"batches: batch {b} labels have shape {tuple(y.shape)}; expected {want} "
                         f"for {n} inputs and likelihood={likelihood!r}")
    if is_eager(y):  # concrete JAX arrays too; only traced labels go unchecked
        if likelihood == "softmax" and bool(xp.any((y < 0) | (y >= C))):
            raise ValueError(f"batches: batch {b} has labels outside 0..{C - 1}")
        if likelihood == "sigmoid" and bool(xp.any((y != 0) & (y != 1))):
            raise ValueError(f"batches: batch {b} has multi-label targets other than 0 and 1")
    return y
