"""precondition() on gradient trees against a dense float64 solve of the same structured, damped matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fisherlib import natural
from fisherlib.estimators._running import layout, to_units, units
from fisherlib.natural import Curvature, precondition
from tests._backends import to_numpy, to_xp

# torch-style (out, in) weight + bias, flax-style (in, out) kernel + bias, and a lone vector.
CASES = {
    "torch": (["0.weight", "0.bias", "scale"], [(3, 4), (3,), (2,)]),
    "flax": (["Dense_0.bias", "Dense_0.kernel", "scale"], [(3,), (4, 3), (2,)]),
}


def _index_map(names, shapes):
    """For each leaf, the flat indices of its entries in the concatenated parameter vector."""
    offs = np.cumsum([0] + [math.prod(s) for s in shapes])
    return {n: np.arange(offs[i], offs[i + 1]).reshape(s) for i, (n, s) in enumerate(zip(names, shapes))}


def _setup(case, structure, seed=0):
    names, shapes = CASES[case]
    P = sum(math.prod(s) for s in shapes)
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(P, 3 * P))
    F = a @ a.T / (3 * P)
    lay = layout(names, shapes, structure)
    idx = _index_map(names, shapes)
    u = units(names, shapes)[0]
    unit_idx = np.asarray(to_units(u, idx[names[u.weight]], idx[names[u.bias]]))  # (U, S) flat indices
    terms = {}
    for key in lay.keys:
        kind, name = key.split(":", 1)
        if kind == "diag":
            terms[key] = np.diagonal(F)[idx[name]]
        elif kind == "cross":
            terms[key] = F[unit_idx[:, :-1], unit_idx[:, -1:]]
        elif kind == "unit":
            terms[key] = F[unit_idx[:, :, None], unit_idx[:, None, :]]
        else:
            terms[key] = F[np.ix_(idx[name].ravel(), idx[name].ravel())]
    g = {n: rng.normal(size=s) for n, s in zip(names, shapes)}
    return lay, terms, g, F, idx, unit_idx


def _structured(F, kind, idx, unit_idx, names):
    """The dense P×P matrix that each kind approximates F by."""
    P = F.shape[0]
    A = np.diag(np.diagonal(F)).astype(float)
    if kind == "blocks":
        for n in names:
            i = idx[n].ravel()
            A[np.ix_(i, i)] = F[np.ix_(i, i)]
    elif kind in ("quasidiag", "unitwise"):
        for row in unit_idx:
            w, b = row[:-1], row[-1]
            A[w, b] = F[w, b]
            A[b, w] = F[b, w]
            if kind == "unitwise":
                A[np.ix_(row, row)] = F[np.ix_(row, row)]
    return A + np.zeros((P, P))


def _flat(tree, idx, P):
    v = np.zeros(P)
    for n, i in idx.items():
        v[i.ravel()] = np.ravel(tree[n])
    return v


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind,structure", [("diag", "diag"), ("quasidiag", "quasidiag"),
                                            ("unitwise", "unitwise"), ("blocks", "blocks")])
def test_precondition_matches_a_dense_solve(xp, case, kind, structure):
    if case == "torch" and "jax" in xp.__name__:
        pytest.skip("JAX compiles every solve anew (seconds); its layout is the 'flax' case")
    lam = 0.05
    lay, terms, g, F, idx, unit_idx = _setup(case, structure)
    if kind == "quasidiag":  # keep the arrowhead part positive definite
        lay, terms, g, F, idx, unit_idx = _setup(case, structure, seed=1)
    curv = Curvature(lay, {k: to_xp(v, xp) for k, v in terms.items()})
    out = precondition({n: to_xp(v, xp) for n, v in g.items()}, curv, kind, lam,
                       unit_solve="dense", backend="numpy" if "numpy" in xp.__name__ else None)
    A = _structured(F, kind, idx, unit_idx, lay.names) + lam * np.eye(F.shape[0])
    if kind == "quasidiag":
        assert np.all(np.linalg.eigvalsh(A) > 0)
    ref = np.linalg.solve(A, _flat(g, idx, F.shape[0]))
    got = _flat({n: to_numpy(v) for n, v in out.items()}, idx, F.shape[0])
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_unitwise_woodbury_and_ollivier_from_quasidiagonal_terms(case):
    """The O(n) unit-wise paths need only the quasi-diagonal terms; check them against the dense
    AKO matrix (F's diagonal and bias rows, weight–weight entries c_j c_k / F_bb)."""
    lam = 0.05
    lay, terms, g, F, idx, unit_idx = _setup(case, "quasidiag")
    curv = Curvature(lay, terms)
    A = _structured(F, "quasidiag", idx, unit_idx, lay.names)
    for row in unit_idx:
        w, b = row[:-1], row[-1]
        A[np.ix_(w, w)] = np.where(np.eye(len(w), dtype=bool), A[np.ix_(w, w)], np.outer(F[w, b], F[w, b]) / F[b, b])
    ref = np.linalg.solve(A + lam * np.eye(len(A)), _flat(g, idx, len(A)))
    got = precondition(g, curv, "unitwise", lam)  # "auto": no unit blocks kept -> Woodbury
    np.testing.assert_allclose(_flat(got, idx, len(A)), ref, rtol=1e-8, atol=1e-10)
    oll = precondition(g, curv, "ollivier", 1e-9)
    ref0 = np.linalg.solve(A + 1e-9 * np.eye(len(A)), _flat(g, idx, len(A)))
    np.testing.assert_allclose(_flat(oll, idx, len(A)), ref0, rtol=1e-5)


def test_blocks_pinv_and_missing_terms():
    lay, terms, g, F, idx, unit_idx = _setup("torch", "blocks")
    curv = Curvature(lay, terms)
    out = precondition(g, curv, "blocks", 0.0, pinv=True, rtol=1e-12)
    A = _structured(F, "blocks", idx, unit_idx, lay.names)
    np.testing.assert_allclose(_flat(out, idx, len(A)), np.linalg.pinv(A) @ _flat(g, idx, len(A)), rtol=1e-7)
    lay_d, terms_d, *_ = _setup("torch", "diag")
    with pytest.raises(ValueError, match="bias–weight terms"):
        precondition(g, Curvature(lay_d, terms_d), "quasidiag")
    with pytest.raises(ValueError, match="kind"):
        precondition(g, curv, "newton")
    with pytest.raises(ValueError, match="unit_solve"):
        precondition(g, curv, "unitwise", unit_solve="lu")
    with pytest.raises(TypeError, match="curvature"):
        precondition(g, terms, "diag")


def test_from_estimate_matches_from_terms():
    """A FisherEstimate (exact, unit-wise blocks) gives the same step as the dense unit solve."""
    import fisherlib
    from fisherlib.models import MLP

    model = MLP([4, 5, 3])
    params = model.init(seed=0, like=np.zeros(1))
    x = np.random.default_rng(0).normal(size=(16, 4))
    est = fisherlib.fisher(model, params, x, method="exact", structure="blocks", blocks="unitwise")
    curv = Curvature.from_estimate(est, params)
    g = {k: np.ones_like(v) for k, v in params.items()} if isinstance(params, dict) else None
    out = precondition(g, curv, "unitwise", 0.1, unit_solve="dense")
    for name, blk in est.value.items():
        w = next(u for u in curv.layout.units if u.name == name)
        ref = np.linalg.solve(blk + 0.1 * np.eye(blk.shape[-1]), np.ones(blk.shape[:2])[..., None])[..., 0]
        np.testing.assert_allclose(to_units(w, out[name], out[curv.layout.names[w.bias]]), ref, rtol=1e-10)
    diag = fisherlib.fisher(model, params, x, method="exact")
    d = precondition(g, Curvature.from_estimate(diag, params), "diag", 0.1)
    for k in g:
        np.testing.assert_allclose(d[k], 1 / (diag.value[k] + 0.1), rtol=1e-12)


@pytest.mark.parametrize("relative", [False, True])
def test_a_layers_grouped_weight_and_bias_block_preconditions(relative):
    """fisher(structure="blocks", blocks=[[weight, bias], ...]) gives a layer's full block (the
    weight–bias cross terms included): Curvature.from_estimate takes it, found by its "a+b" name
    or by groups= for a named block, and precondition() and Preconditioner solve each group
    jointly, equal to a dense float64 solve of the layer's block + λI (per-leaf λ when relative)."""
    import fisherlib
    from fisherlib.models import MLP

    model = MLP([4, 5, 3])
    params = model.init(seed=0, like=np.zeros(1))
    x = np.random.default_rng(0).normal(size=(16, 4))
    est = fisherlib.fisher(model, params, x, method="exact", structure="blocks",
                           blocks=[["0.weight", "0.bias"], ["1.weight", "1.bias"]], reduction="mean")
    named = fisherlib.fisher(model, params, x, method="exact", structure="blocks", reduction="mean",
                             blocks={"first": ["0.weight", "0.bias"], "second": ["1.weight", "1.bias"]})
    rng = np.random.default_rng(1)
    g = {k: rng.normal(size=v.shape) for k, v in params.items()}
    curv = Curvature.from_estimate(est, params)
    curv_named = Curvature.from_estimate(named, params, groups={"first": ["0.weight", "0.bias"],
                                                                "second": ["1.weight", "1.bias"]})
    steps = natural.Preconditioner(curv, "blocks", 0.1, relative_damping=relative).apply([g[n] for n in curv.layout.names])
    steps_named = natural.Preconditioner(curv_named, "blocks", 0.1, relative_damping=relative).apply(
        [g[n] for n in curv.layout.names])
    fresh = precondition(g, curv, "blocks", 0.1) if not relative else None
    for layer, (w, b) in enumerate((("0.weight", "0.bias"), ("1.weight", "1.bias"))):
        F = est.value[f"{w}+{b}"]
        nw = params[w].size
        lam_w, lam_b = (0.1 * np.mean(np.diagonal(F)[:nw]), 0.1 * np.mean(np.diagonal(F)[nw:])) if relative else (0.1, 0.1)
        lam = np.r_[np.full(nw, lam_w), np.full(params[b].size, lam_b)]
        ref = np.linalg.solve(F + np.diag(lam), np.r_[g[w].ravel(), g[b]])
        i, j = curv.layout.names.index(w), curv.layout.names.index(b)
        for out in (steps, steps_named):
            np.testing.assert_allclose(np.r_[np.ravel(out[i]), out[j]], ref, rtol=1e-10, atol=1e-14)
        if fresh is not None:
            np.testing.assert_allclose(np.r_[fresh[w].ravel(), fresh[b]], ref, rtol=1e-10, atol=1e-14)
        # The leaves' diagonals come out of the group's block.
        np.testing.assert_allclose(np.ravel(curv.diag(i)), np.diagonal(F)[:nw], rtol=0, atol=0)
    with pytest.raises(ValueError, match="groups="):
        Curvature.from_estimate(named, params)
