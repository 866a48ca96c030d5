"""Cotangents in logit space: what each Fisher estimator pulls back through the network.

Every function takes logits ``z`` (N, C) (detached) and returns a stack (K, N, C) of
cotangents u such that the pulled-back gradients g = Jᵀu give the estimator (theory.md §5):

==============  =====================================  ==========================
estimator       cotangent                               E[g gᵀ] (summed over x)
==============  =====================================  ==========================
hutchinson      B ξ = √p ⊙ ξ - p (√p · ξ)               F
upper bound     √p ⊙ ξ                                  F_UB = Σ Jᵀ diag(p) J
lower bound     Σ_j √λ_j v_j ξ_j  (top-k eigenpairs)    F_LB (rank-k envelope)
Monte-Carlo     e_ŷ - p, ŷ ~ p                          F
empirical       e_y - p, y observed                     empirical FIM (biased)
exact           the columns B e_k (k = 1..C)            F (no randomness)
==============  =====================================  ==========================

For the multi-label sigmoid likelihood, B = diag(√σ'), the residual is y - σ and ŷ_c ~
Bernoulli(σ_c).

Memory. A language model's logits have N·T rows of V classes (2 × 128 × 50,257 = 12.9 M
entries for GPT-2 small at 256 tokens), and each cotangent's formula makes several temporaries
of that size (p, √p, the sum's terms; sixteen in ``log_softmax``). :func:`hutchinson`,
:func:`sample_labels` and :func:`label_residual` therefore go through the rows in chunks of at
most ``ROWS`` entries of a stack and write each chunk into one output array, so that besides the
logits and the probes only the result is logit-sized; the numbers are those of the one-piece
computation (each row's arithmetic is the same). The probes themselves can come as a draw by
rows (:func:`by_rows`; the torch adapter's ``probe_rows`` keeps Rademacher signs as random
bits, 1/32 of their float32 array): then the result is the only logit-sized array formed. Where arrays cannot be written into (JAX,
whose ``jit`` fuses the temporaries away) the whole stack is computed at once.
"""

from __future__ import annotations

from typing import Any

from . import hypercube, simplex
from ._compat import check_logits, device, is_writeable_array, namespace_of
from ._lib import index_dtype, log_sigmoid, log_softmax, restore

Array = Any

__all__ = ["by_rows", "column_source", "cross_entropy_and_hutchinson", "exact_columns", "hutchinson", "label_residual",
           "lower_bound", "monte_carlo", "sample_labels", "training_cotangents", "upper_bound"]

LIKELIHOODS = ("softmax", "sigmoid")

ROWS = 1 << 18
"""Entries (K × rows × C) of one chunk of a logit-sized cotangent stack formed at once.

A chunk's temporaries (1 MB in float32) stay in a core's cache: at GPT-2 small's 50,257-token
vocabulary (five positions a chunk) the Hutchinson cotangent took 0.39 s of CPU time for 4 × 512
positions, against 0.64 s in chunks of 2²² entries (``docs/language-models.md``)."""


def _likelihood(likelihood: str):
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood: expected one of {LIKELIHOODS}, got {likelihood!r}")
    return simplex if likelihood == "softmax" else hypercube


def hutchinson(z: Array, xi: Array, likelihood: str = "softmax") -> Array:
    """B(p̃) ξ for probes ``xi`` (K, N, C): unbiased for F once pulled back and squared.

    Formed in chunks of rows (see the module's Notes on memory). ``xi`` may also be a draw by
    rows (:func:`by_rows`): then the probes, too, exist only a chunk at a time.
    """
    return by_rows(_likelihood(likelihood).factor_matvec, z, xi)


