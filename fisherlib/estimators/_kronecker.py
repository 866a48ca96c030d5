"""KroneckerEstimate: K-FAC / EK-FAC factors of the Fisher with error bars, products and I/O."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from ..core import kronecker
from ..core._compat import array_namespace, device
from ._estimate import _bound_stderr, _is_safetensors, _join_draws, _like, _npz_path, _to_numpy
from ._kfac import KroneckerBlock

Array = Any

__all__ = ["KroneckerEstimate"]

_META = ("method", "structure", "setting", "likelihood", "reduction", "n_inputs", "n_probes", "dist",
         "stderr_kind", "seed", "n_outputs", "moments")


@dataclass
class KroneckerEstimate:
    r"""A Kronecker-factored (K-FAC or EK-FAC) estimate of the Fisher, per layer.

    Each recognised dense, convolution or embedding layer ("block") holds F_W ≈ A ⊗ G with
    A = (1/M) Σ x̃ x̃ᵀ its inputs' second moment (the bias as a last input that is always 1) and
    G = Σ g gᵀ its output cotangents' (see :mod:`fisherlib.core.kronecker`); EK-FAC keeps the
    eigenbases Q_A, Q_G and replaces the eigenvalues by the re-fitted diagonal S. Every other
    leaf (:attr:`fallback`) keeps its diagonal. Blocks are independent: F̂ is block-diagonal.

    Attributes
    ----------
    factors : dict
        ``{block: {"A": (G, Ĩ, Ĩ) or (1, num), "G": (G, O, O)}}``, plus ``"S"`` (G, O, Ĩ) for
        EK-FAC; ``G`` and ``S`` divided by ``n_inputs`` under ``reduction="mean"``.
    factor_stderr : dict
        The standard error of each factor (A: 0, it has no randomness), by ``stderr_kind`` as
        for :class:`FisherEstimate`: the spread of K >= 2 probes, or for K = 1 Hutchinson the
        bound std(Ĝ_ij) <= √(G_ii G_jj + G_ij²) with the estimates plugged in.
    value, stderr
        The diagonal of F̂ for every leaf (a tree shaped like the parameters where the backend
        gave one, else ``{name: array}``), and the standard error of the fallback leaves'.
    blocks, fallback
        The :class:`KroneckerBlock` records, and the names of the diagonal leaves.

    Notes
    -----
    Products treat a tangent as a tree shaped like the parameters, a ``{leaf name: array}``
    dict, or a flat (P,) / (K, P) array in the leaves' order (:meth:`matmat`). Cost per product:
    per block two matrix products of its (O × Ĩ) tangent with the factors; a solve first
    eigendecomposes each factor once (cached), O(O³ + Ĩ³).
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    blocks: list[KroneckerBlock]
    fallback: list[str]
    parts: list[Array]
    method: str
    structure: str
    setting: str
    likelihood: str
    reduction: str
    n_inputs: int
    n_probes: int
    dist: str
    stderr_kind: str
    seed: int | None = None
    draws: tuple = ()
    n_outputs: int | None = None
    moments: bool = False
    basis: list | None = None  # EK-FAC: per block [Q_A or None, Q_G]
    _tree: Callable | None = field(default=None, repr=False, compare=False)
    _leaves_of: Callable | None = field(default=None, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.draws = tuple(tuple(t) for t in self.draws)

    # ------------------------------------------------------------------ reading
    def _part(self, role: str, name: str) -> Array:
        return self.parts[self._index()[(role, name)]]

    def _index(self) -> dict:
        if "index" not in self._cache:
            roles = [(r, b.name) for b in self.blocks for r in ("A", "count", "G")]
            roles += [("diag", n) for n in self.fallback]
            if self.structure == "ekfac":
                roles += [("S", b.name) for b in self.blocks]
            self._cache["index"] = {r: i for i, r in enumerate(roles)}
        return self._cache["index"]

    def _scale(self) -> float:
        return 1.0 / self.n_inputs if self.reduction == "mean" and self.n_inputs else 1.0

    def _mean(self, x: Array) -> Array:
        xp = array_namespace(x)
        return (x[0, ...] if self.moments else xp.mean(x, axis=0)) * self._scale()

    def _stderr(self, x: Array, *, square: bool) -> Array:
        xp = array_namespace(x)
        if self.stderr_kind == "probes":
            if self.moments:
                return xp.sqrt(xp.clip(x[1, ...], min=0.0)) * self._scale()
            return xp.std(x, axis=0, correction=1) / math.sqrt(x.shape[0]) * self._scale()
        if self.stderr_kind == "bound":
            return _bound_stderr(self._mean(x), blocks=square, xp=xp)
        fill = 0.0 if self.stderr_kind == "exact" else math.nan
        return xp.full(x.shape[1:], fill, dtype=x.dtype, device=device(x))

    @property
    def factors(self) -> dict[str, dict[str, Array]]:
        out = {}
        for b in self.blocks:
            f = {"A": self._part("A", b.name) / self._part("count", b.name)[0],
                 "G": self._mean(self._part("G", b.name))}
            if self.structure == "ekfac":
                f["S"] = self._mean(self._part("S", b.name))
            out[b.name] = f
        return out

    @property
    def factor_stderr(self) -> dict[str, dict[str, Array]]:
        out = {}
        for b in self.blocks:
            A = self._part("A", b.name)
            f = {"A": A * 0, "G": self._stderr(self._part("G", b.name), square=True)}
            if self.structure == "ekfac":
                f["S"] = self._stderr(self._part("S", b.name), square=False)
            out[b.name] = f
        return out

    def _diagonals(self) -> dict[str, Array]:
        diag = {}
        for b in self.blocks:
            f = self.factors[b.name]
            if self.structure == "ekfac":
                QA, QG = self._basis(b)
                d = _rotated_diagonal(f["S"], QA, QG)
            else:
                d = kronecker.kron_diagonal(f["A"], f["G"])
            diag.update(_from_core(b, d))
        diag.update(self._fallback_values())
        return diag

    @property
    def value(self):
        """The diagonal of F̂ for every leaf (Kronecker blocks' and fallback leaves')."""
        diag = self._diagonals()
        return self._present([diag[n] for n in self.names])

    @property
    def stderr(self):
        """Standard errors of :attr:`value` on the fallback leaves (see :attr:`factor_stderr`)."""
        return {n: self._stderr(self._part("diag", n), square=False) for n in self.fallback}

    def _present(self, arrays):
        return self._tree(arrays) if self._tree is not None else dict(zip(self.names, arrays))

    # ------------------------------------------------------------------ products
    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_params, self.n_params)

    def flatten(self, v: Any) -> Array:
        """A tangent (dict by leaf name, a tree like the parameters, or flat) as (P,) or (K, P)."""
        leaves = self._tangent_leaves(v)
        if leaves is None:
            return v
        xp = array_namespace(*leaves)
        lead = tuple(leaves[0].shape[:leaves[0].ndim - len(self.shapes[0])])
        return xp.concat([xp.reshape(x, (*lead, -1)) for x in leaves], axis=-1)

    def unflatten(self, flat: Array) -> dict[str, Array]:
        """(P,) or (K, P) to ``{leaf name: array}`` (leaves with the leading K)."""
        xp = array_namespace(flat)
        lead, out, at = tuple(flat.shape[:-1]), {}, 0
        for n, s in zip(self.names, self.shapes):
            size = math.prod(s)
            out[n] = xp.reshape(flat[..., at:at + size], (*lead, *s))
            at += size
        return out

    def _tangent_leaves(self, v: Any) -> list | None:
        if isinstance(v, Mapping) and all(n in v for n in self.names):
            return [v[n] for n in self.names]
        if hasattr(v, "shape") and hasattr(v, "ndim"):
            if v.ndim not in (1, 2) or v.shape[-1] != self.n_params:
                raise ValueError(f"v: expected a flat tangent (P,) or (K, P) with P = {self.n_params}, "
                                 f"got shape {tuple(v.shape)}")
            return None
        if self._leaves_of is not None:  # a tree shaped like the parameters
            leaves = self._leaves_of(v)
            if [tuple(x.shape[x.ndim - len(s):]) for x, s in zip(leaves, self.shapes)] == self.shapes \
                    and len(leaves) == len(self.shapes):
                return leaves
        raise ValueError(f"v: expected a tangent shaped like the parameters, a dict of every leaf "
                         f"({', '.join(self.names[:3])}, ...) or a flat (P,) / (K, P) array, got {type(v).__name__}")

    def _apply(self, v: Any, block_fn: Callable, leaf_fn: Callable) -> Any:
        """Apply ``block_fn`` to every block's tangent in core layout and ``leaf_fn`` to the
        fallback leaves; the result is shaped like ``v`` (a dict, a tree, or flat)."""
        leaves = self._tangent_leaves(v)
        parts = self.unflatten(v) if leaves is None else dict(zip(self.names, leaves))
        xp = array_namespace(*parts.values())
        dtype = self._dtype()

        def cast(a):
            return a if a.dtype == dtype else xp.astype(a, dtype)

        out = {}
        for b in self.blocks:
            out.update(_from_core(b, block_fn(b, cast(_to_core(b, parts, xp=xp)))))
        for n in self.fallback:
            out[n] = leaf_fn(n, cast(parts[n]))
        if leaves is None:
            return self.flatten(out)
        if isinstance(v, Mapping) and all(n in v for n in self.names):
            return out
        return self._tree([out[n] for n in self.names]) if self._tree is not None else out

    def _dtype(self):
        return self.parts[0].dtype

    def matvec(self, v: Any) -> Any:
        """F̂ v, shaped like ``v``."""
        fs = self.factors

        def block(b, M):
            if self.structure == "ekfac":
                QA, QG = self._basis(b)
                return kronecker.ekfac_matvec(QA, QG, fs[b.name]["S"], M)
            return kronecker.kron_matvec(fs[b.name]["A"], fs[b.name]["G"], M)

        diag = self._fallback_values()
        return self._apply(v, block, lambda n, x: diag[n] * x)

    __call__ = matvec

    def matmat(self, V: Array) -> Array:
        """F̂ vᵢ for every row of a flat ``V`` (K, P) or (P,): what :func:`fisherlib.spectral.top_eigenpairs` takes."""
        return self.matvec(V)

    def solve(self, v: Any, damping: float, *, split: bool = False) -> Any:
        """(F̂ + λI)⁻¹ v by the factors' eigendecompositions; ``split``: Martens & Grosse's π-split damping.

        With ``split`` (K-FAC only) each block is (A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹, what K-FAC
        optimizers apply; without it, the exact inverse of the damped Kronecker product.
        """
        damping = _damping(damping)
        if split and self.structure == "ekfac":
            raise ValueError("split: π-split damping is for K-FAC's two factors; EK-FAC's diagonal takes λ directly")

        def block(b, M):
            return kronecker.basis_solve(*self._damped(b, damping, split), M)

        diag = self._fallback_values()
        return self._apply(v, block, lambda n, x: x / (diag[n] + damping))

    def _damped(self, b: KroneckerBlock, damping: float, split: bool):
        """(Q_A, Q_G, eigenvalues of the damped block), cached per λ: a step only rotates and divides."""
        key = ("damped", b.name, damping, split)
        if key not in self._cache:
            if self.structure == "ekfac":
                QA, QG = self._basis(b)
                e = self._mean(self._part("S", b.name)) + damping
            else:
                (lamA, QA), (lamG, QG) = self._eig(b)
                e = kronecker.damped_eigenvalues(lamA, lamG, damping, split=split)
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "damped" or k[2:] == (damping, split)}
            self._cache[key] = (QA, QG, e)
        return self._cache[key]

    def logdet(self, damping: float) -> float:
        """log det(F̂ + λI): Σ log(λ_G,i λ_A,j + λ) per K-FAC block, Σ log(s + λ) for EK-FAC."""
        damping = _damping(damping)
        total = 0.0
        for b in self.blocks:
            if self.structure == "ekfac":
                e = self.factors[b.name]["S"]
            else:
                (lamA, _), (lamG, _) = self._eig(b)
                e = lamG[:, :, None] * lamA[:, None, :]
            total += float(kronecker.logdet(e, damping))
        for d in self._fallback_values().values():
            total += float(kronecker.logdet(d, damping))
        return total

    def trace(self) -> float:
        """tr F̂: the sum of :attr:`value`."""
        return sum(float(array_namespace(d).sum(d)) for d in self._diagonals().values())

    def to_dense(self) -> Array:
        """The dense P × P matrix of F̂ in the leaves' order (for small models and tests)."""
        like = self.parts[0]
        xp = array_namespace(like)
        eye = xp.eye(self.n_params, dtype=self._dtype(), device=device(like))
        return self.matmat(eye)

    def _fallback_values(self) -> dict:
        return {n: self._mean(self._part("diag", n)) for n in self.fallback}

    def _eig(self, b: KroneckerBlock):
        key = ("eig", b.name)
        if key not in self._cache:
            f = self.factors[b.name]
            self._cache[key] = (kronecker.eigh(f["A"]), kronecker.eigh(f["G"]))
        return self._cache[key]

    def _basis(self, b: KroneckerBlock):
        i = [x.name for x in self.blocks].index(b.name)
        return self.basis[i][0], self.basis[i][1]

    # ------------------------------------------------------------------ merging and I/O
    def merge(self, other: KroneckerEstimate) -> KroneckerEstimate:
        """The estimate over the union of both estimates' (disjoint) inputs: sums and counts add."""
        if not isinstance(other, KroneckerEstimate):
            raise TypeError(f"other: expected a KroneckerEstimate, got {type(other).__name__}")
        for key in ("method", "structure", "setting", "likelihood", "reduction", "n_probes", "dist", "names",
                    "fallback", "moments"):
            if getattr(self, key) != getattr(other, key):
                raise ValueError(f"other: cannot merge estimates with different {key} "
                                 f"({getattr(self, key)!r} and {getattr(other, key)!r})")
        if [b.to_dict() for b in self.blocks] != [b.to_dict() for b in other.blocks]:
            raise ValueError("other: cannot merge estimates of different Kronecker blocks")
        if self.basis is not None and not all(
                np.array_equal(_to_numpy(a), _to_numpy(b)) for qa, qb in zip(self.basis, other.basis)
                for a, b in zip(qa, qb) if a is not None):
            raise ValueError("other: EK-FAC estimates re-fitted in different eigenbases do not add up; "
                             "run both with fisher(..., structure='ekfac', basis=<one K-FAC estimate>)")
        parts = [a + _like(b, a) for a, b in zip(self.parts, other.parts)]
        n_outputs = (self.n_outputs + other.n_outputs
                     if self.n_outputs is not None and other.n_outputs is not None else None)
        return replace(self, parts=parts, n_inputs=self.n_inputs + other.n_inputs,
                       draws=_join_draws(self.draws, other.draws), n_outputs=n_outputs,
                       _tree=self._tree or other._tree)

    __add__ = merge

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tree"] = None
        state["_cache"] = {}
        state["_leaves_of"] = None
        return state

    def to_numpy(self) -> KroneckerEstimate:
        basis = None if self.basis is None else [[None if q is None else _to_numpy(q) for q in p] for p in self.basis]
        return replace(self, parts=[_to_numpy(x) for x in self.parts], basis=basis, _tree=None, _leaves_of=None)

    def save(self, path, *, parts: bool = False) -> None:
        """Write to ``.npz`` (arrays plus JSON metadata; no pickle), as :meth:`FisherEstimate.save`.

        A path ending in ``.safetensors`` writes that format (``kron/<layer>/A``, ``kron/<layer>/G``
        and their errors, the fallback leaves' diagonals, the provenance in the header:
        :mod:`fisherlib.integrations.safetensors`); ``parts`` there also writes the per-probe sums.
        """
        if _is_safetensors(path):
            from ..integrations import safetensors as _st

            return _st.save(self, path, parts=parts)
        meta = {k: getattr(self, k) for k in _META}
        meta.update(kind="kronecker", names=self.names, shapes=[list(s) for s in self.shapes],
                    blocks=[b.to_dict() for b in self.blocks], fallback=self.fallback,
                    draws=[list(t) for t in self.draws], n_parts=len(self.parts))
        arrays = {f"part{i}": _to_numpy(x) for i, x in enumerate(self.parts)}
        for i, pair in enumerate(self.basis or []):
            for j, q in enumerate(pair):
                if q is not None:
                    arrays[f"basis{i}_{j}"] = _to_numpy(q)
        np.savez(path, __meta__=np.asarray(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path, *, model=None) -> KroneckerEstimate:
        """Read an estimate written by :meth:`save` (NumPy arrays); ``.npz`` or ``.safetensors``.

        With ``model`` (a torch module or parameter tree), leaf names or shapes that differ from
        the model's parameters are a ``ValueError`` that lists the differences.
        """
        if _is_safetensors(path) or model is not None:
            from ..integrations import safetensors as _st

            est = _st.load(path) if _is_safetensors(path) else cls.load(path)
            if not isinstance(est, cls):
                raise ValueError(f"path: {path!s} holds a {type(est).__name__}, not a KroneckerEstimate")
            if model is not None:
                _st.check_against(est, model)
            return est
        with np.load(_npz_path(path), allow_pickle=False) as f:
            meta = json.loads(str(f["__meta__"]))
            if meta.pop("kind", None) != "kronecker":
                raise ValueError(f"path: {path!s} holds no KroneckerEstimate (use FisherEstimate.load)")
            parts = [f[f"part{i}"] for i in range(meta.pop("n_parts"))]
            blocks = [KroneckerBlock.from_dict(b) for b in meta.pop("blocks")]
            basis = None
            if meta["structure"] == "ekfac":
                basis = [[f[k] if (k := f"basis{i}_{j}") in f else None for j in range(2)] for i in range(len(blocks))]
        shapes = [tuple(s) for s in meta.pop("shapes")]
        return cls(names=meta.pop("names"), shapes=shapes, blocks=blocks, fallback=meta.pop("fallback"),
                   parts=parts, basis=basis, **meta)


# --------------------------------------------------------------------------- layouts


def _to_core(b: KroneckerBlock, leaves: dict, *, xp) -> Array:
    """The block's leaves (with any leading K) in core layout (..., G, O, Ĩ)."""
    G, O = b.groups, b.out
    if b.kind == "embedding":
        w = leaves[b.leaves["weight"]]  # (..., num, D)
        return xp.matrix_transpose(w)[..., None, :, :]
    cols = []
    if "weight" in b.leaves:
        w = leaves[b.leaves["weight"]]
        shape = b.shapes["weight"]
        lead = tuple(w.shape[:w.ndim - len(shape)])
        I = b.inputs - int("bias" in b.leaves)
        if b.layout == "io":
            w = xp.matrix_transpose(xp.reshape(w, (*lead, I, G * O)))
        cols.append(xp.reshape(w, (*lead, G, O, I)))
    if "bias" in b.leaves:
        bias = leaves[b.leaves["bias"]]
        lead = tuple(bias.shape[:-1])
        cols.append(xp.reshape(bias, (*lead, G, O, 1)))
    return cols[0] if len(cols) == 1 else xp.concat(cols, axis=-1)


def _from_core(b: KroneckerBlock, M: Array) -> dict[str, Array]:
    """Core layout (..., G, O, Ĩ) back to the block's leaves."""
    xp = array_namespace(M)
    lead = tuple(M.shape[:-3])
    G, O = b.groups, b.out
    if b.kind == "embedding":
        return {b.leaves["weight"]: xp.matrix_transpose(M[..., 0, :, :])}
    out = {}
    I = b.inputs - int("bias" in b.leaves)
    if "weight" in b.leaves:
        w = xp.reshape(M[..., :I], (*lead, G * O, I))
        if b.layout == "io":
            w = xp.matrix_transpose(w)
        out[b.leaves["weight"]] = xp.reshape(w, (*lead, *b.shapes["weight"]))
    if "bias" in b.leaves:
        out[b.leaves["bias"]] = xp.reshape(M[..., I:], (*lead, *b.shapes["bias"]))
    return out


def _rotated_diagonal(S: Array, QA: Array | None, QG: Array) -> Array:
    """diag((Q_A ⊗ Q_G) diag(S) (Q_A ⊗ Q_G)ᵀ) in core layout: (Q_G∘Q_G) S (Q_A∘Q_A)ᵀ."""
    xp = array_namespace(S)
    out = xp.matmul(QG * QG, S)
    return out if QA is None else xp.matmul(out, xp.matrix_transpose(QA * QA))


def _damping(damping) -> float:
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise TypeError(f"damping: expected a number, got {type(damping).__name__}") from None
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"damping: expected a finite number >= 0, got {damping!r}")
    return value
