"""fisherlib's K-FAC and EK-FAC against curvlinops' and nngeometry's, dense, in float64.

The variants they share: the exact ("type-2") and empirical Fisher's factors, the expand and
reduce settings on a convolution (curvlinops), and the closed-form Fisher (nngeometry); EK-FAC
with its diagonal re-fitted from per-example gradients. Each must agree to 1e-6 relative (the
issue's bar; they agree to rounding). A missing peer is skipped with the reason.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import fisherlib  # noqa: E402

from . import models as M  # noqa: E402
from . import peer_calls as P  # noqa: E402

RTOL = 1e-6
N = 8


def _need(peer):
    if not P.available(peer):
        pytest.skip(f"{peer} is not installed (pip install 'fisherlib[bench]')")


def _close(ours, theirs):
    ours = ours.detach()
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err < RTOL, err


CASES = {"mlp": (lambda: M.mlp((6, 8, 5)), (6,)), "cnn": (lambda: M.cnn((2, 6, 6), (3,), 5), (2, 6, 6))}


@pytest.mark.parametrize("ekfac", [False, True], ids=["kfac", "ekfac"])
@pytest.mark.parametrize("method", ["exact", "empirical"])
@pytest.mark.parametrize("setting", ["expand", "reduce"])
@pytest.mark.parametrize("name", list(CASES))
def test_curvlinops(name, setting, method, ekfac):
    _need("curvlinops")
    if name == "mlp" and setting == "reduce":
        pytest.skip("no shared positions: reduce is expand")
    make, shape = CASES[name]
    # Reduce's A averages patches over an input: with fewer inputs than patch entries (19) it is
    # singular, and EK-FAC's diagonal then depends on which basis of its null space eigh returns.
    n = 4 * N if setting == "reduce" else N
    model, x, y = make(), M.inputs(shape, n), M.labels(n, 5)
    theirs = P.curvlinops_kfac_dense(model, x, y, fisher_type="type-2" if method == "exact" else "empirical",
                                     kfac_approx=setting, ekfac=ekfac, batch_size=n // 2)
    ours = fisherlib.fisher(model, None, [(x[:n // 2], y[:n // 2]), (x[n // 2:], y[n // 2:])],
                            structure="ekfac" if ekfac else "kfac", method=method, kfac_approx=setting)
    _close(ours.to_dense(), theirs)


@pytest.mark.parametrize("ekfac", [False, True], ids=["kfac", "ekfac"])
@pytest.mark.parametrize("name", list(CASES))
def test_nngeometry(name, ekfac):
    _need("nngeometry")
    make, shape = CASES[name]
    model, x = make(), M.inputs(shape, N)
    theirs = P.nngeometry_kfac_dense(model, x, ekfac=ekfac)
    ours = fisherlib.fisher(model, None, [x], structure="ekfac" if ekfac else "kfac", method="exact")
    _close(ours.to_dense(), theirs)


def test_the_empirical_fisher_is_not_the_fisher():
    """Guard against a vacuous pass: the empirical K-FAC does not match curvlinops' type-2."""
    _need("curvlinops")
    model, x, y = M.mlp((6, 8, 5)), M.inputs((6,), N), M.labels(N, 5)
    theirs = P.curvlinops_kfac_dense(model, x, y)
    ours = fisherlib.fisher(model, None, [(x, y)], structure="kfac", method="empirical").to_dense()
    assert float((ours - theirs).abs().max() / theirs.abs().max()) > 1e-2
