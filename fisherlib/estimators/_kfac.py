"""Kronecker factors from captured layers: the per-batch work of ``fisher(structure="kfac")``.

Per batch, from the adapter's layer I/O (one forward, one batched backward per stack of logit
cotangents), every recognised dense or embedding layer adds

* Σ x̃ x̃ᵀ and its count to its input factor A (no randomness: the layer's inputs);
* Σ g gᵀ to its gradient factor G, one term per probe (Hutchinson, Monte-Carlo) or summed
  over the columns of the output Fisher's factor (exact) or the label residual (empirical);
* for EK-FAC's second pass, Σ_n (Q_Gᵀ ∇W_n Q_A)², the Fisher's diagonal in the factors'
  eigenbasis, from per-example gradients formed in that basis (:mod:`fisherlib.core.layers`).

Leaves no Kronecker rule covers (normalisation scales and shifts, leaves used twice, layers
whose factors would be too large) get their diagonal instead, named in a
:class:`KroneckerFallbackWarning`: per example from the layer rules where a layer owns them;
for leaves no rule owns, the batch's pulled-back probe squared under random probes (one more
forward and backward) and per-example VJPs under exact and empirical columns. The
mathematics is in :mod:`fisherlib.core.kronecker`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core import kronecker
from ..core import layers as core_layers
from ..core._compat import array_namespace, device
from ..core._lib import widen
from . import _products
from ._estimate import probe_moments

Array = Any

# Largest side of a Kronecker factor: a larger one (a 50k-token vocabulary's output layer)
# would hold side² numbers; its layer falls back to the diagonal.
MAX_SIDE = 8192


class KroneckerFallbackWarning(UserWarning):
    """Some parameter leaves get a per-leaf diagonal instead of Kronecker factors."""

    __module__ = "fisherlib"


@dataclass
class KroneckerBlock:
    """One layer's Kronecker block: which leaves it holds and how they map to core layout.

    The core layout of the block's parameters is (groups, out, inputs), inputs counting the
    bias as a last column (``bias``); ``layout`` "oi" stores a dense weight (out, in...) as torch
    does, "io" (in..., out) as JAX kernels and HuggingFace's Conv1D do; an embedding table
    (num, dim) is "io" with A diagonal (``diagonal``).
    """

    name: str
    kind: str
    leaves: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    layout: str
    groups: int
    out: int
    inputs: int  # Ĩ: the layer's inputs, plus one for the bias
    padding: int | None = None
    diagonal: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> KroneckerBlock:
        d = dict(d)
        d["shapes"] = {k: tuple(v) for k, v in d["shapes"].items()}
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = {k: list(v) for k, v in self.shapes.items()}
        return d


def plan(layers: list, names: list[str]) -> tuple[list[KroneckerBlock], list[str]]:
    """The Kronecker blocks of the captured ``layers``, and the leaves left to the diagonal."""
    blocks, seen = [], set()
    for layer in layers:
        block = _block(layer, seen)
        if block is not None:
            blocks.append(block)
    covered = {n for b in blocks for n in b.leaves.values()}
    fallback = [n for n in names if n not in covered]
    return blocks, fallback


def _block(layer, seen: set) -> KroneckerBlock | None:
    if layer.kind == "dense":
        G, O = layer.g.shape[3], layer.g.shape[4]
        bias = "bias" in layer.leaves
        inputs = (layer.x.shape[-1] if "weight" in layer.leaves else 0) + int(bias)
        kind = "dense"
    elif layer.kind == "embedding":
        G, O, inputs, bias, kind = 1, layer.g.shape[-1], layer.num, False, "embedding"
    else:
        return None
    if O > MAX_SIDE or (kind == "dense" and inputs > MAX_SIDE):
        return None
    first = layer.leaves.get("weight", layer.leaves.get("bias"))
    name = first.rsplit(".", 1)[0] if "." in first else first
    name = first if name in seen else name
    seen.add(name)
    return KroneckerBlock(name=name, kind=kind, leaves=dict(layer.leaves), shapes=dict(layer.shapes),
                          layout=layer.layout, groups=G, out=O, inputs=inputs, padding=layer.padding,
                          diagonal=kind == "embedding")


def eigenbases(estimate, names: list[str]) -> list:
    """Per block of a K-FAC ``estimate``: [Q_A (None for a diagonal A), Q_G], its factors' eigenvectors."""
    if list(estimate.names) != list(names):
        raise ValueError("basis: the K-FAC estimate was computed for other parameters "
                         f"({estimate.names[:3]}... against {names[:3]}...)")
    return [[eA[1], eG[1]] for eA, eG in (estimate._eig(b) for b in estimate.blocks)]


