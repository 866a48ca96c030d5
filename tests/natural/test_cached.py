"""Preconditioner (cached factorisations): applying it equals the fresh solve, and a dense float64 one."""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib.estimators._running import layout
from fisherlib.natural import Curvature, Preconditioner, precondition
from tests._backends import to_numpy, to_xp
from tests.natural.test_precondition import CASES, _flat, _setup, _structured

KINDS = [("diag", "diag", "auto"), ("quasidiag", "quasidiag", "auto"), ("ollivier", "quasidiag", "auto"),
         ("unitwise", "quasidiag", "woodbury"), ("unitwise", "unitwise", "dense"), ("blocks", "blocks", "auto")]


def _leaves(tree, names):
    return [tree[n] for n in names]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind,structure,unit_solve", KINDS)
def test_cached_application_equals_the_fresh_solve(xp, case, kind, structure, unit_solve):
    if "jax" in xp.__name__ and kind in ("unitwise", "blocks") and unit_solve != "woodbury":
        pytest.skip("JAX compiles every inverse anew (seconds); numpy and torch cover the dense paths")
    lam = 0.05
    lay, terms, g, F, idx, unit_idx = _setup(case, structure, seed=1 if kind == "quasidiag" else 0)
    curv = Curvature(lay, {k: to_xp(v, xp) for k, v in terms.items()})
    gx = {n: to_xp(v, xp) for n, v in g.items()}
    be = "numpy" if "numpy" in xp.__name__ else None
    fresh = precondition(gx, curv, kind, lam, unit_solve=unit_solve, backend=be)
    pre = Preconditioner(curv, kind, lam, unit_solve=unit_solve)
    for _ in range(3):  # the dense kinds solve on the first use, invert on the second, keep the inverse
        got = pre.apply(_leaves(gx, lay.names))
        for n, v in zip(lay.names, got):
            assert tuple(v.shape) == tuple(g[n].shape)
            np.testing.assert_allclose(to_numpy(v), to_numpy(fresh[n]), rtol=1e-10, atol=1e-12)
    if unit_solve != "woodbury" and kind != "ollivier":  # dense reference (AKO kinds: test_precondition)
        A = _structured(F, kind, idx, unit_idx, lay.names) + lam * np.eye(F.shape[0])
        ref = np.linalg.solve(A, _flat(g, idx, F.shape[0]))
        np.testing.assert_allclose(_flat(dict(zip(lay.names, map(to_numpy, got))), idx, F.shape[0]), ref,
                                   rtol=1e-8, atol=1e-10)


def test_quasidiag_mixes_arrowhead_and_ollivier_units_as_precondition_does():
    """Units whose arrowhead matrix is indefinite get Ollivier's step in the cache too."""
    rng = np.random.default_rng(3)
    U, n = 6, 5
    lay = layout(["w", "b"], [(U, n), (U,)], "quasidiag")
    dw = rng.uniform(0.5, 1.0, size=(U, n))
    db = rng.uniform(0.5, 1.0, size=U)
    c = 0.9 * np.sqrt(dw * db[:, None]) * rng.choice([-1, 1], size=(U, n))  # every 2×2 psd
    c[::2] *= 0.1  # even units: definite arrowhead; odd ones: Schur complement < 0
    curv = Curvature(lay, {"diag:w": dw, "diag:b": db, "cross:w": c})
    from fisherlib.natural._solve import arrowhead_definite

    ok = arrowhead_definite(dw, db, c, 1e-3)
    assert ok.any() and not ok.all()
    g = {"w": rng.normal(size=(U, n)), "b": rng.normal(size=U)}
    fresh = precondition(g, curv, "quasidiag", 1e-3)
    got = Preconditioner(curv, "quasidiag", 1e-3).apply([g["w"], g["b"]])
    np.testing.assert_allclose(got[0], fresh["w"], rtol=1e-10)
    np.testing.assert_allclose(got[1], fresh["b"], rtol=1e-10)


def test_pinv_and_matches():
    lay, terms, g, F, idx, unit_idx = _setup("torch", "blocks")
    curv = Curvature(lay, terms)
    pre = Preconditioner(curv, "blocks", 0.0, pinv=True, rtol=1e-12)
    got = dict(zip(lay.names, pre.apply(_leaves(g, lay.names))))
    A = _structured(F, "blocks", idx, unit_idx, lay.names)
    np.testing.assert_allclose(_flat(got, idx, len(A)), np.linalg.pinv(A) @ _flat(g, idx, len(A)), rtol=1e-7)
    assert pre.matches(curv, 0.0)
    assert not pre.matches(curv, 1e-3)  # a changed λ invalidates the factorisation
    assert not pre.matches(Curvature(lay, terms), 0.0)  # so does a refreshed estimate


def test_errors_are_named():
    lay, terms, g, *_ = _setup("torch", "diag")
    curv = Curvature(lay, terms)
    with pytest.raises(ValueError, match="bias–weight terms"):
        Preconditioner(curv, "quasidiag")
    with pytest.raises(ValueError, match="kind"):
        Preconditioner(curv, "newton")
    with pytest.raises(ValueError, match="unit_solve"):
        Preconditioner(curv, "unitwise", unit_solve="lu")
    with pytest.raises(ValueError, match="damping"):
        Preconditioner(curv, "diag", -1.0)
    with pytest.raises(TypeError, match="curvature"):
        Preconditioner(terms, "diag")
    with pytest.raises(ValueError, match="grads"):
        Preconditioner(curv, "diag").apply([g[lay.names[0]]])


