"""fisherlib's exact diagonal against the peers' (BackPACK, nngeometry, curvlinops, kfac-jax).

On small float64 models the diagonal of F = Σ_x J_xᵀ I(z_x) J_x from ``fisher(...,
method="exact")`` must equal each peer's exact GGN/Fisher diagonal to 1e-8 relative (for these
losses the GGN is the Fisher: the Hessian of cross-entropy in the logits is I(z)). The peers'
conventions (mean vs sum) are checked explicitly, and fisherlib's empirical Fisher, which is a
different matrix, must *not* pass the same comparison. A missing peer is skipped with the
reason; the peers come with ``pip install 'fisherlib[bench]'``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import fisherlib  # noqa: E402

from . import models as M  # noqa: E402
from . import peer_calls as P  # noqa: E402

RTOL = 1e-8
N = 7

MODELS = {
    "mlp": (lambda C: M.mlp((6, 8, C)), (6,)),
    "cnn": (lambda C: M.cnn((2, 6, 6), (3,), C), (2, 6, 6)),
}


def _need(peer):
    if not P.available(peer):
        pytest.skip(f"{peer} is not installed (pip install 'fisherlib[bench]')")


def _case(name, C=5, likelihood="softmax"):
    make, shape = MODELS[name]
    model = make(C)
    x = M.inputs(shape, N)
    y = M.labels(N, C, multilabel=likelihood == "sigmoid")
    return model, x, y


def _exact(model, x, likelihood="softmax", reduction="sum"):
    est = fisherlib.fisher(model, None, x, method="exact", likelihood=likelihood, reduction=reduction)
    return M.flat(est.value)


def _rel(a, ref):
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float((a - ref).abs().max() / ref.abs().max())


def _peer_exact(peer, model, x, y, likelihood):
    if peer == "backpack":
        return P.backpack_diag(model, x, y, likelihood=likelihood)
    if peer == "nngeometry":
        return P.nngeometry_diag(model, x, likelihood=likelihood)
    return P.curvlinops_exact_diag(model, x, y, likelihood=likelihood)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("peer", ["backpack", "nngeometry", "curvlinops"])
def test_exact_diag_softmax(peer, name):
    _need(peer)
    model, x, y = _case(name)
    ref = _exact(model, x)
    assert _rel(_peer_exact(peer, model, x, y, "softmax"), ref) < RTOL


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("peer", ["nngeometry", "curvlinops"])
def test_exact_diag_sigmoid_multilabel(peer, name):
    _need(peer)
    model, x, y = _case(name, likelihood="sigmoid")
    ref = _exact(model, x, "sigmoid")
    assert _rel(_peer_exact(peer, model, x, y, "sigmoid"), ref) < RTOL


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_diag_sigmoid_binary_backpack(name):
    # BackPACK's BCEWithLogitsLoss takes scalar predictions only (one logit per input).
    _need("backpack")
    model, x, y = _case(name, C=1, likelihood="sigmoid")
    ref = _exact(model, x, "sigmoid")
    assert _rel(P.backpack_diag(model, x, y, likelihood="sigmoid"), ref) < RTOL


def test_mean_reduction_factor():
    """Every peer's "mean" is fisherlib's reduction="mean": the sum divided by N exactly."""
    model, x, y = _case("mlp")
    total, mean = _exact(model, x), _exact(model, x, reduction="mean")
    assert _rel(mean * N, total) < 1e-14
    checked = 0
    if P.available("backpack"):
        assert _rel(P.backpack_diag(model, x, y, reduction="mean"), mean) < RTOL
        checked += 1
    if P.available("nngeometry"):  # nngeometry always averages over its examples
        assert _rel(P.nngeometry_diag(model, x, as_given=True), mean) < RTOL
        checked += 1
    if P.available("curvlinops"):
        assert _rel(P.curvlinops_exact_diag(model, x, y, reduction="mean"), mean) < RTOL
        checked += 1
    if not checked:
        pytest.skip("no peer installed")


def test_comparison_has_power():
    """The empirical Fisher (observed labels) is a different matrix: the same check must fail."""
    _need("backpack")
    model, x, y = _case("mlp")
    emp = fisherlib.fisher(model, None, [(x, y)], method="empirical")
    assert _rel(M.flat(emp.value), P.backpack_diag(model, x, y)) > 1e-2
    # and a diagonal off by the factor N (a mean taken for a sum) fails too
    assert _rel(_exact(model, x, reduction="mean"), P.backpack_diag(model, x, y)) > 0.5


@pytest.mark.parametrize("peer", ["backpack", "nngeometry", "curvlinops"])
def test_stochastic_peers_are_unbiased(peer):
    """The random peer rows of benchmarks/peers, scaled to a sum, average to the exact diagonal.

    R independent estimates; every entry's mean lies within 5 standard errors of the exact
    value (plus 1e-12 for entries that are zero). This pins the scaling the benchmark uses.
    """
    _need(peer)
    model, x, y = _case("mlp")
    ref = _exact(model, x)
    R = 300
    if peer == "backpack":
        draws = [P.backpack_diag(model, x, y, mc_samples=1, seed=s) for s in range(R)]
    elif peer == "nngeometry":
        draws = [P.nngeometry_diag(model, x, trials=1, seed=s) for s in range(R)]
    else:
        draws = [P.curvlinops_hutchinson_diag(model, x, y, num_matvecs=1, seed=s) for s in range(R)]
    d = torch.stack(draws)
    se = d.std(0) / R**0.5
    assert bool(((d.mean(0) - ref).abs() <= 5 * se + 1e-12).all())
    # a wrong factor (the mean taken for the sum) is caught by the same check
    assert not bool(((d.mean(0) / N - ref).abs() <= 5 * se + 1e-12).all())

