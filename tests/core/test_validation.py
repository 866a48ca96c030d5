"""Bad input gets a clear error that names the argument (design.md, "Semantics everyone must share").

TypeError is for kinds (not an array, integer dtype, mixed namespaces), ValueError for values
(NaN, +inf, shapes, bad options). Value checks run on eager arrays (JAX included); under
``jax.jit`` they are skipped so that the core traces.
"""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib import hypercube, simplex
from tests._backends import JAX_NEW_SHAPE, skip_backend, to_numpy, to_xp

Z_ONLY = [
    simplex.probs,
    simplex.log_probs,
    simplex.fim,
    simplex.factor,
    simplex.trace,
    simplex.eigh,
    simplex.eigvalsh,
    simplex.top_eigpair,
    simplex.lambda_max_bounds,
    simplex.interlacing_bounds,
    simplex.lower_envelope,
    simplex.upper_envelope,
    simplex.trimmed_norm,
    hypercube.probs,
    hypercube.fim,
    hypercube.eigvalsh,
    hypercube.trace,
]
WITH_VECTOR = [
    (simplex.matvec, "v"),
    (simplex.factor_matvec, "xi"),
    (simplex.factor_rmatvec, "u"),
    (hypercube.matvec, "v"),
    (hypercube.factor_matvec, "xi"),
    (hypercube.factor_rmatvec, "u"),
]
ALL = Z_ONLY + [f for f, _ in WITH_VECTOR]


def _name(f):
    return f"{f.__module__.rsplit('.', 1)[-1]}.{f.__name__}"


def _call(f, z, xp):
    """f(z), with a valid vector argument where f takes one."""
    for g, _ in WITH_VECTOR:
        if g is f:
            v = to_xp(np.ones(tuple(z.shape)), xp) if z.ndim else z
            return f(z, v)
    return f(z)