def warn_fallback(fallback: list[str], stacklevel: int = 4) -> None:
    if fallback:
        warnings.warn(
            f"structure: no Kronecker rule covers {len(fallback)} parameter leaves "
            f"({', '.join(fallback[:8])}{', ...' if len(fallback) > 8 else ''}); they get their per-leaf "
            "diagonal (normalisation scales and shifts, weights used twice or tied, layers whose factor "
            f"would be larger than {MAX_SIDE}², and models without layer I/O)",
            KroneckerFallbackWarning, stacklevel=stacklevel)


@dataclass
class Accumulator:
    """Running sums of one ``fisher(structure="kfac" | "ekfac")`` call over batches.

    ``parts`` follows :attr:`roles`: per block its A sum (G, Ĩ, Ĩ) or (1, num), its count (1,),
    its G terms (K | 2 | 1, G, O, O) — then per fallback leaf its diagonal terms — then, for
    EK-FAC, per block its re-fitted diagonal (K | 2 | 1, G, O, Ĩ). Probe terms are kept one per
    probe, or as running moments (``moments``), as :class:`FisherEstimate` keeps its parts.
    """

    setting: str
    summed: bool
    decide: Any  # decide(probe terms) -> keep running moments instead of one term per probe
    basis: list | None = None  # EK-FAC: per block (Q_A or None, Q_G)
    blocks: list[KroneckerBlock] | None = None
    fallback: list[str] = field(default_factory=list)
    parts: list | None = None
    moments: bool | None = None

    @property
    def roles(self) -> list[tuple[str, str]]:
        out = [(r, b.name) for b in self.blocks for r in ("A", "count", "G")]
        out += [("diag", n) for n in self.fallback]
        if self.basis is not None:
            out += [("S", b.name) for b in self.blocks]
        return out

    def add(self, be, model, params, inputs, cts, capture, m, shape, names, shapes, chunk_size) -> None:
        """Add one batch: ``cts`` are its cotangent stacks (V, *logits.shape)."""
        planned = self.blocks is None
        new = self.terms(be, model, params, inputs, cts, capture, m, shape, names, shapes, chunk_size)
        if planned:
            warn_fallback(self.fallback, stacklevel=5)
        self.parts = new if self.parts is None else [a + t for a, t in zip(self.parts, new)]

    def terms(self, be, model, params, inputs, cts, capture, m, shape, names, shapes, chunk_size) -> list:
        """One batch's terms, in the order of :attr:`roles`: pure once the blocks and ``moments``
        are decided (at the first batch, from the captured layers and the terms' sizes), so
        that a compiled batch step can hold it."""
        probe_terms = None
        inputs_terms = None
        for ct in cts:
            layers = capture(ct) if capture is not None and capture.calls else []
            if self.blocks is None:
                self.blocks, self.fallback = plan(layers, names)
            by_name = {_leaf_key(layer): layer for layer in layers}
            missing = [b.name for b in self.blocks if _block_key(b) not in by_name]
            if missing:
                raise ValueError(f"basis: the model has no recognised layer for the blocks {missing} "
                                 "of the K-FAC estimate given as basis (another model?)")
            mine = [by_name[_block_key(b)] for b in self.blocks]
            if inputs_terms is None:
                inputs_terms = [t for b, layer in zip(self.blocks, mine)
                                for t in self._inputs(b, layer, m, shape)]
            terms = self._probe_terms(be, model, params, inputs, ct, capture, layers, mine, names, shapes,
                                      chunk_size)
            probe_terms = terms if probe_terms is None else [a + t for a, t in zip(probe_terms, terms)]
        if probe_terms is None:
            raise ValueError("batches: a batch gave no cotangents")
        if self.moments is None:
            self.moments = bool(self.decide(probe_terms))
        if self.moments:
            probe_terms = [probe_moments(t) for t in probe_terms]
        nb = len(self.blocks)
        gs, rest = probe_terms[:nb], probe_terms[nb:]
        new = []
        for i in range(nb):
            new += [inputs_terms[2 * i], inputs_terms[2 * i + 1], gs[i]]
        return new + rest

    # -- per batch ----------------------------------------------------------------------------

    def _inputs(self, block, layer, m, shape):
        """(Σ x̃ x̃ᵀ, count) of one block for this batch; the output mask weighs the positions."""
        xp = array_namespace(layer.g)
        w = _position_weights(m, shape, layer.x.shape[0], layer.x.shape[1], xp=xp)
        if block.kind == "embedding":
            return kronecker.embedding_input_factor(layer.x, block.inputs, padding=block.padding, weights=w,
                                                    dtype=_dtype(layer.g, xp))
        x = layer.x if "weight" in block.leaves else layer.x[..., :0]  # the bias column is appended there
        return kronecker.input_factor(x, setting=self.setting, weights=w, bias="bias" in block.leaves)

    def _probe_terms(self, be, model, params, inputs, ct, capture, layers, mine, names, shapes, chunk_size):
        """G (and EK-FAC's S) per block, then the fallback leaves' diagonals, for one stack."""
        summed = self.summed
        out = [kronecker.gradient_factor(layer.g[..., None, :], setting="expand", sum_probes=summed)
               if b.kind == "embedding" else  # (V, N, S, D): one group
               kronecker.gradient_factor(layer.g, setting=self.setting, sum_probes=summed)
               for b, layer in zip(self.blocks, mine)]
        out += self._fallback_diag(be, model, params, inputs, ct, capture, layers, names, shapes, chunk_size)
        if self.basis is not None:
            out += [self._refit(b, layer, Q) for b, layer, Q in zip(self.blocks, mine, self.basis)]
        return out

    def _fallback_diag(self, be, model, params, inputs, ct, capture, layers, names, shapes, chunk_size):
        if not self.fallback:
            return []
        xp = array_namespace(ct)
        V = 1 if self.summed else ct.shape[0]
        got: dict[str, Array] = {}
        covered = {n for b in self.blocks for n in b.leaves.values()}
        for layer in layers:
            if any(n in covered for n in layer.leaves.values()):
                continue
            for role, a in core_layers.diag(layer, sum_probes=self.summed).items():
                got[layer.leaves[role]] = a
        rest = [n for n in self.fallback if n not in got and (capture is None or n in _uncovered(capture, names))]
        if rest and not self.summed:
            # Random probes: the batch's pulled-back probe, squared (fisher()'s default Hutchinson
            # diagonal), from one more forward and backward of the whole model; no per-example
            # vmap, which models with data-dependent control flow (HuggingFace masks) refuse.
            _, vjp = be.linearize(model, params, inputs)
            pulled = dict(be.leaves(vjp(ct)))
            for n in rest:
                g = widen(pulled[n], xp=xp)
                got[n] = g * g
        elif rest:
            P = sum(math.prod(s) for s in shapes)
            generic = _products._generic(be, model, params, inputs, ct, "diag", None, P, self.summed, chunk_size)
            for n in rest:
                got[n] = generic[names.index(n)]
        dtype = _dtype(ct, xp)
        return [got[n] if n in got else xp.zeros((V, *shapes[names.index(n)]), dtype=dtype,
                                                 device=device(ct))
                for n in self.fallback]

    def _refit(self, block, layer, Q):
        """Σ_n (Q_Gᵀ ∇W_n Q_A)² per probe (V | 1, G, O, Ĩ): the diagonal in the eigenbasis."""
        xp = array_namespace(layer.g)
        QA, QG = Q
        g = layer.g
        g = xp.matmul(g[..., None, :], QG[None, None, None, ...])[..., 0, :] if block.kind == "dense" else \
            xp.matmul(g, QG[0])
        if block.kind == "embedding":
            rot = core_layers.Layer("embedding", {"weight": "w"}, {"weight": (block.inputs, block.out)}, layer.x, g,
                                    num=block.inputs, padding=block.padding, add_rows=layer.add_rows)
            d = core_layers.diag(rot, sum_probes=self.summed)["weight"]  # (V, num, D)
            return xp.matrix_transpose(d)[:, None, ...]
        x = kronecker.refit_inputs(_inputs_with_bias(block, layer.x, xp=xp), QA)
        G, O, I = block.groups, block.out, block.inputs
        rot = core_layers.Layer("dense", {"weight": "w"}, {"weight": (G * O, I)}, x, g)
        d = core_layers.diag(rot, sum_probes=self.summed)["weight"]
        return xp.reshape(d, (d.shape[0], G, O, I))


# --------------------------------------------------------------------------- helpers


def _leaf_key(layer) -> tuple:
    return tuple(sorted(layer.leaves.items()))


def _block_key(block: KroneckerBlock) -> tuple:
    return tuple(sorted(block.leaves.items()))


def _uncovered(capture, names) -> set:
    return set(getattr(capture, "uncovered", names))


def _inputs_with_bias(block: KroneckerBlock, x, *, xp):
    """x̃ (N, S, G, Ĩ): the inputs (if the weight is tracked) with the bias column (if it is)."""
    x = x if "weight" in block.leaves else x[..., :0]
    return kronecker.with_bias(x) if "bias" in block.leaves else x


def _position_weights(m, shape, N, S, *, xp):
    """(N, S) weights of a layer's positions from the outputs' mask m (N·T,), when they align."""
    if m is None:
        return None
    T = math.prod(shape[1:-1])
    if T == 1:
        return xp.broadcast_to(xp.reshape(m, (N, 1)), (N, S))
    if T == S:
        return xp.reshape(m, (N, S))
    return None


def _dtype(like, xp):
    return xp.float32 if like.dtype in (xp.float16, xp.bfloat16) else like.dtype