def _scaled_case(structure, s):
    """The "torch" case's Fisher terms and gradient with the weight's inputs scaled by s:
    F' = S F S and g' = S g with S = s on the weight's entries, 1 elsewhere."""
    from tests.natural.test_precondition import _index_map

    lay, terms, g, F, idx, unit_idx = _setup("torch", structure)
    w = idx["0.weight"].ravel()
    S = np.ones(F.shape[0])
    S[w] = s
    Fs = F * S[:, None] * S[None, :]
    terms_s = {}
    for key, v in terms.items():
        kind, name = key.split(":", 1)
        if kind == "diag":
            terms_s[key] = np.diagonal(Fs)[idx[name]]
        elif kind == "cross":
            terms_s[key] = Fs[unit_idx[:, :-1], unit_idx[:, -1:]]
        elif kind == "unit":
            terms_s[key] = Fs[unit_idx[:, :, None], unit_idx[:, None, :]]
        else:
            terms_s[key] = Fs[np.ix_(idx[name].ravel(), idx[name].ravel())]
    g_s = {n: v * (s if n == "0.weight" else 1.0) for n, v in g.items()}
    assert _index_map(lay.names, lay.shapes)["0.weight"].shape == (3, 4)
    return lay, terms, g, terms_s, g_s, F, idx, unit_idx


@pytest.mark.parametrize("kind,structure,unit_solve", KINDS)
def test_relative_damping_makes_the_step_invariant_to_a_layers_input_scale(kind, structure, unit_solve):
    """Scaling a layer's inputs by s scales its weights' Fisher by s² (and their bias–weight terms
    by s) and their gradient by s: with relative_damping the weights' step scales by 1/s and every
    other leaf's is unchanged (the same step in function space); with an absolute λ it is not."""
    s = 16.0
    lay, terms, g, terms_s, g_s, *_ = _scaled_case(structure, s)
    steps = {}
    for relative in (True, False):
        for tag, (t, gg) in {"1": (terms, g), "s": (terms_s, g_s)}.items():
            pre = Preconditioner(Curvature(lay, t), kind, 0.05, unit_solve=unit_solve, relative_damping=relative)
            steps[relative, tag] = dict(zip(lay.names, pre.apply(_leaves(gg, lay.names))))
    back = {n: v * (s if n == "0.weight" else 1.0) for n, v in steps[True, "s"].items()}
    for n in lay.names:
        np.testing.assert_allclose(back[n], steps[True, "1"][n], rtol=1e-9, atol=1e-13, err_msg=n)
    back_abs = {n: v * (s if n == "0.weight" else 1.0) for n, v in steps[False, "s"].items()}
    assert not all(np.allclose(back_abs[n], steps[False, "1"][n], rtol=1e-3) for n in lay.names)


@pytest.mark.parametrize("kind,structure,unit_solve", [k for k in KINDS if k[2] != "woodbury"])
def test_relative_damping_is_a_dense_solve_with_per_leaf_lambda(kind, structure, unit_solve):
    """λ_l = ρ · mean diag F over leaf l: the step equals precondition() of the Fisher with λ_l
    added to each leaf's diagonal (and, for the dense kinds, a float64 solve of F̃ + diag(λ))."""
    rho = 0.3
    lay, terms, g, F, idx, unit_idx = _setup("torch", structure, seed=1 if kind == "quasidiag" else 0)
    lam = {n: rho * float(np.mean(np.diagonal(F)[idx[n].ravel()])) for n in lay.names}
    shifted = {}
    for key, v in terms.items():
        kind_, name = key.split(":", 1)
        if kind_ == "diag":
            shifted[key] = v + lam[name]
        elif kind_ == "block":
            shifted[key] = v + lam[name] * np.eye(v.shape[0])
        elif kind_ == "unit":
            d = np.r_[np.full(v.shape[-1] - 1, lam["0.weight"]), lam["0.bias"]]
            shifted[key] = v + np.diag(d)
        else:
            shifted[key] = v
    want = precondition(g, Curvature(lay, shifted), kind, 0.0, unit_solve=unit_solve)
    got = Preconditioner(Curvature(lay, terms), kind, rho, unit_solve=unit_solve, relative_damping=True)
    for n, v in zip(lay.names, got.apply(_leaves(g, lay.names))):
        np.testing.assert_allclose(v, want[n], rtol=1e-10, atol=1e-13, err_msg=n)
    if kind in ("diag", "blocks") or unit_solve == "dense":
        A = _structured(F, kind, idx, unit_idx, lay.names)
        lam_vec = np.zeros(F.shape[0])
        for n in lay.names:
            lam_vec[idx[n].ravel()] = lam[n]
        ref = np.linalg.solve(A + np.diag(lam_vec), _flat(g, idx, F.shape[0]))
        np.testing.assert_allclose(_flat(dict(zip(lay.names, got.apply(_leaves(g, lay.names)))), idx, F.shape[0]),
                                   ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="damping"):
        Preconditioner(Curvature(lay, terms), kind, 0.0, unit_solve=unit_solve, relative_damping=True)