BAD_VALUES = {
    "nan": (np.array([[0.0, np.nan, 1.0]]), "NaN"),
    "+inf": (np.array([[0.0, np.inf, 1.0]]), r"\+inf"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
@pytest.mark.parametrize("f", ALL, ids=_name)
def test_non_finite_logits(xp, f, case):
    z, message = BAD_VALUES[case]
    with pytest.raises(ValueError, match=rf"^z: .*{message}"):
        _call(f, to_xp(z, xp), xp)


SOFTMAX = [g for g in ALL if g.__module__.rsplit(".", 1)[-1] in ("simplex", "spectrum", "envelopes")]


@pytest.mark.parametrize("f", SOFTMAX, ids=_name)
def test_all_neg_inf_row_softmax(xp, f):
    """A row with every logit -inf has no probability distribution: refused by the simplex."""
    z = to_xp(np.array([[0.0, 1.0, 2.0], [-np.inf, -np.inf, -np.inf]]), xp)
    with pytest.raises(ValueError, match=r"^z: .*every logit equal to -inf"):
        _call(f, z, xp)


def test_neg_inf_entries_are_valid(xp):
    """Some -inf (a class of probability 0) is fine for both spaces; all -inf is fine for the
    hypercube (every label certainly absent)."""
    z = np.random.default_rng(0).normal(size=(2, 3, 5))
    z[0, 0, 1] = z[1, 2, 0] = z[1, 2, 4] = -np.inf
    for f in ALL:
        _call(f, to_xp(z, xp), xp)
    allneg = to_xp(np.full((2, 3, 5), -np.inf), xp)
    assert np.all(to_numpy(hypercube.fim(allneg)) == 0)


@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
@pytest.mark.parametrize("f", ALL, ids=_name)
def test_non_floating_logits(xp, f, dtype):
    z = to_xp(np.array([[1, 0, 1]]).astype(dtype), xp, dtype)
    with pytest.raises(TypeError, match=r"^z: expected a real floating dtype"):
        _call(f, z, xp)


@pytest.mark.parametrize("f", ALL, ids=_name)
def test_zero_dim_logits(xp, f):
    with pytest.raises(ValueError, match=r"^z: .*0-d"):
        _call(f, to_xp(np.array(1.0), xp), xp)


@pytest.mark.parametrize("f", ALL, ids=_name)
def test_empty_class_axis(xp, f):
    with pytest.raises(ValueError, match=r"^z: the class axis .* size 0"):
        _call(f, to_xp(np.zeros((3, 0)), xp), xp)


@pytest.mark.parametrize("f", ALL, ids=_name)
def test_not_an_array(f):
    with pytest.raises(TypeError, match=r"^z: expected an array, got builtins.list"):
        f([0.0, 1.0]) if f in Z_ONLY else f([0.0, 1.0], np.ones(2))


@pytest.mark.parametrize(("f", "arg"), WITH_VECTOR, ids=lambda x: _name(x) if callable(x) else x)
def test_vector_argument_checks(xp, f, arg):
    z = to_xp(np.zeros((2, 3)), xp)
    with pytest.raises(ValueError, match=rf"^{arg}: expected a trailing axis of size C=3, got shape \(2, 4\)"):
        f(z, to_xp(np.zeros((2, 4)), xp))
    with pytest.raises(ValueError, match=rf"^{arg}: expected a trailing axis"):
        f(z, to_xp(np.array(1.0), xp))
    with pytest.raises(TypeError, match=rf"^{arg}: expected a real floating dtype"):
        f(z, to_xp(np.zeros((2, 3), dtype=np.int32), xp, "int32"))
    with pytest.raises(ValueError, match=r"^z: contains NaN"):
        f(to_xp(np.full((2, 3), np.nan), xp), to_xp(np.zeros((2, 3)), xp))


@pytest.mark.parametrize(("f", "arg"), WITH_VECTOR, ids=lambda x: _name(x) if callable(x) else x)
def test_arrays_from_two_namespaces(f, arg):
    """numpy logits with a torch vector (and the reverse): a TypeError naming both arguments."""
    torch = pytest.importorskip("torch")
    z, v = np.zeros((2, 3)), torch.zeros((2, 3), dtype=torch.float64)
    expected = rf"^z and {arg}: arrays from different namespaces \(z is numpy.ndarray, {arg} is torch.Tensor\)"
    with pytest.raises(TypeError, match=expected):
        f(z, v)
    with pytest.raises(TypeError, match=rf"^z and {arg}: arrays from different namespaces"):
        f(torch.zeros((2, 3), dtype=torch.float64), np.zeros((2, 3)))


def test_envelope_matvec_checks_its_vector():
    torch = pytest.importorskip("torch")
    env = simplex.upper_envelope(np.zeros((2, 3)), "diag")
    with pytest.raises(TypeError, match=r"^diagonal and v: arrays from different namespaces"):
        env.matvec(torch.zeros((2, 3), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^v: expected a trailing axis of size C=3"):
        env.matvec(np.zeros((2, 4)))


# ----------------------------------------------------------------------------- options

Z3 = np.array([[0.0, 1.0, 2.0]])


@pytest.mark.parametrize("k", [0, -1, 1.0, True, "2", None])
def test_bad_k(k):
    with pytest.raises(ValueError, match=r"^k: expected a positive integer"):
        simplex.top_eigpair(Z3, k=k)


def test_k_larger_than_c():
    with pytest.raises(ValueError, match=r"^k: expected at most C=3"):
        simplex.top_eigpair(Z3, k=4)


@pytest.mark.parametrize("rank", [0, -2, 2.0, False, "1", None])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match=r"^rank: expected a positive integer"):
        simplex.lower_envelope(Z3, rank=rank)


def test_rank_larger_than_c():
    with pytest.raises(ValueError, match=r"^rank: expected at most C=3"):
        simplex.lower_envelope(Z3, rank=4)


@pytest.mark.parametrize("kind", ["Diag", "", "lower", None, 1])
def test_bad_kind(kind):
    with pytest.raises(ValueError, match=r"^kind: expected one of \('diag', 'diag2', 'scalar'\)"):
        simplex.upper_envelope(Z3, kind=kind)


@pytest.mark.parametrize("steps", [-1, 2.5, True, "8"])
@pytest.mark.parametrize("f", [simplex.eigh, simplex.eigvalsh, simplex.top_eigpair], ids=_name)
def test_bad_steps(f, steps):
    with pytest.raises(ValueError, match=r"^steps: expected a non-negative integer"):
        f(Z3, steps=steps)


def test_c1_is_valid(xp):
    """C = 1 is a valid input everywhere: I_Δ = 0 and its spectrum is {0}."""
    skip_backend(xp, "jax", JAX_NEW_SHAPE)
    z = to_xp(np.array([[0.3], [-2.0]]), xp)
    for f in ALL:
        _call(f, z, xp)
    assert np.all(to_numpy(simplex.fim(z)) == 0)
    assert np.all(to_numpy(simplex.eigvalsh(z)) == 0)
    lo, hi = simplex.lambda_max_bounds(z)
    assert np.all(to_numpy(lo) == 0) and np.all(to_numpy(hi) == 0)


@pytest.mark.parametrize(("rows", "match"), [
    ([[np.nan, np.inf, 0.0]], "NaN"),          # NaN beside +inf: the row maximum is NaN
    ([[0.0, 1.0, 2.0], [1.0, np.nan, 0.0]], "NaN"),
    ([[0.0, 1.0, np.inf]], r"\+inf"),
    ([[0.0, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf]], "every logit equal to -inf"),
])
def test_one_pass_value_check_finds_each_problem(xp, rows, match):
    """The row-maximum check (NaN propagates through max) finds a bad entry wherever it sits."""
    z = to_xp(np.array(rows), xp)
    with pytest.raises(ValueError, match=rf"^z: .*{match}"):
        simplex.probs(z)
    p = to_numpy(simplex.probs(to_xp(np.array([[0.0, -np.inf, 1.0]]), xp)))  # one -inf is allowed
    np.testing.assert_allclose(p, [[1 / (1 + np.e), 0.0, np.e / (1 + np.e)]], rtol=1e-12)
