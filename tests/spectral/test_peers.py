"""λ_max and tr F agree with curvlinops (GGN of the summed cross-entropy = F) on the same network."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("curvlinops")
torch = pytest.importorskip("torch")

from fisherlib.spectral import fisher_spectrum  # noqa: E402
from tests.peers import models  # noqa: E402
from tests.spectral import _peers  # noqa: E402


@pytest.fixture(scope="module")
def net():
    model = models.mlp((6, 8, 5))
    x = models.inputs((6,), 40)
    y = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(2))
    return model, x, y


@pytest.mark.slow
def test_lambda_max_agrees_with_curvlinops(net):
    model, x, y = net
    theirs = _peers.curvlinops_lambda_max(model, x, y, tol=1e-12)
    ours, res = _peers.fisherlib_lambda_max(model, x, tol=1e-12)
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert res < 1e-8 * ours
    assert _peers.fisherlib_lambda_max_eigsh(model, x, tol=1e-12) == pytest.approx(theirs, rel=1e-9)


def test_trace_agrees_with_curvlinops(net):
    model, x, y = net
    from tests.peers.peer_calls import curvlinops_operator

    A = curvlinops_operator(model, x, y)
    P = A.shape[0]
    dense = (A @ torch.eye(P, dtype=torch.float64)).numpy()  # curvlinops' F, column by column
    exact = fisher_spectrum(model, None, [x], method="exact", bounds=False)
    assert exact.trace == pytest.approx(np.trace(dense), rel=1e-10)
    assert exact.lambda_max == pytest.approx(np.linalg.eigvalsh(dense)[-1], rel=1e-10)
    assert exact.m2 * P == pytest.approx(np.sum(dense ** 2), rel=1e-10)
    # Both Hutchinson traces are unbiased: each within a few standard errors of the exact one.
    ours, se = _peers.fisherlib_trace(model, x, probes=64)
    assert abs(ours - exact.trace) < 4 * se
    theirs = [_peers.curvlinops_trace(model, x, y, matvecs=16, seed=s) for s in range(8)]
    assert abs(np.mean(theirs) - exact.trace) < 4 * np.std(theirs, ddof=1) / np.sqrt(8)
