"""Every public array-level function traces under ``jax.jit`` and ``jax.vmap``, and so do the
estimators' entry points with traced inputs and labels.

A small ``lazy_xp_function``-like harness (array-api-extra's, style.md §1): each case is a
function of arrays whose other arguments are fixed; :func:`_check_jit` compares ``jax.jit(fn)``
with the eager call and ``jax.vmap(fn)`` over a stack of two inputs with the two eager calls, in
float64. The functions of one module are checked in one jitted call (one compilation, the cost
that matters here); a failure names the function.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import fisherlib  # noqa: E402
from fisherlib import hypercube, natural, simplex, spectral  # noqa: E402
from fisherlib.natural import _solve  # noqa: E402
from fisherlib.core import cotangents  # noqa: E402
from fisherlib.estimators import RunningFisher  # noqa: E402
from fisherlib.natural import Curvature, Preconditioner  # noqa: E402

N, C, K = 4, 3, 2


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _check_jit(cases: dict, args: tuple, batched: tuple | None = None):
    """``cases``: {name: fn(*args) -> array or tuple of arrays}. jit of all of them at once
    against the same functions on NumPy copies (eager, compiling nothing); with ``batched`` (the
    args with a leading axis 2), vmap against the NumPy rows."""
    def every(*a):
        return {name: fn(*a) for name, fn in cases.items()}

    eager = every(*(np.asarray(a) for a in args))
    jitted = jax.jit(every)(*args)
    for name in cases:
        for e, j in zip(jax.tree_util.tree_leaves(eager[name]), jax.tree_util.tree_leaves(jitted[name]), strict=True):
            assert isinstance(j, jax.Array) and j.shape == e.shape and j.dtype == e.dtype, name
            np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-9, atol=1e-12, err_msg=f"jit {name}")
    if batched is None:
        return
    mapped = jax.jit(jax.vmap(every))(*batched)
    for row in range(2):
        one = every(*(np.asarray(a[row]) for a in batched))
        for name in cases:
            for e, m in zip(jax.tree_util.tree_leaves(one[name]), jax.tree_util.tree_leaves(mapped[name]), strict=True):
                np.testing.assert_allclose(np.asarray(m[row]), np.asarray(e), rtol=1e-9, atol=1e-12,
                                           err_msg=f"vmap {name}")


def _envelope(e):
    return tuple(getattr(e, f) for f in ("eigenvalues", "eigenvectors", "diag", "scale") if hasattr(e, f))


def test_simplex_and_hypercube_functions_jit_and_vmap():
    z, v = _normal(0, N, C), _normal(1, N, C)
    s = {name: (lambda name: lambda z, v: getattr(simplex, name)(z))(name)
         for name in ("log_probs", "probs", "fim", "factor", "trace", "eigh", "eigvalsh", "lambda_max_bounds",
                      "interlacing_bounds", "trimmed_norm")}
    s.update(matvec=lambda z, v: simplex.matvec(z, v), factor_matvec=lambda z, v: simplex.factor_matvec(z, v),
             factor_rmatvec=lambda z, v: simplex.factor_rmatvec(z, v),
             top_eigpair=lambda z, v: simplex.top_eigpair(z, k=2),
             lower_envelope=lambda z, v: _envelope(simplex.lower_envelope(z, rank=2)),
             upper_envelope=lambda z, v: [_envelope(simplex.upper_envelope(z, kind=k)) for k in ("diag", "diag2", "scalar")])
    assert set(s) == set(simplex.__all__)
    h = {f"hypercube.{name}": (lambda name: lambda z, v: getattr(hypercube, name)(z))(name)
         for name in ("probs", "fim", "eigvalsh", "trace")}
    h.update({f"hypercube.{name}": (lambda name: lambda z, v: getattr(hypercube, name)(z, v))(name)
              for name in ("matvec", "factor_matvec", "factor_rmatvec")})
    assert {n.split(".")[1] for n in h} == set(hypercube.__all__)
    _check_jit({**s, **h}, (z, v), (jnp.stack([z, -z]), jnp.stack([v, 2 * v])))


def test_cotangents_jit_and_vmap():
    z, xi = _normal(2, N, C), _normal(3, K, N, C)
    u = jnp.asarray(np.random.default_rng(4).uniform(size=(K, N)))
    y = jnp.asarray([0, 2, 1, 1])
    cases = {
        "hutchinson": lambda z, xi, u, y: cotangents.hutchinson(z, xi),
        "upper_bound": lambda z, xi, u, y: cotangents.upper_bound(z, xi),
        "lower_bound": lambda z, xi, u, y: cotangents.lower_bound(z, xi[..., :2]),
        "exact_columns": lambda z, xi, u, y: [cotangents.exact_columns(z, lik, b, 2)
                                              for lik, b in (("softmax", None), ("softmax", "upper"),
                                                             ("softmax", "lower"), ("sigmoid", None))],
        "column_source": lambda z, xi, u, y: cotangents.column_source(z)[1](1, C),
        "sample_labels": lambda z, xi, u, y: cotangents.sample_labels(z, u),
        "label_residual": lambda z, xi, u, y: cotangents.label_residual(z, y),
        "training_cotangents": lambda z, xi, u, y: cotangents.training_cotangents(z, y, xi, (y > 0) * 1.0),
        "cross_entropy_and_hutchinson": lambda z, xi, u, y: cotangents.cross_entropy_and_hutchinson(z, y, xi),
        "by_rows": lambda z, xi, u, y: cotangents.by_rows(cotangents.hutchinson, z, xi, budget=4),
        "monte_carlo": lambda z, xi, u, y: cotangents.monte_carlo(z, u),
    }
    assert set(cases) == set(cotangents.__all__)
    _check_jit(cases, (z, xi, u, y),
               (jnp.stack([z, 3 * z]), jnp.stack([xi, -xi]), jnp.stack([u, 1 - u]), jnp.stack([y, 2 - y])))


def _spd(seed, *lead, S):
    a = _normal(seed, *lead, S, S)
    return a @ jnp.swapaxes(a, -1, -2) / S


def test_natural_gradient_solves_jit_and_vmap():
    U, n = 3, 4  # units, fan-in
    gw, gb = _normal(5, U, n), _normal(6, U)
    dw, db = jnp.abs(_normal(7, U, n)) + 1.0, jnp.abs(_normal(8, U)) + 1.0
    cross = 0.1 * _normal(9, U, n)
    blocks = _spd(10, U, S=n + 1)
    lam = 0.1
    cases = {
        "diagonal": lambda gw, gb, dw, db, c, gu, B: natural.diagonal(gw, dw, lam),
        "arrowhead": lambda gw, gb, dw, db, c, gu, B: natural.arrowhead(gw, gb, dw, db, c, lam),
        "arrowhead_definite": lambda gw, gb, dw, db, c, gu, B: _solve.arrowhead_definite(dw, db, c, lam),
        "ollivier": lambda gw, gb, dw, db, c, gu, B: natural.ollivier(gw, gb, dw, db, c, lam),
        "woodbury": lambda gw, gb, dw, db, c, gu, B: natural.woodbury(gw, gb, dw, db, c, lam),
        "unit_blocks": lambda gw, gb, dw, db, c, gu, B: natural.unit_blocks(gu, B, lam),
        "dense": lambda gw, gb, dw, db, c, gu, B: (natural.dense(gu, B, lam), natural.dense(gu, B, lam, pinv=True)),
    }
    assert set(cases) == set(_solve.__all__)
    args = (gw, gb, dw, db, cross, jnp.concatenate([gw, gb[:, None]], 1), blocks)
    _check_jit(cases, args, tuple(jnp.stack([a, 2 * a]) for a in args))


@pytest.mark.parametrize("kind", ["diag", "quasidiag", "ollivier", "unitwise", "blocks"])
def test_preconditioner_apply_jits(kind):
    """A Preconditioner built eagerly applies inside jit (and vmap over gradients), and a jitted
    function may build one from traced terms; the eager one keeps no tracer."""
    names, shapes = ["b", "w"], [(3,), (3, 4)]
    structure = {"diag": "diag", "quasidiag": "quasidiag", "ollivier": "quasidiag"}.get(kind, "unitwise")
    structure = "blocks" if kind == "blocks" else structure
    rf = RunningFisher(structure, probes=3, decay=None)
    rf.update([_normal(11, 3, 3), _normal(12, 3, 3, 4)], names, n=5)
    terms = rf.value
    pre = Preconditioner(Curvature(rf.layout, terms), kind, 0.1)
    g = [_normal(13, 3), _normal(14, 3, 4)]
    eager = pre.apply(g)
    again = jax.jit(pre.apply)(g)
    mapped = jax.vmap(pre.apply)([jnp.stack([a, -a]) for a in g])
    built = jax.jit(lambda t, g: Preconditioner(Curvature(rf.layout, t), kind, 0.1).apply(g))(terms, g)
    for e, a, m, b in zip(eager, again, mapped, built, strict=True):
        for got in (a, m[0], -m[1], b):
            np.testing.assert_allclose(np.asarray(got), np.asarray(e), rtol=1e-9, atol=1e-12)
    for leaf in jax.tree_util.tree_leaves(pre.arrays()):  # no tracer leaked into the eager object
        assert not isinstance(leaf, jax.core.Tracer)
    np.testing.assert_allclose(np.asarray(pre.apply(g)[1]), np.asarray(eager[1]), rtol=1e-9)


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def test_estimators_under_jit_with_traced_inputs_and_labels():
    """fisher() (every method, labels with ignored entries), RunningFisher.step and the Fisher
    operator inside the caller's jit equal their eager results."""
    params = {"w1": _normal(15, 3, 4), "b1": _normal(16, 4), "w2": _normal(17, 4, C), "b2": _normal(18, C)}
    x, y = _normal(19, N, 3), jnp.asarray([0, -100, 2, 1])

    def every(p, x, y):
        out = {m: fisherlib.fisher(_mlp, p, [(x, y)], method=m, probes=1 if m in ("exact", "empirical") else 2,
                                   reduction="mean").value
               for m in ("hutchinson", "mc", "exact", "empirical")}
        out["n_outputs"] = fisherlib.fisher(_mlp, p, [(x, y)], method="exact").n_outputs
        out["step"] = RunningFisher("diag", probes=2, decay=None).step(_mlp, p, x, jnp.maximum(y, 0))
        out["operator"] = spectral.fisher_operator(_mlp, p, [x]).matvec(p)
        return out

    eager, jitted = every(params, x, y), jax.jit(every)(params, x, y)
    assert eager["n_outputs"] == 3 and int(jitted["n_outputs"]) == 3
    for (path, e), j in zip(jax.tree_util.tree_leaves_with_path(eager), jax.tree_util.tree_leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-9, atol=1e-12,
                                   err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------- the compiled batch step


def _eager(be):
    """The same adapter without its compile capability: fisher() then runs op by op."""
    import copy

    out = copy.copy(be)
    out.compile = None
    return out


def test_fisher_compiles_each_batch_step_once_and_agrees_with_the_eager_path():
    from fisherlib.backends import get

    params = {"w1": _normal(20, 3, 4), "b1": _normal(21, 4), "w2": _normal(22, 4, C), "b2": _normal(23, C)}
    xs = [_normal(24 + i, N, 3) for i in range(3)]
    y = jnp.asarray([0, -100, 2, 1])
    traces = []

    def f(p, x):
        traces.append(1)
        return _mlp(p, x)

    be = get("jax")
    cases = [({"probes": 3, "seed": 5}, xs), ({"method": "exact", "structure": "blocks", "blocks": "unitwise"}, xs),
             ({"method": "empirical", "structure": "trace"}, [(x, y) for x in xs])]
    for kw, data in cases:
        a = fisherlib.fisher(f, params, data, backend=be, **kw)
        n = len(traces)
        again = fisherlib.fisher(f, params, data, backend=be, **kw)
        assert len(traces) == n, kw  # the second call reuses the compiled step: no trace at all
        assert a.n_outputs == again.n_outputs == (3 * (N - 1) if "empirical" in kw.values() else 3 * N)
        for u, w in zip(jax.tree_util.tree_leaves(a.value), jax.tree_util.tree_leaves(again.value), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(w))
    # The eager path (op by op: slow to compile, so one case) draws the same probes.
    a = fisherlib.fisher(f, params, xs[:2], backend=be, **cases[0][0])
    b = fisherlib.fisher(_mlp, params, xs[:2], backend=_eager(be), **cases[0][0])
    for u, v in zip(jax.tree_util.tree_leaves((a.value, a.stderr)), jax.tree_util.tree_leaves((b.value, b.stderr)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-14)


def test_compiled_step_shapes_are_traced_once_per_signature():
    """The first batch's abstract evaluation is cached by the arguments' structure, shapes and
    dtypes: a call with the same shapes adds no entry, a new batch size or input dtype adds one
    and still gives the eager path's estimate."""
    from fisherlib.backends import get
    from fisherlib.estimators import _fisher

    params = {"w1": _normal(40, 3, 4), "b1": _normal(41, 4), "w2": _normal(42, 4, C), "b2": _normal(43, C)}
    be = get("jax")
    _fisher._SHAPES.clear()
    for n in (N, N, 6):  # the second call hits the first's entry
        xs = [_normal(44, n, 3), _normal(45, n, 3)]
        a = fisherlib.fisher(_mlp, params, xs, probes=2, seed=3, backend=be)
        b = fisherlib.fisher(_mlp, params, xs, probes=2, seed=3, backend=_eager(be))
        assert a.n_inputs == b.n_inputs == 2 * n
        for u, v in zip(jax.tree_util.tree_leaves(a.value), jax.tree_util.tree_leaves(b.value), strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-14)
    assert len(_fisher._SHAPES) == 2
    wide = {"w1": _normal(46, 3, 5), "b1": _normal(47, 5), "w2": _normal(48, 5, C), "b2": _normal(49, C)}
    a = fisherlib.fisher(_mlp, wide, xs, probes=2, seed=3, backend=be)  # the same function, other parameters
    b = fisherlib.fisher(_mlp, wide, xs, probes=2, seed=3, backend=_eager(be))
    assert a.value["w1"].shape == (3, 5)
    for u, v in zip(jax.tree_util.tree_leaves(a.value), jax.tree_util.tree_leaves(b.value), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-14)
    fisherlib.fisher(_mlp, params, [(_normal(44, N, 3), jnp.asarray([0, 1, 2, 0]))], method="empirical", backend=be)
    assert len(_fisher._SHAPES) == 4  # other options: another step key


@pytest.mark.parametrize("kw", [
    {"probes": 3, "seed": 1},  # probes: the spread of K probes
    {"probes": 3, "seed": 1, "keep_probes": False, "reduction": "mean"},  # kept moments, scaled
    {"probes": 1, "seed": 1, "structure": "blocks", "blocks": "unitwise"},  # the K = 1 bound, blocks
    {"method": "mc", "probes": 1, "seed": 1},  # unavailable: NaN
    {"method": "exact", "structure": "trace"},  # exact: zeros
], ids=["probes", "moments-mean", "bound-blocks", "unavailable", "exact-trace"])
def test_estimate_reads_compiled_equal_the_eager_reads(kw):
    """value and stderr of an estimate made on JAX are read in one compiled call; they equal the
    reads of the same estimate's NumPy copy (op by op), whatever the kind of error bar."""
    params = {"w1": _normal(50, 3, 4), "b1": _normal(51, 4), "w2": _normal(52, 4, C), "b2": _normal(53, C)}
    est = fisherlib.fisher(_mlp, params, [_normal(54, N, 3), _normal(55, N, 3)], **kw)
    assert est._compile is not None
    ref = est.to_numpy()
    for what in ("value", "stderr"):
        got, want = getattr(est, what), getattr(ref, what)
        got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
        assert len(got_leaves) == len(want_leaves) > 0
        for g, w in zip(got_leaves, want_leaves):
            assert isinstance(g, jax.Array)
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-15, equal_nan=True)
    if kw.get("method") == "mc":
        assert np.isnan(np.asarray(jax.tree_util.tree_leaves(est.stderr)[0])).all()


def test_compiled_step_keeps_the_eager_errors():
    params = {"w1": _normal(30, 3, 4), "b1": _normal(31, 4), "w2": _normal(32, 4, C), "b2": _normal(33, C)}
    x = _normal(34, N, 3)
    bad = x.at[2, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="batch 1 gave non-finite logits: contains NaN"):
        fisherlib.fisher(_mlp, params, [x, bad], probes=1)
    with pytest.raises(ValueError, match="batch 1 has labels outside 0..2"):
        fisherlib.fisher(_mlp, params, [(x, jnp.asarray([0, 1, 2, 0])), (x, jnp.asarray([0, 1, 3, 0]))],
                         method="empirical")

    from fisherlib.backends import get

    a = fisherlib.fisher(_mlp, params, [x], method="exact", backend=get("jax", jit=False))  # compiles nothing
    b = fisherlib.fisher(_mlp, params, [x], method="exact")
    for u, v in zip(jax.tree_util.tree_leaves(a.value), jax.tree_util.tree_leaves(b.value), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-12)


def test_running_fisher_step_is_one_compiled_call_equal_to_the_eager_steps():
    """RunningFisher.step with the compile capability (forward, probes, pullback and fold in one
    call) gives the op-by-op path's loss, gradients and estimate, ignored targets included."""
    from fisherlib.backends import get

    params = {"w1": _normal(40, 3, 4), "b1": _normal(41, 4), "w2": _normal(42, 4, C), "b2": _normal(43, C)}
    x, y = _normal(44, N, 3), jnp.asarray([0, -100, 2, 1])
    traces = []

    def f(p, x):
        traces.append(1)
        return _mlp(p, x)

    a = RunningFisher("quasidiag", probes=2, decay=0.9, backend=get("jax"))
    b = RunningFisher("quasidiag", probes=2, decay=0.9, backend=_eager(get("jax")))
    for _ in range(3):
        (la, ga), (lb, gb) = a.step(f, params, x, y), b.step(_mlp, params, x, y)
        np.testing.assert_allclose(float(la), float(lb), rtol=1e-12)
        for u, v in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb), strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-14)
    assert len(traces) == 1 and a.steps == b.steps == 3
    for k in b.value:
        np.testing.assert_allclose(np.asarray(a.value[k]), np.asarray(b.value[k]), rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(np.asarray(a.stderr[k]), np.asarray(b.stderr[k]), rtol=1e-9, atol=1e-14)


def test_fisher_operator_products_compiled_per_batch_equal_the_eager_pass():
    from fisherlib.backends import get

    params = {"w1": _normal(50, 3, 4), "b1": _normal(51, 4), "w2": _normal(52, 4, C), "b2": _normal(53, C)}
    xs = [_normal(54, N, 3), _normal(55, N, 3)]
    V = _normal(56, 2, 3 * 4 + 4 + 4 * C + C)
    for bound in (None, "lower"):
        a = spectral.fisher_operator(_mlp, params, xs, bound=bound, backend=get("jax"))
        b = spectral.fisher_operator(_mlp, params, xs, bound=bound, backend=_eager(get("jax")))
        np.testing.assert_allclose(np.asarray(a.matmat(V)), np.asarray(b.matmat(V)), rtol=1e-10, atol=1e-13)
        assert a.n_inputs == b.n_inputs == 2 * N
        assert a._compiled_matmat(V) is not None and b._compiled_matmat(V) is None  # the path each took
        assert not isinstance(a._compiled_matmat(V), Exception)


def test_logits_in_unit_interval_that_are_not_probabilities_stay_compiled(monkeypatch):
    """Two logits of a fresh model often lie in [0, 1]: only rows that also sum to 1 (what the
    probabilities warning looks for) send the first batch eager; these keep the compiled step
    (no contribution is computed on concrete arrays), and probabilities still warn."""
    from fisherlib.estimators import _fisher
    from fisherlib.estimators._running import LogitsWarning

    params = {"w": _normal(60, 3, 2) * 0.05}
    xs = [_normal(61, N, 3), _normal(62, N, 3)]
    eager_calls = []
    square = _fisher._square

    def spy(g, fresh):
        eager_calls.append(not isinstance(g, jax.core.Tracer))
        return square(g, fresh)

    monkeypatch.setattr(_fisher, "_square", spy)

    def f(p, x):
        return 0.4 + x @ p["w"]  # in [0, 1], rows summing to about 0.8: logits, not probabilities

    assert float(jnp.min(f(params, xs[0]))) > 0 and float(jnp.max(f(params, xs[1]))) < 1
    a = fisherlib.fisher(f, params, xs, probes=2, seed=0)
    assert eager_calls and not any(eager_calls)  # traced only: the compiled step took both batches
    b = fisherlib.fisher(f, params, xs, probes=2, seed=0, backend=_eager(fisherlib.backends.get("jax")))
    assert any(eager_calls)
    for u, v in zip(jax.tree_util.tree_leaves(a.value), jax.tree_util.tree_leaves(b.value), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-14)
    with pytest.warns(LogitsWarning, match="look like"):
        fisherlib.fisher(lambda p, x: jax.nn.softmax(x @ p["w"]), params, xs, probes=1)


def _token_model(p, ids):
    """Every kind of layer the JAX rules take: an embedding, an additive position table, a scale
    and shift, a shared-position dense layer and a head."""
    h = (p["emb"][ids] + p["pos"]) * p["scale"] + p["shift"]
    return jnp.tanh(h @ p["w"] + p["b"]).mean(1) @ p["head"]


@pytest.mark.parametrize("kw", [{"method": "exact"}, {"method": "empirical"}, {"method": "exact", "structure": "trace"},
                                {"method": "exact", "structure": "blocks", "blocks": "unitwise"}, {"probes": 2},
                                {"probes": 2, "per_example": True}, {"method": "mc", "structure": "blocks", "blocks": "unitwise"},
                                {"bound": "lower", "probes": 2}, {"method": "exact", "bound": "lower", "rank": 1},
                                {"structure": "kfac", "probes": 2}, {"structure": "kfac", "method": "empirical"},
                                {"structure": "ekfac", "method": "exact"}])
def test_compiled_step_takes_every_layer_kind(kw, monkeypatch):
    """The compiled step must not fall back to the eager path on a layer kind it cannot trace (an
    embedding's rows present, ``unique_values``, did: every language model ran exact op by op,
    7x slower), and K-FAC's and EK-FAC's steps are compiled too. Repeated token ids within an
    input check the embedding's per-example sums."""
    from fisherlib.backends import get
    from fisherlib.estimators import _fisher

    V, T, D = 11, 5, 3
    params = {"emb": _normal(70, V, D), "pos": _normal(71, T, D), "scale": _normal(72, D), "shift": _normal(73, D),
              "w": _normal(74, D, 4), "b": _normal(75, 4), "head": _normal(76, 4, C)}
    ids = [jnp.asarray([[1, 1, 3, 1, 0], [4, 2, 2, 9, 9], [0, 0, 0, 0, 0], [7, 3, 1, 10, 3]]),
           jnp.asarray([[5, 6, 5, 6, 5], [1, 2, 3, 4, 5], [8, 8, 2, 8, 1], [0, 9, 9, 0, 9]])]
    data = [(x, jnp.asarray([0, 2, 1, 1])) for x in ids] if kw.get("method") == "empirical" else ids
    concrete = []
    cotangents = _fisher._batch_cotangents

    def spy(be, model, params, *rest):
        concrete.append(not isinstance(jax.tree_util.tree_leaves(params)[0], jax.core.Tracer))
        return cotangents(be, model, params, *rest)

    monkeypatch.setattr(_fisher, "_batch_cotangents", spy)
    a = fisherlib.fisher(_token_model, params, data, seed=0, **kw)
    assert concrete and not any(concrete), kw  # traced only: the compiled step took both batches
    n = len(concrete)
    b = fisherlib.fisher(_token_model, params, data, seed=0, backend=_eager(get("jax")), **kw)
    assert all(concrete[n:])
    for u, v in zip(jax.tree_util.tree_leaves((a.value, a.parts)), jax.tree_util.tree_leaves((b.value, b.parts)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-14)


def test_compiled_kfac_steps_are_keyed_by_their_setting():
    """"expand" and "reduce" on one model function are two compiled steps: a step cached under
    the options alone gave the second setting the first one's factors."""
    from fisherlib.backends import get

    V, T, D = 11, 5, 3
    params = {"emb": _normal(80, V, D), "pos": _normal(81, T, D), "scale": _normal(82, D), "shift": _normal(83, D),
              "w": _normal(84, D, 4), "b": _normal(85, 4), "head": _normal(86, 4, C)}
    ids = [jnp.asarray([[1, 1, 3, 1, 0], [4, 2, 2, 9, 9], [0, 0, 0, 0, 0], [7, 3, 1, 10, 3]])]
    with pytest.warns(fisherlib.KroneckerFallbackWarning):
        got = {s: fisherlib.fisher(_token_model, params, ids, structure="kfac", method="exact", kfac_approx=s)
               for s in ("expand", "reduce")}
        want = {s: fisherlib.fisher(_token_model, params, ids, structure="kfac", method="exact", kfac_approx=s,
                                    backend=_eager(get("jax"))) for s in ("expand", "reduce")}
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(want["expand"].parts, want["reduce"].parts))
    for s in got:
        for u, v in zip(got[s].parts, want[s].parts, strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-14)


def test_a_step_that_does_not_trace_runs_op_by_op_with_a_warning(monkeypatch):
    """The compiled step's failure is said, not swallowed (an untraceable core function once sent
    every language model's exact diagonal op by op, silently): fisher(), RunningFisher.step and
    the operator's products warn once the eager path has taken the batch, with its result. A
    function of the compiled steps is made to need concrete values, as unique_values did."""
    from fisherlib.backends import get
    from fisherlib.estimators import _fisher, _running
    from fisherlib.spectral._operator import FisherOperator

    def concrete_only(fn, at=0):
        def wrapped(*args, **kw):
            float(jnp.sum(jax.tree_util.tree_leaves(args[at])[0]))  # raises under a trace
            return fn(*args, **kw)
        return wrapped

    params = {"w1": _normal(90, 3, 4), "b1": _normal(91, 4), "w2": _normal(92, 4, C), "b2": _normal(93, C)}
    xs = [_normal(94, N, 3), _normal(95, N, 3)]
    eager = _eager(get("jax"))
    b = fisherlib.fisher(_mlp, params, xs, method="exact", backend=eager)
    want = spectral.fisher_operator(_mlp, params, xs, backend=eager).matmat(_normal(96, 1, 3 * 4 + 4 + 4 * C + C))
    with warnings.catch_warnings():  # a step that traces: no warning
        warnings.simplefilter("error", fisherlib.CompileFallbackWarning)
        fisherlib.fisher(_mlp, params, xs, method="exact")
    monkeypatch.setattr(_fisher, "_flags", concrete_only(_fisher._flags))
    monkeypatch.setattr(_running, "_whole", concrete_only(_running._whole, at=4))
    monkeypatch.setattr(FisherOperator, "_kernel", concrete_only(FisherOperator._kernel, at=1))
    f = lambda p, x: _mlp(p, x)  # noqa: E731 -- a new function: nothing compiled for it yet
    with pytest.warns(fisherlib.CompileFallbackWarning, match="fisherlib bug") as record:
        a = fisherlib.fisher(f, params, xs, method="exact")
    assert "batch 0" in str(record[0].message) and "ConcretizationTypeError" in str(record[0].message)
    for u, v in zip(jax.tree_util.tree_leaves(a.value), jax.tree_util.tree_leaves(b.value), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-12)
    with pytest.warns(fisherlib.CompileFallbackWarning, match="RunningFisher.step"):
        RunningFisher("diag", probes=1).step(f, params, xs[0], jnp.asarray([0, 1, 2, 0]))
    with pytest.warns(fisherlib.CompileFallbackWarning, match="matmat"):
        got = spectral.fisher_operator(f, params, xs, backend=get("jax")).matmat(
            _normal(96, 1, 3 * 4 + 4 + 4 * C + C))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-13)
