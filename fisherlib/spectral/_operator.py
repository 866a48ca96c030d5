"""F as a linear operator: matrix-free products F v = Σ_x J_xᵀ I(z_x) J_x v over a dataset.

Per batch: the adapter runs the model (``linearize``: logits and the VJP) and pushes the
directions forward (``jvp``: J v, the optional JVP capability); the core applies I(z) in logit
space; the VJP pulls the result back. K directions go through as one stack: one batched JVP
and one batched VJP per batch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..core import hypercube, simplex
from ..core._compat import array_namespace, device, is_eager
from ..estimators import _fisher
from ..estimators._batches import batches as read_batches
from ..estimators._batches import n_of, slice_tree
from ..estimators._compiled import warn_compile_fallback
from ..estimators._estimate import _to_numpy

Array = Any
Tree = Any

__all__ = ["FisherOperator", "fisher_operator"]

BOUNDS = (None, "upper", "lower")
# Elements of the Jacobian rows (C x inputs x parameters) the no-JVP fallback holds at once.
_ROW_ELEMENTS = 1 << 24


def fisher_operator(model: Any, params: Any, batches: Any, *, likelihood: str = "softmax",
                    bound: str | None = None, rank: int = 1, reduction: str = "sum",
                    backend: Any = None, cache: bool = False) -> "FisherOperator":
    r"""The Fisher F = Σ_x J_xᵀ I(z_x) J_x (or F_UB, F_LB) of a dataset as a linear operator.

    Parameters
    ----------
    model, params, batches, likelihood, reduction, backend
        As for :func:`fisherlib.fisher`. ``batches`` is read into a list: every product passes
        over all of it.
    bound : {None, "upper", "lower"}
        F, F_UB = Σ Jᵀ diag(p) J, or the rank-``rank`` lower envelope F_LB (softmax only).
    cache : bool
        Keep each batch's forward pass (logits and VJP residuals) between products: fewer
        forward passes, memory for the activations of the whole dataset.

    Returns
    -------
    FisherOperator

    Notes
    -----
    **Cost** per product of K directions: per batch one forward pass (none with ``cache``),
    one JVP of the K directions and one VJP of K cotangents, each batched over K where the
    framework can; memory O(K·P) beyond the network's own. Adapters without the ``jvp``
    capability (and explicit-VJP models without a ``jvp`` method) fall back to the Jacobian
    rows, C per-example VJPs per input.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherlib.models import Linear
    >>> from fisherlib.spectral import fisher_operator
    >>> model = Linear(3, 2)
    >>> params = model.init(seed=0)
    >>> op = fisher_operator(model, params, np.ones((4, 3)))
    >>> op.shape
    (8, 8)
    >>> Fv = op.matvec(params)            # F applied to a tree shaped like params
    >>> sorted(Fv)
    ['bias', 'weight']
    """
    return FisherOperator(model, params, batches, likelihood=likelihood, bound=bound, rank=rank,
                          reduction=reduction, backend=backend, cache=cache)


def _parameter_tree(be, model, params, logits, vjp):
    """``params``, or the tree a model owns (``params=None``): from the adapter's ``parameters``
    where it has one, else from the shape of one pull-back of zeros."""
    if params is not None:
        return params
    own = getattr(be, "parameters", None)
    if own is not None:
        return own(model, None)
    g = vjp(logits[None, ...] * 0)
    return be.unflatten(g, [x[0, ...] for _, x in be.leaves(g)])


class FisherOperator:
    """F (or a bound of it) on a dataset: products with trees or flat vectors, scipy and JAX views.

    Vectors are either trees shaped like the parameters (:meth:`matvec`) or flat arrays
    (:meth:`matmat`, rows of length P in the parameters' namespace, leaves concatenated in the
    adapter's leaf order). Build one with :func:`fisher_operator`.
    """

    def __init__(self, model, params, batches, *, likelihood="softmax", bound=None, rank=1,
                 reduction="sum", backend=None, cache=False):
        if likelihood not in ("softmax", "sigmoid"):
            raise ValueError(f"likelihood: expected one of ('softmax', 'sigmoid'), got {likelihood!r}")
        if bound not in BOUNDS:
            raise ValueError(f"bound: expected one of {BOUNDS}, got {bound!r}")
        if bound is not None and likelihood != "softmax":
            raise ValueError("bound: the bounds F_LB and F_UB concern the softmax simplex")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected a positive integer, got {rank!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction: expected one of ('sum', 'mean'), got {reduction!r}")
        self.model, self.params = model, params
        self.likelihood, self.bound, self.rank, self.reduction = likelihood, bound, rank, reduction
        self.batches = list(read_batches(batches))
        if not self.batches:
            raise ValueError("batches: no batch was given")
        first = self.batches[0][0]
        self.backend = _fisher._resolve_backend(backend, params if params is not None else first)
        self.cache = cache
        self._cached: dict[int, tuple] = {}
        logits, vjp = self._forward(0)
        _fisher._check_logits(logits, 0, likelihood)
        self.template = _parameter_tree(self.backend, model, params, logits, vjp)
        named = self.backend.leaves(self.template)
        self.names = [n for n, _ in named]
        self.shapes = [tuple(x.shape) for _, x in named]
        self.sizes = [math.prod(s) for s in self.shapes]
        leaf = named[0][1]
        self.xp = array_namespace(leaf)
        self.dtype = leaf.dtype
        self.device = device(leaf)
        self.n_params = sum(self.sizes)
        self.n_inputs: int | None = None  # rows of logits, counted on the first product
        self.products = 0  # F-vector products done (a stack of K counts K)
        self.passes = 0  # passes over the data
        self.on_pass: Callable[[], None] | None = None  # called after each pass (progress bars)
        self._no_jvp = getattr(self.backend, "jvp", None) is None

    # -- shapes and conversions --------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_params, self.n_params)

    def flatten(self, tree: Tree) -> Array:
        """A tree shaped like the parameters (leaves optionally with a leading K) -> (P,) or (K, P)."""
        xp = self.xp
        leaves = [x for _, x in self.backend.leaves(tree)]
        if len(leaves) != len(self.shapes):
            raise ValueError(f"tree: expected {len(self.shapes)} leaves, got {len(leaves)}")
        lead = tuple(leaves[0].shape[:len(leaves[0].shape) - len(self.shapes[0])])
        return xp.concat([xp.reshape(xp.astype(x, self.dtype), (*lead, -1)) for x in leaves], axis=-1)

    def unflatten(self, flat: Array) -> Tree:
        """(P,) or (K, P) -> a tree shaped like the parameters (leaves with the leading K)."""
        xp = self.xp
        if flat.shape[-1] != self.n_params or flat.ndim not in (1, 2):
            raise ValueError(f"flat: expected shape (P,) or (K, P) with P = {self.n_params}, got {tuple(flat.shape)}")
        lead = tuple(flat.shape[:-1])
        out, start = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(xp.reshape(flat[..., start:start + size], (*lead, *shape)))
            start += size
        return self.backend.unflatten(self.template, out)

    def asarray(self, a: Any) -> Array:
        """``a`` (NumPy or any array) in the parameters' namespace, dtype and device."""
        try:
            same = array_namespace(a) is self.xp
        except TypeError:
            same = False
        if same:
            return self.xp.astype(a, self.dtype)
        return self.xp.asarray(np.asarray(_to_numpy(a)), dtype=self.dtype, device=self.device)

    # -- products ------------------------------------------------------------------------------

    def matvec(self, v: Tree) -> Tree:
        """F v for a tree ``v`` shaped like the parameters; leaves with a leading K give K products."""
        return self.unflatten(self.matmat(self.flatten(v)))

    __call__ = matvec

    def matmat(self, V: Array) -> Array:
        """F vᵢ for every row of ``V`` (K, P) (or one vector (P,)), in one pass over the data."""
        xp = self.xp
        single = V.ndim == 1
        V = V[None, :] if single else V
        if V.ndim != 2 or V.shape[1] != self.n_params:
            raise ValueError(f"V: expected shape (K, P) or (P,) with P = {self.n_params}, got {tuple(V.shape)}")
        K = V.shape[0]
        done = self._compiled_matmat(V)
        if done is not None and not isinstance(done, Exception):
            acc, n_inputs = done
        else:
            acc, n_inputs = self._eager_matmat(V)
            warn_compile_fallback(done, "FisherOperator.matmat")
        self.n_inputs = n_inputs
        if self.reduction == "mean":
            acc = acc / n_inputs
        self.products += K
        self.passes += 1
        if self.on_pass is not None:
            self.on_pass()
        return acc[0, :] if single else acc

    def _compiled_matmat(self, V: Array):
        """(Σ_b F_b V, inputs) with each batch's product (forward, J v, kernel, pullback) one
        compiled call, where the adapter offers ``compile`` and ``jvp``; None otherwise, or when
        a batch's logits are not well formed (the eager pass then raises the error); the
        exception when the compiled call raised one (the eager pass warns if it succeeds)."""
        comp = getattr(self.backend, "compile", None)
        if comp is None or self._no_jvp or self.cache or self.params is None:
            return None
        if not is_eager(V) or not all(is_eager(x) for _, x in self.backend.leaves(self.params)[:1]):
            return None  # inside the caller's jit, which compiles the whole pass anyway
        xp = self.xp

        def product(params, inputs, V):
            logits, vjp = self.backend.linearize(self.model, params, inputs)
            C = logits.shape[-1]
            z = xp.reshape(logits, (-1, C))
            jv = self.backend.jvp(self.model, params, inputs, self.unflatten(V))
            u = self._kernel(z, xp.reshape(jv, (V.shape[0], -1, C)))
            g = self.flatten(vjp(xp.reshape(u, (V.shape[0], *logits.shape))))
            top = xp.max(z, axis=-1)
            ok = xp.all(xp.isfinite(top)) if self.likelihood == "softmax" else xp.all(xp.isfinite(z))
            return g, xp.stack([xp.astype(~ok, z.dtype), xp.asarray(z.shape[0], dtype=z.dtype)])

        key = ("spectral.product", self.backend, self.model, self.likelihood, self.bound, self.rank,
               tuple(self.names), tuple(self.shapes), str(self.dtype))
        try:
            hash(key)
            step = comp(product, key=key)
            acc, flags = None, []
            for b in range(len(self.batches)):
                g, f = step(self.params, self.batches[b][0], V)
                acc = g if acc is None else acc + g
                flags.append(f)
        except Exception as err:  # noqa: BLE001 - a model or batch the step cannot take: the eager pass decides
            return err
        flags = np.asarray(_to_numpy(xp.stack(flags)))  # one sync per pass
        if flags[:, 0].any():
            return None
        return acc, int(flags[:, 1].sum())

    def _eager_matmat(self, V: Array):
        xp = self.xp
        K = V.shape[0]
        tangents = self.unflatten(V)
        acc, n_inputs = None, 0
        for b in range(len(self.batches)):
            logits, vjp = self._forward(b)
            z, C = _fisher._check_logits(logits, b, self.likelihood)
            jv = self._jvp(b, tangents, V, logits)
            u = self._kernel(z, xp.reshape(jv, (K, -1, C)))
            g = self.flatten(vjp(xp.reshape(u, (K, *logits.shape))))
            acc = g if acc is None else acc + g
            n_inputs += z.shape[0]
        return acc, n_inputs

    def _forward(self, b: int):
        hit = self._cached.get(b)
        if hit is not None:
            return hit
        out = self.backend.linearize(self.model, self.params, self.batches[b][0])
        if self.cache:
            self._cached[b] = out
        return out

    def _kernel(self, z: Array, jv: Array) -> Array:
        """I(z) (or the bound's kernel) applied to jv (K, n, C), per input."""
        xp = self.xp
        if self.likelihood == "sigmoid":
            return hypercube.matvec(z, jv)
        if self.bound is None:
            return simplex.matvec(z, jv)
        if self.bound == "upper":
            return simplex.probs(z) * jv
        lam, vec = simplex.top_eigpair(z, k=self.rank)
        if self.rank == 1:
            lam, vec = lam[..., None], vec[..., None]
        coef = xp.matmul(jv[..., None, :], vec)[..., 0, :]  # (K, n, k): v_jᵀ (J v)
        w = vec * xp.clip(lam, min=0.0)[..., None, :]  # (n, C, k): λ_j v_j
        return xp.matmul(w, coef[..., None])[..., 0]

    def _jvp(self, b: int, tangents: Tree, V: Array, logits: Array) -> Array:
        inputs = self.batches[b][0]
        if not self._no_jvp:
            try:
                return self.backend.jvp(self.model, self.params, inputs, tangents)
            except NotImplementedError:
                self._no_jvp = True
        return self._jvp_from_rows(inputs, V, logits)

    def _jvp_from_rows(self, inputs: Array, V: Array, logits: Array) -> Array:
        """J v from the Jacobian rows J_nᵀ e_c (C per-example VJPs per input), in chunks."""
        xp = self.xp
        if logits.ndim != 2:
            raise NotImplementedError(
                f"backend: {self.backend!r} has no jvp capability, and its fallback (Jacobian rows) "
                f"handles logits (N, C) only, got {tuple(logits.shape)}")
        N, C = logits.shape
        chunk = max(1, _ROW_ELEMENTS // max(1, C * self.n_params))
        eye = xp.eye(C, dtype=logits.dtype, device=device(logits))
        parts = []
        for i in range(0, N, chunk):
            x = slice_tree(inputs, i, i + chunk)
            n = n_of(x)
            ct = xp.broadcast_to(eye[:, None, :], (C, n, C))
            rows = self.flatten(self.backend.per_example_vjp(self.model, self.params, x, ct))  # (C, n, P)
            jv = xp.matmul(xp.reshape(rows, (C * n, self.n_params)), xp.matrix_transpose(V))  # (C n, K)
            parts.append(xp.permute_dims(xp.reshape(jv, (C, n, V.shape[0])), (2, 1, 0)))
        return xp.concat(parts, axis=1)

    # -- views for other libraries ------------------------------------------------------------------

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` on flat float64 NumPy vectors (needs scipy).

        Vectors cross to the parameters' namespace and device and back at every product.
        """
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as e:  # pragma: no cover - scipy ships with the test extra
            raise ImportError("to_scipy needs scipy: pip install scipy") from e

        def mm(X):
            X = np.asarray(X)
            one = X.ndim == 1
            out = self.matmat(self.xp.asarray(np.ascontiguousarray((X[:, None] if one else X).T),
                                              dtype=self.dtype, device=self.device))
            out = np.asarray(_to_numpy(out), dtype=np.float64).T
            return out[:, 0] if one else out

        return LinearOperator(self.shape, matvec=mm, rmatvec=mm, matmat=mm, rmatmat=mm, dtype=np.float64)

    def as_function(self) -> Callable[[Tree], Tree]:
        """``v -> F v`` on trees shaped like the parameters: what JAX solvers take as ``A``.

        With the JAX backend it traces: ``jax.scipy.sparse.linalg.cg(op.as_function(), b)``.
        """
        return self.matvec

    def __repr__(self) -> str:
        what = {None: "F", "upper": "F_UB", "lower": f"F_LB (rank {self.rank})"}[self.bound]
        return (f"<FisherOperator {what}, P = {self.n_params:,}, {len(self.batches)} batches, "
                f"{self.likelihood}, reduction={self.reduction!r}, backend {self.backend.name!r}>")
