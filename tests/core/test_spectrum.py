"""Spectrum of I_Δ (theory §2): the secular solver against dense float64 eigh, and the bounds.

Tolerances are derived in tests/core/_reference.py: eigenvalues and residuals to
16 (C + 1) ε max p in float64 (<= 2.3e-13 max p for C <= 64) and 64 ε₃₂ max p in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace
from hypothesis import given
from hypothesis import strategies as st

from fisherlib import simplex
from fisherlib.core._secular import _spectrum
from tests._backends import JAX_NEW_SHAPE, backend_of, jit, skip_backend, to_numpy, to_xp
from tests.core._reference import (
    assert_spectrum_matches,
    eig_tol,
    eps,
    logits,
    max_p,
    product_tol,
    ref_eigh,
    ref_fim,
    ref_probs,
    seeded_logits,
)


_z = seeded_logits


# ----------------------------------------------------------------------------- eigh / eigvalsh


@given(data=st.data())
def test_eigh_matches_dense_float64(xp, data):
    z = data.draw(logits(xp))
    lam, V = simplex.eigh(to_xp(z, xp))
    assert tuple(lam.shape) == z.shape and tuple(V.shape) == (*z.shape, z.shape[-1])
    assert lam.dtype == xp.float64 and V.dtype == xp.float64
    assert_spectrum_matches(z, to_numpy(lam), to_numpy(V), "float64")


@given(data=st.data())
def test_eigvalsh_matches_dense_float64(xp, data):
    z = data.draw(logits(xp))
    lam = to_numpy(simplex.eigvalsh(to_xp(z, xp)))
    w = np.linalg.eigvalsh(ref_fim(z))
    assert np.all(np.abs(lam - w) <= eig_tol(z.shape[-1]) * max_p(z))
    # λ_1 = 0 exactly, and eigh returns the same eigenvalues.
    assert np.all(lam[..., 0] == 0)
    lam2, _ = simplex.eigh(to_xp(z, xp))
    assert np.array_equal(to_numpy(lam2), lam)


@given(data=st.data())
def test_eigh_matches_dense_float32(xp, data):
    """float32 in and out; compared with float64 eigh of the same float32 logits."""
    z = data.draw(logits(xp)).astype(np.float32)
    lam, V = simplex.eigh(to_xp(z, xp, "float32"))
    assert lam.dtype == xp.float32 and V.dtype == xp.float32
    assert_spectrum_matches(z.astype(np.float64), to_numpy(lam), to_numpy(V), "float32")


# Special probability vectors, C = 5, six rows: reshaped to (2, 3, 5), a shape every backend
# (JAX included) already compiled for the property tests.
SPECIAL_P = np.array(
    [
        [0.2, 0.2, 0.2, 0.2, 0.2],  # uniform: {0, 1/C with multiplicity C - 1}
        [0.1, 0.2, 0.2, 0.2, 0.3],  # a three-way tie
        [0.15, 0.15, 0.2, 0.25, 0.25],  # two ties
        [0.0, 0.0, 0.3, 0.3, 0.4],  # two zeros and a tie
        [0.0, 0.1, 0.2, 0.3, 0.4],  # a zero
        [0.0, 0.0, 0.0, 0.0, 1.0],  # a vertex: I_Δ = 0
    ]
)


@pytest.mark.parametrize("order", ["sorted", "permuted"])
def test_ties_and_zeros(xp, order):
    """Ties p_i = p_j give p_i as an eigenvalue; zeros (logit -inf) add kernel directions."""
    p = SPECIAL_P
    if order == "permuted":
        p = np.random.default_rng(0).permuted(p, axis=-1)
    with np.errstate(divide="ignore"):
        z = np.log(p)
    lam, V = simplex.eigh(to_xp(z.reshape(2, 3, 5), xp))
    lam, V = to_numpy(lam).reshape(6, 5), to_numpy(V).reshape(6, 5, 5)
    assert_spectrum_matches(z, lam, V, "float64")
    tol = eig_tol(5)
    for row, lam_row in zip(p, lam, strict=True):
        zeros = int((row == 0).sum())
        assert np.all(lam_row[: max(zeros, 1)] == 0)  # λ = 0 with multiplicity max(#zeros, 1)
        for value in np.unique(row[row > 0]):
            m = int((row == value).sum())
            if m > 1:  # a tie of multiplicity m makes value an eigenvalue of multiplicity >= m - 1
                assert (np.abs(lam_row - value) <= tol * row.max()).sum() >= m - 1
    # Uniform row: {0, 1/C x (C - 1)}, the kernel vector is 1/√C.
    assert np.abs(lam[0, 1:] - 0.2).max() <= tol * 0.2
    assert np.allclose(np.abs(V[0, :, 0]), 1 / np.sqrt(5), rtol=0, atol=tol)


@pytest.mark.parametrize("C", [2, 16, 64])
def test_uniform(xp, C):
    """Uniform p = 1/C: eigenvalues 0 and 1/C (C - 1 times)."""
    skip_backend(xp, "jax", JAX_NEW_SHAPE)
    lam, V = simplex.eigh(to_xp(np.zeros((1, C)), xp))
    lam, V = to_numpy(lam)[0], to_numpy(V)[0]
    assert lam[0] == 0
    assert np.abs(lam[1:] - 1 / C).max() <= eig_tol(C) / C
    assert np.allclose(np.abs(V[:, 0]), 1 / np.sqrt(C), rtol=0, atol=eig_tol(C))
    assert np.abs(V.T @ V - np.eye(C)).max() <= eig_tol(C)


def test_c1_and_c2(xp):
    """C = 1: the single eigenvalue 0. C = 2: λ₂ = 2 p₁ p₂ with eigenvector (1, -1)/√2."""
    skip_backend(xp, "jax", JAX_NEW_SHAPE)
    lam, V = simplex.eigh(to_xp(np.array([[0.7], [-3.0]]), xp))
    assert np.all(to_numpy(lam) == 0) and np.all(np.abs(to_numpy(V)) == 1)
    top, v = simplex.top_eigpair(to_xp(np.array([[0.7], [-3.0]]), xp))
    assert np.all(to_numpy(top) == 0) and np.all(np.abs(to_numpy(v)) == 1)
    z = _z((6, 2)) * 3
    p = ref_probs(z)
    lam, V = simplex.eigh(to_xp(z, xp))
    lam, V = to_numpy(lam), to_numpy(V)
    assert np.all(lam[:, 0] == 0)
    assert np.abs(lam[:, 1] - 2 * p[:, 0] * p[:, 1]).max() <= eig_tol(2) * p.max()
    assert np.allclose(np.abs(V[:, :, 1]), np.sqrt(0.5), rtol=0, atol=eig_tol(2))
    assert np.all(V[:, 0, 1] * V[:, 1, 1] < 0)


def test_huge_logits(xp):
    """Logits of ±1e4 (exp would overflow without the max shift)."""
    z = np.array(
        [
            [1e4, -1e4, 1e4 - 1.0, 0.0, 1e4 - 2.5],
            [-1e4, -1e4, -1e4 + 0.5, -1e4 + 3.0, -1e4],
            [1e4, 1e4, 1e4, 1e4, -1e4],
            [1e4, -1e4, -1e4, -1e4, -1e4],
            [-1e4, 1e4, -1e4, 1e4 - 30.0, 0.0],
            [1e4 - 0.25, 1e4 - 0.5, 1e4 - 0.75, 1e4 - 1.0, 1e4],
        ]
    )
    lam, V = simplex.eigh(to_xp(z.reshape(2, 3, 5), xp))
    assert_spectrum_matches(z, to_numpy(lam).reshape(6, 5), to_numpy(V).reshape(6, 5, 5), "float64")


def test_near_ties_stay_orthonormal(xp):
    """Probabilities a few ulp apart (chains of near ties) still give orthonormal eigenvectors.

    A regression test: before near ties were snapped to one value, a near-tied pair gave a
    Helmert vector that was not orthogonal to the neighbouring secular eigenvectors, whose
    components on the pair differed (VᵀV - I ≈ 0.1).
    """
    rng = np.random.default_rng(7)
    z = rng.normal(size=(6, 5)) * 2
    for r in range(6):
        i, j, k = rng.choice(5, 3, replace=False)
        z[r, j] = z[r, i] * (1 + (r + 1) * eps("float64"))
        z[r, k] = z[r, i] * (1 - (6 + 3 * r) * eps("float64"))
    lam, V = simplex.eigh(to_xp(z.reshape(2, 3, 5), xp))
    assert_spectrum_matches(z, to_numpy(lam).reshape(6, 5), to_numpy(V).reshape(6, 5, 5), "float64")


def test_near_ties_float32_large_c(xp):
    """Random float32 logits at C = 300 often have probabilities within 8 ulp of each other."""
    skip_backend(xp, "jax", JAX_NEW_SHAPE)
    z = np.random.default_rng(3).normal(size=(2, 300)).astype(np.float32)
    lam, V = simplex.eigh(to_xp(z, xp, "float32"))
    assert_spectrum_matches(z.astype(np.float64), to_numpy(lam), to_numpy(V), "float32")


def test_steps_zero_stays_in_brackets(xp):
    """With any number of steps the roots stay inside their interlacing intervals."""
    z = _z((2, 3, 5))
    lo, hi = (to_numpy(b) for b in simplex.interlacing_bounds(to_xp(z, xp)))
    for steps in (0, 1, 2):
        lam = to_numpy(simplex.eigvalsh(to_xp(z, xp), steps=steps))
        assert np.all(lo <= lam) and np.all(lam <= hi)


# ----------------------------------------------------------------------------- top_eigpair


@given(data=st.data())
def test_top_eigpair_is_top_of_eigh(xp, data):
    z = data.draw(logits(xp))
    C = z.shape[-1]
    zx = to_xp(z, xp)
    lam, V = (to_numpy(a) for a in simplex.eigh(zx))
    top, v = (to_numpy(a) for a in simplex.top_eigpair(zx))
    assert top.shape == z.shape[:-1] and v.shape == z.shape
    tol = eig_tol(C) * max_p(z)[..., 0]
    assert np.all(np.abs(top - lam[..., -1]) <= tol)
    # Same vector up to sign where λ_C is simple; else check it is a unit eigenvector.
    F = ref_fim(z)
    assert np.all(np.linalg.norm(F @ v[..., None] - top[..., None, None] * v[..., None], axis=(-2, -1)) <= tol)
    assert np.all(np.abs(np.linalg.norm(v, axis=-1) - 1) <= eig_tol(C))
    if C == 1:
        return
    # k = 1 is checked above. JAX: k = C only (the shapes eigh compiled); partial k under jit below.
    k = C if backend_of(xp) == "jax" else data.draw(st.integers(2, C))
    topk, Vk = (to_numpy(a) for a in simplex.top_eigpair(zx, k=k))
    assert topk.shape == (*z.shape[:-1], k) and Vk.shape == (*z.shape, k)
    assert np.all(np.abs(topk - lam[..., C - k :]) <= tol[..., None])
    res = np.linalg.norm(F @ Vk - Vk * topk[..., None, :], axis=-2)
    assert np.all(res <= tol[..., None])
    assert np.abs(np.swapaxes(Vk, -1, -2) @ Vk - np.eye(k)).max() <= eig_tol(C)


def test_top_eigpair_k1_equals_eigh_vector(xp):
    z = _z((2, 3, 5))
    lam, V = (to_numpy(a) for a in simplex.eigh(to_xp(z, xp)))
    top, v = (to_numpy(a) for a in simplex.top_eigpair(to_xp(z, xp)))
    assert np.abs(top - lam[..., -1]).max() <= eig_tol(5) * ref_probs(z).max()
    # Random normal logits: λ_C is simple with a gap of O(max p), so the vectors agree to
    # O(eig_tol) (Davis–Kahan), up to sign.
    sign = np.sign(np.sum(v * V[..., -1], axis=-1, keepdims=True))
    assert np.abs(v - sign * V[..., -1]).max() <= 16 * eig_tol(5)


# ----------------------------------------------------------------------------- bounds


@given(data=st.data())
def test_lambda_max_bounds(xp, data):
    """max{p_(C-1), p_(C)(1 - p_(C)), 2x2 block} <= λ_C <= min{p_(C), 1 - ‖p‖², p_(C) + p_(C-1) - ‖p‖²}."""
    z = data.draw(logits(xp))
    C = z.shape[-1]
    lo, hi = (to_numpy(b) for b in simplex.lambda_max_bounds(to_xp(z, xp)))
    lam = np.linalg.eigvalsh(ref_fim(z))[..., -1]
    tol = eig_tol(C) * max_p(z)[..., 0]
    assert np.all(lo <= lam + tol), "lower bound above λ_C"
    assert np.all(lam <= hi + tol), "upper bound below λ_C"
    # Each bound is at least as good as the simple Theorem-1 pair.
    p = np.sort(ref_probs(z), axis=-1)
    a = p[..., -1]
    assert np.all(lo >= a * (1 - a) - tol)
    assert np.all(hi <= 1 - (p * p).sum(-1) + tol)
    if C == 2:  # the 2x2 block is the whole matrix: exact
        assert np.all(np.abs(lo - lam) <= tol)


@given(data=st.data())
def test_interlacing_bounds(xp, data):
    z = data.draw(logits(xp))
    C = z.shape[-1]
    lo, hi = (to_numpy(b) for b in simplex.interlacing_bounds(to_xp(z, xp)))
    w = np.linalg.eigvalsh(ref_fim(z))
    d = np.sort(ref_probs(z), axis=-1)
    tol = eig_tol(C) * max_p(z)
    assert np.all(lo <= w + tol) and np.all(w <= hi + tol)
    assert np.all(lo[..., 0] == 0) and np.all(hi[..., 0] == 0)
    assert np.allclose(lo[..., 1:], d[..., :-1], rtol=product_tol(C), atol=0)
    assert np.allclose(hi[..., 1:], d[..., 1:], rtol=product_tol(C), atol=0)


@given(data=st.data())
def test_trace_identity(xp, data):
    """Σ λ_i = tr I_Δ = 1 - ‖p‖²."""
    z = data.draw(logits(xp))
    C = z.shape[-1]
    zx = to_xp(z, xp)
    total = to_numpy(xp.sum(simplex.eigvalsh(zx), axis=-1))
    tr = to_numpy(simplex.trace(zx))
    p = ref_probs(z)
    assert np.all(np.abs(total - tr) <= C * eig_tol(C) * p.max(-1))
    assert np.all(np.abs(tr - (1 - (p * p).sum(-1))) <= product_tol(C))


# ----------------------------------------------------------------------------- precision, jit


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_torch(dtype):
    """float16/bfloat16 in, same dtype out (computed in float32), loosely right."""
    torch = pytest.importorskip("torch")
    z = _z((3, 6)).astype(np.float32)
    zt = torch.asarray(z).to(getattr(torch, dtype))
    z64 = zt.double().numpy()  # the logits as the solver sees them
    lam, V = simplex.eigh(zt)
    assert lam.dtype == zt.dtype and V.dtype == zt.dtype
    top, v = simplex.top_eigpair(zt)
    assert top.dtype == zt.dtype and v.dtype == zt.dtype
    assert simplex.eigvalsh(zt).dtype == zt.dtype
    # Output rounding: half an ulp of the output dtype on each entry (<= max p, <= 1).
    w, U = ref_eigh(z64)
    pm = max_p(z64)
    e = eps(dtype)
    lam, V = to_numpy(lam, np.float64), to_numpy(V, np.float64)
    assert np.all(np.abs(lam - w) <= 2 * e * pm)
    res = np.linalg.norm(ref_fim(z64) @ V - V * lam[..., None, :], axis=-2)
    assert np.all(res <= 4 * np.sqrt(6) * e * pm)
    assert np.all(np.abs(to_numpy(top, np.float64) - w[..., -1]) <= 2 * e * pm[..., 0])


@pytest.mark.parametrize(
    "name",
    ["eigh", "top_eigpair", "top_eigpair_k3", "matvec", "factor_matvec", "lambda_max_bounds"],
)
def test_runs_under_jax_jit(name):
    """The core decides with shapes only, so it traces: jit(JAX) equals NumPy eager.

    Under jit the value checks (NaN, +inf) are skipped; everything else is the same code.
    """
    jnp = pytest.importorskip("jax.numpy")
    z = _z((2, 3, 5), "tied")
    z[0, 0, 1] = -np.inf
    v = np.random.default_rng(0).normal(size=(2, 3, 5))
    f, args, kw = {
        "eigh": (simplex.eigh, (z,), {}),
        "top_eigpair": (simplex.top_eigpair, (z,), {}),
        "top_eigpair_k3": (simplex.top_eigpair, (z,), {"k": 3}),
        "matvec": (simplex.matvec, (z, v), {}),
        "factor_matvec": (simplex.factor_matvec, (z, v), {}),
        "lambda_max_bounds": (simplex.lambda_max_bounds, (z,), {}),
    }[name]
    expected = f(*args, **kw)
    traced = jit(f, jnp, **kw)(*(jnp.asarray(a) for a in args))
    expected = expected if isinstance(expected, tuple) else (expected,)
    traced = traced if isinstance(traced, tuple) else (traced,)
    for a, b in zip(expected, traced, strict=True):
        assert array_namespace(b) is array_namespace(jnp.asarray(z))
        # Same algorithm, but XLA may fuse and reorder roundings: eigenvectors move by up to
        # ε/gap, and these inputs have gaps of at least 1e-2 outside their exact ties.
        assert np.allclose(to_numpy(b), a, rtol=0, atol=100 * eig_tol(5))


# ----------------------------------------------------------------------------- solver paths
# The solver takes cheaper paths on eager arrays: it stops once no root moves, skips the tie
# bookkeeping of tie-free rows, and splits the (rows, roots, classes) work into cache-sized
# blocks. Each path must give the full fixed-step, unblocked result to rounding.


def _solve(zx, *, first=None, **kw):
    """(eigenvalues, eigenvectors as columns) from the internal solver, as NumPy arrays."""
    xp = array_namespace(zx)
    lam, vec = _spectrum(zx, first, steps=None, vectors=True, xp=xp, **kw)
    return to_numpy(lam), np.swapaxes(to_numpy(vec), -1, -2)


def _assert_same_to_rounding(a, b, z, C):
    """Two runs of the solver agree within the solver's own accuracy (eigenvalues to
    eig_tol·max p; eigenvectors up to sign, where the gap lets them be defined)."""
    (lam1, V1), (lam2, V2) = a, b
    pm = max_p(z)
    assert np.all(np.abs(lam1 - lam2) <= eig_tol(C) * pm)
    assert_spectrum_matches(z, lam1, V1, "float64")
    assert_spectrum_matches(z, lam2, V2, "float64")


@given(data=st.data())
def test_blocked_and_early_stopped_match_the_plain_solver(xp, data):
    """Blocks of 3 roots (so that most poles lie outside a block's band and the signed sums of
    the rounding bound are used) and the early stop, against one block and every step."""
    skip_backend(xp, "jax", JAX_NEW_SHAPE)
    z = data.draw(logits(xp, min_c=2, max_c=40))
    C = z.shape[-1]
    zx = to_xp(z, xp)
    plain = _solve(zx, block=1 << 30, early_stop=False)
    for kw in ({"block": 3 * C}, {"block": 3 * C, "early_stop": False}, {"block": 1 << 30}):
        _assert_same_to_rounding(_solve(zx, **kw), plain, z, C)


def test_early_stop_is_exact_once_converged(xp):
    """With the early stop, more steps change nothing; and it equals the full step count."""
    z = _z((2, 3, 5), "random")
    zx = to_xp(z, xp)
    early = to_numpy(simplex.eigvalsh(zx))
    assert np.array_equal(to_numpy(simplex.eigvalsh(zx, steps=40)), early)
    full = _solve(zx, early_stop=False)[0]
    assert np.all(np.abs(full - early) <= 4 * eps("float64") * max_p(z))


def test_early_stop_large_c(xp):
    """C = 300, several blocks per row at the default size: early stop against every step."""
    skip_backend(xp, "jax", JAX_NEW_SHAPE)
    for kind in ("random", "peaked", "tied", "neginf"):
        z = _z((2, 300), kind, seed=1)
        zx = to_xp(z, xp)
        _assert_same_to_rounding(_solve(zx), _solve(zx, early_stop=False, block=1 << 30), z, 300)
        top, v = (to_numpy(a) for a in simplex.top_eigpair(zx, k=4))
        lam, _ = _solve(zx, first=296, block=8 * 300)  # the top 4 in blocks of 8
        assert np.all(np.abs(top - lam) <= eig_tol(300) * max_p(z))


def test_tie_free_rows_take_the_same_path_as_tied_batches(xp):
    """Rows without ties skip the tie bookkeeping; beside a tied row they take the general path.

    Includes a single zero probability (a kernel vector, but no tie).
    """
    skip_backend(xp, "jax", JAX_NEW_SHAPE)
    z = _z((3, 6), "random", seed=5)
    z[1, 2] = -np.inf
    tied = np.log(np.array([[0.1, 0.2, 0.2, 0.2, 0.15, 0.15]]))
    alone = _solve(to_xp(z, xp))
    both = _solve(to_xp(np.concatenate([z, tied]), xp))
    assert np.array_equal(alone[0], both[0][:3])
    assert np.abs(alone[1] - both[1][:3]).max() <= eig_tol(6)
    assert_spectrum_matches(z, *alone, "float64")
    assert np.all(alone[0][1, :2] == 0)  # the zero's kernel direction and λ_1


def test_traced_solver_takes_every_step():
    """Under jax.jit the solver runs its fixed step count (no early stop, no value branches):
    after 1 or 2 steps, before convergence, it matches the eager solver with the stop off."""
    jnp = pytest.importorskip("jax.numpy")
    z = _z((2, 3, 5), "peaked")
    z[0, 0, 1] = -np.inf
    for steps in (1, 2):
        eager = simplex.eigvalsh(z, steps=steps)
        full, _ = _spectrum(z, None, steps=steps, vectors=False, xp=array_namespace(z), early_stop=False)
        traced = to_numpy(jit(simplex.eigvalsh, jnp, steps=steps)(jnp.asarray(z)))
        assert np.allclose(traced, to_numpy(full), rtol=0, atol=100 * eig_tol(5))
        assert np.all(np.abs(to_numpy(full) - eager) <= 100 * eig_tol(5))
