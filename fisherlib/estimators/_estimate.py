"""FisherEstimate: a Fisher estimate with its error bar, mergeable, saved without pickle."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from ..core._compat import array_namespace, device, is_eager
from ._sketch import Sketch

Array = Any

__all__ = ["FisherEstimate"]

_META = ("method", "structure", "likelihood", "bound", "rank", "reduction", "n_inputs", "n_probes",
         "per_example", "dist", "stderr_kind", "seed", "n_outputs", "moments")


@dataclass
class FisherEstimate:
    """An estimate of the Fisher F (or of a bound on it) over a set of inputs.

    The state is a list of named per-probe partial sums ``parts`` (each of shape (K, ...), one
    slice per probe), so that two estimates over disjoint data merge by addition and the spread
    over probes gives the standard error. With ``moments=True`` (``fisher(keep_probes=False)``,
    the default when K per-probe sums would be large) each part is (2, ...) instead: the sum
    over batches of the batch's probe mean, and of its estimated variance s_b²/K (the probes
    are independent across batches, so these add up to an unbiased variance of the total);
    2·P numbers instead of K·P, merged by addition as well.

    Attributes
    ----------
    value
        "diag": a tree shaped like ``params`` (a ``{name: array}`` dict after :meth:`load`);
        "blocks": ``{block name: (..., size, size) array}``; "trace": a scalar array;
        "sketch": a :class:`Sketch` with ``matvec``, ``trace`` and ``to_dense``.
    stderr
        Same layout as ``value`` (not for "sketch"). ``stderr_kind`` says what it is:
        "probes" (the spread of K >= 2 probes), "bound" (K = 1 Hutchinson: std <= √2·value,
        and √(F̂_ii F̂_jj + F̂_ij²) off the diagonal of a block, theory.md §5.2), "exact" (0: no randomness), or "unavailable" (K = 1 Monte-Carlo,
        whose coefficient of variation is unbounded).
    draws
        What the estimate rests on: ``(seed, start, stop)`` triples, one per run of global
        batches [start, stop) drawn with ``seed`` (None for deterministic methods, which record
        their batches only when told where they lie: ``fisher(first_batch=...)``). ``merge``
        refuses to count a batch with the same seed twice. An estimate built without it counts
        as drawing every batch with its ``seed``.
    n_inputs, n_outputs
        The inputs the estimate sums over, and the output distributions counted: one per input
        for (N, C) logits; the unmasked positions for sequence logits (N, T, C)
        (``docs/huggingface-and-sequences.md``). ``reduction="mean"`` divides by ``n_inputs``.

    Notes
    -----
    An estimate pickles (``pickle``, ``torch.save``) with its arrays as they are; the function
    that shapes a "diag" value like the model's parameter tree is left behind (it holds the
    backend and the parameters), so after unpickling, as after :meth:`load`, ``value`` is a
    ``{name: array}`` dict with the leaves' dotted names.
    """

    names: list[str]
    parts: list[Array]
    method: str
    structure: str
    likelihood: str
    bound: str | None
    rank: int
    reduction: str
    n_inputs: int
    n_probes: int
    per_example: bool
    dist: str
    stderr_kind: str
    seed: int | None = None
    block_shapes: dict = field(default_factory=dict)
    _tree: Callable | None = field(default=None, repr=False, compare=False)
    draws: tuple = ()
    n_outputs: int | None = None
    moments: bool = False
    _compile: Callable | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not self.draws and self.seed is not None and self.stderr_kind != "exact":
            self.draws = ((self.seed, 0, _EVERY_BATCH),)  # unknown batches: assume all of them
        self.draws = tuple(tuple(t) for t in self.draws)

    # ------------------------------------------------------------------ reading
    @property
    def value(self):
        return self._present(self._read("value"))

    @property
    def stderr(self):
        if self.structure == "sketch":
            return None
        return self._present(self._read("stderr"))

    def _scale(self) -> float:
        return 1.0 / self.n_inputs if self.reduction == "mean" and self.n_inputs else 1.0

    def _read(self, what: str) -> list:
        """Every part's value or standard error; one compiled call where the backend that made
        the estimate offers ``compile`` (JAX compiles each eager operation anew per shape: two
        per leaf here, 10-30 ms each on a first read, a quarter of a small model's first call)."""
        fn = _mean if what == "value" else _stderr
        how = (self.moments, self.structure, self.stderr_kind)
        if (self._compile is None or self.structure == "sketch" or not self.parts
                or not all(is_eager(x) for x in self.parts)):
            return [fn(x, self._scale(), *how) for x in self.parts]
        # The scale is an argument, not a constant: estimates over other input counts share the program.
        read = self._compile(lambda parts, scale: [fn(x, scale, *how) for x in parts],
                             key=("FisherEstimate." + what, how))
        return read(self.parts, self._scale())

    def _present(self, arrays):
        if self.structure == "sketch":
            return Sketch(dict(zip(self.names, arrays)), scale=self._scale())
        if self.structure == "trace":
            return arrays[0]
        if self.structure == "diag" and self._tree is not None:
            return self._tree(arrays)
        return dict(zip(self.names, arrays))

    def first_probes(self, k: int) -> FisherEstimate:
        """The estimate that the first ``k`` of the K probes alone would have given.

        Probes are independent and identically distributed, so this is an estimate with the
        distribution of ``fisher(..., probes=k)``, for free (the draws themselves may differ,
        since frameworks' generators depend on the requested shape). Use it to see how the
        error falls with K.
        """
        if self.stderr_kind == "exact":
            raise ValueError(f"k: a {self.method!r} estimate has no probes to take")
        if self.moments:
            raise ValueError("k: this estimate kept running moments, not its probes one by one; "
                             "run fisher(..., keep_probes=True) to take the first k")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_probes:
            raise ValueError(f"k: expected an integer in 1..{self.n_probes}, got {k!r}")
        return replace(self, parts=[x[:k, ...] for x in self.parts], n_probes=k,
                       stderr_kind=stderr_kind(self.method, k))

    # ------------------------------------------------------------------ merging
    def merge(self, other: FisherEstimate) -> FisherEstimate:
        """The estimate over the union of both estimates' (disjoint) inputs."""
        if not isinstance(other, FisherEstimate):
            raise TypeError(f"other: expected a FisherEstimate, got {type(other).__name__}")
        for key in ("method", "structure", "likelihood", "bound", "rank", "reduction", "n_probes",
                    "per_example", "dist", "names", "moments"):
            if getattr(self, key) != getattr(other, key):
                raise ValueError(
                    f"other: cannot merge estimates with different {key} "
                    f"({getattr(self, key)!r} and {getattr(other, key)!r})"
                )
        draws = _join_draws(self.draws, other.draws)
        parts = [a + _like(b, a) for a, b in zip(self.parts, other.parts)]
        n_outputs = (self.n_outputs + other.n_outputs
                     if self.n_outputs is not None and other.n_outputs is not None else None)
        return replace(self, parts=parts, n_inputs=self.n_inputs + other.n_inputs,
                       _tree=self._tree or other._tree, draws=draws, n_outputs=n_outputs)

    __add__ = merge

    # ------------------------------------------------------------------ I/O
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tree"] = None  # a closure over the backend and the parameters (see Notes)
        state["_compile"] = None  # the backend's, with its caches
        return state

    def to_numpy(self) -> FisherEstimate:
        """A copy whose arrays are NumPy arrays (values become ``{name: array}`` dicts)."""
        return replace(self, parts=[_to_numpy(x) for x in self.parts], _tree=None, _compile=None)

    def save(self, path) -> None:
        """Write to ``.npz`` (arrays plus JSON metadata; no pickle), or to safetensors.

        Like ``numpy.savez``, a path without the ``.npz`` suffix gets it: ``save("f")`` writes
        ``f.npz``, which ``load("f")`` and ``load("f.npz")`` both read. A path ending in
        ``.safetensors`` writes that format instead (tensors named as the parameters, the
        provenance in the header: :mod:`fisherlib.integrations.safetensors`; needs the
        ``safetensors`` package).
        """
        if _is_safetensors(path):
            from ..integrations import safetensors as _st

            return _st.save(self, path)
        meta = {k: getattr(self, k) for k in _META}
        meta["names"] = self.names
        meta["block_shapes"] = self.block_shapes
        meta["draws"] = [list(t) for t in self.draws]
        arrays = {f"part{i}": _to_numpy(x) for i, x in enumerate(self.parts)}
        np.savez(path, __meta__=np.asarray(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path, *, model=None) -> FisherEstimate:
        """Read an estimate written by :meth:`save` (NumPy arrays); ``path`` with or without ``.npz``.

        A ``.safetensors`` path reads that format. With ``model`` (a torch module or parameter
        tree), a diagonal estimate whose leaf names or shapes differ from the model's parameters
        is a ``ValueError`` that lists the differences.
        """
        if _is_safetensors(path):
            from ..integrations import safetensors as _st

            return _st.load(path, model=model)
        if model is not None:
            from ..integrations import safetensors as _st

            est = cls.load(path)
            _st.check_against(est, model)
            return est
        path = _npz_path(path)
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["__meta__"]))
            parts = [f[f"part{i}"] for i in range(len(meta["names"]))]
        names = meta.pop("names")
        meta["block_shapes"] = {k: tuple(v) for k, v in meta["block_shapes"].items()}  # JSON lists
        return cls(names=names, parts=parts, **meta)