def by_rows(f, z: Array, stack: Array, *, budget: int | None = None) -> Array:
    """``f(z, stack)`` for logits ``z`` (N, C) and a stack (K, N, ...), in chunks of rows.

    Chunk n₀:n₁ is ``f(z[n₀:n₁], stack[:, n₀:n₁])``, written into one output (K, N, ...): the
    temporaries of ``f`` are only chunk-sized. ``f`` must treat rows independently. The whole
    stack at once when it fits ``budget`` entries (default :data:`ROWS`), when the shapes are
    other than these, or when the namespace's arrays cannot be written into (JAX).

    ``stack`` may be a *draw by rows* instead of an array: a callable with a ``shape``
    attribute (K, N, ...) whose ``stack(n₀, n₁)`` returns rows n₀:n₁ of that array (an
    adapter's ``probe_rows``: the random probes of a chunk drawn when the chunk is formed).
    """
    budget = ROWS if budget is None else budget
    lazy = callable(stack) and not hasattr(stack, "ndim")
    shape = tuple(stack.shape) if lazy or hasattr(stack, "shape") else ()
    if (getattr(z, "ndim", 0) != 2 or len(shape) < 2 or shape[1] != z.shape[0]
            or shape[0] * z.shape[0] * z.shape[1] <= budget or not is_writeable_array(z)):
        return f(z, stack(0, shape[1]) if lazy else stack)
    xp = namespace_of(z=z) if lazy else namespace_of(z=z, stack=stack)
    N = z.shape[0]
    step = max(1, budget // max(1, shape[0] * z.shape[1]))
    out = None
    for a in range(0, N, step):
        b = min(N, a + step)
        part = f(z[a:b, ...], stack(a, b) if lazy else stack[:, a:b, ...])
        if out is None:
            out = xp.empty((part.shape[0], N, *part.shape[2:]), dtype=part.dtype, device=device(part))
        out[:, a:b, ...] = part
        del part
    return out


def upper_bound(z: Array, xi: Array) -> Array:
    """√p ⊙ ξ: the diagonal-kernel cotangent whose pull-back estimates F_UB (theory.md §5.3)."""
    p = simplex.probs(z)
    return namespace_of(z=z, xi=xi).sqrt(p) * xi


def lower_bound(z: Array, xi: Array) -> Array:
    """Σ_j √λ_j v_j ξ_j over the top-k eigenpairs of I_Δ(z); ``xi`` is (K, N, k).

    With k = 1 this is the paper's low-rank kernel √λ_C v_C ξ, one probe per input.
    """
    xp = namespace_of(z=z, xi=xi)
    k = xi.shape[-1]
    lam, vec = simplex.top_eigpair(z, k=k)
    if k == 1:
        lam, vec = lam[..., None], vec[..., None]
    w = vec * xp.sqrt(xp.clip(lam, min=0.0))[..., None, :]  # (N, C, k)
    return xp.matmul(w, xi[..., None])[..., 0]


def exact_columns(z: Array, likelihood: str = "softmax", bound: str | None = None, rank: int = 1,
                  columns: tuple[int, int] | None = None) -> Array:
    """Columns (M, N, C) of a factor of I(z) (or of a bound), so that Σ_m u_m u_mᵀ is exact.

    softmax: the C columns of B (column k is √p_k (e_k − p)); ``bound="upper"``: those of
    diag(√p); ``bound="lower"``: the ``rank`` columns √λ_j v_j. sigmoid: the C columns of
    diag(√σ'). ``columns=(start, stop)`` gives only columns start..stop-1 (see
    :func:`column_source` to go through them in chunks without recomputing p).
    """
    M, cols = column_source(z, likelihood, bound, rank)
    start, stop = (0, M) if columns is None else columns
    return cols(start, stop)


def column_source(z: Array, likelihood: str = "softmax", bound: str | None = None, rank: int = 1):
    """(M, cols): the number of factor columns and ``cols(start, stop)`` -> (stop - start, N, C).

    p is computed once, so that a caller can go through the C columns in chunks without ever
    holding the dense (C, N, C) stack.
    """
    xp, zw, dtype = check_logits(z, softmax=likelihood == "softmax")
    _likelihood(likelihood)
    if likelihood == "softmax" and bound == "lower":
        if not 1 <= rank <= zw.shape[-1]:  # else top_eigpair's "k:"
            raise ValueError(f"rank: the lower envelope has at most C={zw.shape[-1]} eigenpairs (classes), "
                             f"got rank={rank}")
        lam, vec = simplex.top_eigpair(z, k=rank)
        if rank == 1:
            lam, vec = lam[..., None], vec[..., None]
        full = xp.permute_dims(vec * xp.sqrt(xp.clip(lam, min=0.0))[..., None, :], (2, 0, 1))
        return rank, lambda a, b: full[_check_range(a, b, rank), ...]
    C = zw.shape[-1]
    if likelihood == "sigmoid":
        s, p = xp.sqrt(hypercube.fim(zw)), None
    else:
        logp = log_softmax(zw, xp=xp)
        s, p = xp.exp(0.5 * logp), (None if bound == "upper" else xp.exp(logp))
    st = xp.permute_dims(s, (1, 0))  # (C, N)

    def cols(a: int, b: int) -> Array:
        sk = st[_check_range(a, b, C), :][..., None]  # (m, N, 1)
        onehot = _onehot_rows(a, b, C, zw, xp=xp)  # (m, 1, C)
        out = onehot * sk if p is None else onehot * sk - p[None, ...] * sk  # √p_k (e_k − p), as factor()
        return restore(out, dtype, xp=xp)

    return C, cols


def exact_diagonal(z: Array, likelihood: str = "softmax", bound: str | None = None, rank: int = 1) -> Array:
    """Σ_k u_k² over the exact columns u_k of :func:`exact_columns`: the kernel's diagonal (N, C).

    softmax: p(1 − p); ``bound="upper"``: p; ``bound="lower"``: Σ_j λ_j v_j²; sigmoid: σ'. For a
    layer whose output is the logits, g = u, so the exact diagonal of its parameters needs only
    these sums, not the C columns one by one.
    """
    xp, zw, dtype = check_logits(z, softmax=likelihood == "softmax")
    _likelihood(likelihood)
    if likelihood == "sigmoid":
        return hypercube.fim(z)
    if bound == "lower":
        M, cols = column_source(z, likelihood, bound, rank)
        u = cols(0, M)
        return xp.sum(u * u, axis=0)
    p = xp.exp(log_softmax(zw, xp=xp))
    return restore(p if bound == "upper" else p * (1.0 - p), dtype, xp=xp)


def _check_range(a: int, b: int, M: int) -> slice:
    if not 0 <= a <= b <= M:
        raise ValueError(f"columns: expected 0 <= start <= stop <= {M}, got {(a, b)}")
    return slice(a, b)


def _onehot_rows(start, stop, C, like, *, xp):
    k = xp.arange(start, stop, device=device(like))
    return xp.astype(k[:, None, None] == xp.arange(C, device=device(like))[None, None, :], like.dtype)


def sample_labels(z: Array, u: Array, likelihood: str = "softmax") -> Array:
    """Labels drawn from the model by inverse CDF from uniforms ``u``.

    softmax: ``u`` (K, N) -> class indices (K, N); sigmoid: ``u`` (K, N, C) -> 0/1 (K, N, C).
    """
    _likelihood(likelihood)
    if getattr(u, "ndim", 0) == (2 if likelihood == "softmax" else 3):  # (K, N[, C]): by rows
        return by_rows(lambda zc, uc: _sample_labels(zc, uc, likelihood), z, u)
    return _sample_labels(z, u, likelihood)


def _sample_labels(z, u, likelihood):
    xp, zw, _ = check_logits(z, softmax=likelihood == "softmax")
    if _likelihood(likelihood) is hypercube:
        return xp.astype(u < xp.exp(log_sigmoid(zw, xp=xp)), zw.dtype)
    cdf = xp.cumulative_sum(xp.exp(log_softmax(zw, xp=xp)), axis=-1)
    idx = xp.sum(xp.astype(cdf[None, ...] <= u[..., None], index_dtype(zw, xp=xp)), axis=-1)
    return xp.clip(idx, max=zw.shape[-1] - 1)


def monte_carlo(z: Array, u: Array, likelihood: str = "softmax") -> Array:
    """The Monte-Carlo cotangents e_ŷ − p (K, N, C), ŷ ~ p drawn by inverse CDF from ``u``.

    The same as ``label_residual(z, sample_labels(z, u))`` (sigmoid: exactly that), from one
    softmax per chunk of rows instead of two careful log-softmaxes over all of them.

    Parameters
    ----------
    z : array (N, C)
        Logits.
    u : array (K, N) (softmax) or (K, N, C) (sigmoid)
        Uniforms in [0, 1).

    Notes
    -----
    Cost: per chunk of rows, p = exp(s)/Σexp(s) with s = z − max z, its cumulative sum, one
    comparison with u and the residual: about six passes over a chunk, against some thirty for
    the two functions called separately. p here and log-softmax's p differ by rounding (a few
    ulp), so a uniform within that distance of a class boundary of the CDF may pick the
    neighbouring class: the draws have the same distribution.
    """
    if _likelihood(likelihood) is hypercube:
        return label_residual(z, sample_labels(z, u, likelihood), likelihood)
    return by_rows(_monte_carlo_rows, z, u)


def _monte_carlo_rows(z, u):
    xp, zw, _ = check_logits(z)
    C = zw.shape[-1]
    p = xp.exp(zw - xp.max(zw, axis=-1, keepdims=True))
    p *= 1.0 / xp.sum(p, axis=-1, keepdims=True)
    below = xp.cumulative_sum(p, axis=-1)[None, ...] <= xp.astype(u, p.dtype)[..., None]
    idx = xp.clip(xp.count_nonzero(below, axis=-1), max=C - 1)  # (K, n)
    del below
    out = xp.astype(idx[..., None] == xp.arange(C, device=device(zw)), p.dtype)
    out -= p
    return out


def label_residual(z: Array, y: Array, likelihood: str = "softmax") -> Array:
    """∂ log p(y|z)/∂z: e_y - p for class indices ``y`` (..., N), y - σ for 0/1 labels (..., N, C).

    Labels with one leading axis (K, N[, C]) are gone through in chunks of rows (module Notes).
    """
    _likelihood(likelihood)
    if getattr(y, "ndim", 0) == (2 if likelihood == "softmax" else 3):
        return by_rows(lambda zc, yc: _label_residual(zc, yc, likelihood), z, y)
    return _label_residual(z, y, likelihood)


def _label_residual(z, y, likelihood):
    xp, zw, dtype = check_logits(z, softmax=likelihood == "softmax")
    if _likelihood(likelihood) is hypercube:
        return xp.astype(y, zw.dtype) - xp.exp(log_sigmoid(zw, xp=xp))
    C = zw.shape[-1]
    onehot = xp.astype(y[..., None] == xp.arange(C, device=device(zw)), zw.dtype)
    return onehot - xp.exp(log_softmax(zw, xp=xp))


def cross_entropy_and_hutchinson(z: Array, y: Array, xi: Array) -> tuple[Array, Array]:
    """A training step's cotangents from one log-softmax: (mean cross-entropy, (1 + K, N, C) stack).

    Row 0 is ∂L/∂z = (p − e_y)/N for L = −(1/N) Σ_n log p_{y_n}(z_n); rows 1..K are the
    Hutchinson cotangents B(p̃)ξ_k = √p ⊙ ξ_k − p (√p · ξ_k) (:func:`hutchinson`). Pulled back
    together in one batched VJP, they give the loss gradient and K probe gradients of the same
    forward pass (:class:`fisherlib.estimators.RunningFisher`).

    Parameters
    ----------
    z : array (N, C)
        Logits (softmax likelihood).
    y : integer array (N,)
        Class indices.
    xi : array (K, N, C)
        Probes.

    Notes
    -----
    Cost: one softmax and O(K·N·C) elementwise work in eight fresh N·C arrays, against about
    twenty for :func:`label_residual` and :func:`hutchinson` called separately. The loss is
    log Σ exp(s) − s_y with s = z − max z, as frameworks' fused cross-entropies compute it: for
    a confident input its absolute error is ε, not its relative error (which
    :func:`~fisherlib.core._lib.log_softmax` keeps for the exact Fisher's p(1 − p)).
    """
    xp = namespace_of(z=z, xi=xi)
    loss, ct, hut = training_cotangents(z, y, xi)
    return loss, xp.concat([ct[None, ...], hut], axis=0)


def training_cotangents(z: Array, y: Array, xi: Array, weights: Array | None = None
                        ) -> tuple[Array, Array, Array]:
    """:func:`cross_entropy_and_hutchinson` unstacked: (loss, ∂L/∂z (N, C), B(p̃)ξ (K, N, C)).

    For a caller that pulls the rows back one call each: it never needs the (1 + K, N, C) stack.
    ``weights`` (N,) of 0 and 1 leave outputs out (ignored labels, padding): the loss is the
    mean over the M = Σ w counted rows, ∂L/∂z = w (p − e_y)/M, and the probe rows of the others
    are zero, so that their pull-backs hold the counted outputs' Fisher only.
    """
    xp, zw, dtype = check_logits(z)
    N, C = zw.shape
    dev = device(zw)
    # Few fresh arrays of N·C entries, reused in place: on a CPU each fresh one costs more than
    # its arithmetic (docs/natural-gradient.md, "Cost").
    s = zw - xp.max(zw, axis=-1, keepdims=True)
    # Row-wise indices in the default integer dtype (int32 for JAX without x64: no int64 requests
    # there), never flat ones: N·C may pass 2^31 for a large vocabulary.
    picked = xp.take_along_axis(s, xp.reshape(xp.astype(y, index_dtype(zw, xp=xp)), (N, 1)), axis=-1)[:, 0]
    p = xp.exp(s)
    total = xp.sum(p, axis=-1, keepdims=True)
    terms = xp.log(total[:, 0]) - picked
    if weights is None:
        loss = xp.sum(terms) / N
    else:
        w = xp.astype(weights, p.dtype)
        count = xp.clip(xp.sum(w), min=1.0)
        loss = xp.sum(w * terms) / count
    p *= 1.0 / total
    ct = p - xp.astype(y[:, None] == xp.arange(C, device=dev), p.dtype)
    ct *= 1.0 / N if weights is None else (w / count)[:, None]
    hut = simplex.apply_factor(p, xp.sqrt(p), xp.astype(xi, p.dtype) if xi.dtype != p.dtype else xi, xp=xp)
    if weights is not None:
        hut *= w[:, None]
    return restore(loss, dtype, xp=xp), restore(ct, dtype, xp=xp), restore(hut, dtype, xp=xp)