def _is_safetensors(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(".safetensors")


def _npz_path(path):
    """``path``, or ``path + ".npz"`` where only that exists (what ``numpy.savez`` wrote)."""
    if isinstance(path, (str, os.PathLike)):
        p = os.fspath(path)
        if not os.path.exists(p) and not p.endswith(".npz") and os.path.exists(p + ".npz"):
            return p + ".npz"
    return path


# Methods that draw nothing at random: their estimate is a deterministic sum over inputs.
DETERMINISTIC = ("exact", "empirical")


def stderr_kind(method: str, probes: int) -> str:
    """What the standard error of ``method`` with ``probes`` probes rests on (see the class)."""
    if method in DETERMINISTIC:
        return "exact"
    if probes >= 2:
        return "probes"
    return "bound" if method == "hutchinson" else "unavailable"


def _mean(x, scale, moments: bool, structure: str, kind: str):
    """A part's estimate: its probe mean (or kept sum of means), times the reduction's scale."""
    xp = array_namespace(x)
    if moments:
        return x[0, ...] * scale
    return xp.mean(x, axis=0) * scale if structure != "sketch" else x


def _stderr(x, scale, moments: bool, structure: str, kind: str):
    """A part's standard error, of the kind ``kind`` (see :class:`FisherEstimate`)."""
    xp = array_namespace(x)
    K = x.shape[0]
    if kind == "probes":
        if moments:
            return xp.sqrt(xp.clip(x[1, ...], min=0.0)) * scale
        return xp.std(x, axis=0, correction=1) / math.sqrt(K) * scale
    if kind == "bound":
        return _bound_stderr(_mean(x, scale, moments, structure, kind), blocks=structure == "blocks", xp=xp)
    fill = 0.0 if kind == "exact" else math.nan
    return xp.full(x.shape[1:], fill, dtype=x.dtype, device=device(x))


def _bound_stderr(m, *, blocks: bool, xp):
    """The K = 1 Hutchinson error bar from the estimate ``m`` itself (theory.md §5.2).

    Diagonal entries: std(F̂_ii) <= √2 F_ii. Off-diagonal entries of a block: std(F̂_ij) <=
    √(F_ii F_jj + F_ij²), with the block's own diagonal estimates plugged in; √2·|F̂_ij| would
    be far too small where F_ij is small against √(F_ii F_jj). On the diagonal both agree.
    """
    if not blocks:
        return math.sqrt(2.0) * xp.abs(m)
    eye = xp.eye(m.shape[-1], dtype=m.dtype, device=device(m))
    d = xp.abs(xp.sum(m * eye, axis=-1))  # (..., S): the block's diagonal
    return xp.sqrt(d[..., :, None] * d[..., None, :] + m * m)


_EVERY_BATCH = 2**62  # stop of the range recorded when the batches are unknown


def _join_draws(a: tuple, b: tuple) -> tuple:
    """The union of two draw records; ValueError where they share a (seed, batch).

    Each record is disjoint in itself, so any overlap in the sorted union is between the two:
    one sweep, O(n log n) in the number of ranges (strided shards have one per batch).
    """
    out: list[tuple] = []
    for t in sorted(a + b, key=lambda t: (t[0] is None, t[0] or 0, t[1])):
        seed, start, stop = t
        if out and out[-1][0] == seed and start < out[-1][2]:
            lo, hi = start, min(stop, out[-1][2]) - 1
            what = "batches" if seed is None else f"draws of seed={seed} for batches"
            span = "every batch" if hi >= _EVERY_BATCH - 1 else f"{lo}..{hi}"
            raise ValueError(
                f"other: both estimates count the {what} {span}, so the merge would count them "
                "twice; give each part of the data its own seed or its own first_batch")
        if out and out[-1][0] == seed and out[-1][2] == start:
            out[-1] = (seed, out[-1][1], stop)
        else:
            out.append((seed, start, stop))
    return tuple(out)


def _to_numpy(x):
    if type(x).__module__.startswith("numpy"):
        return x
    if hasattr(x, "detach"):  # torch: leave the autograd graph and the device behind
        x = x.detach().cpu()
    if hasattr(x, "get"):  # cupy
        return x.get()
    return np.asarray(x)


def _like(x, ref):
    """``x`` in the namespace and on the device of ``ref`` (a no-op when they already agree)."""
    if type(x) is type(ref):
        return x
    xp = array_namespace(ref)
    return xp.asarray(_to_numpy(x), device=device(ref))


def probe_moments(contrib: Array) -> Array:
    """A batch's per-probe contributions (K, ...) as (2, ...): their mean and its variance s²/K."""
    xp = array_namespace(contrib)
    K = contrib.shape[0]
    mean = xp.mean(contrib, axis=0)
    ss = xp.zeros_like(mean)
    for k in range(K if K >= 2 else 0):  # one probe at a time: no second (K, ...) temporary
        d = contrib[k, ...] - mean
        ss = ss + d * d
    return xp.stack([mean, ss / (K * (K - 1)) if K >= 2 else ss])
