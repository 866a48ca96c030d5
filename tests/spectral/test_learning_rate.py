"""λ_max against the cross-entropy Hessian of a linear softmax model, and 2/λ_max as a step size.

For z = W x + b the logits are linear in θ, so the Hessian of the summed cross-entropy is
Σ_x J_xᵀ (diag p − ppᵀ) J_x = F exactly: gradient descent near the minimum is stable for
η < 2/λ_max(F) and unstable above.
"""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib import backends
from fisherlib.models import Linear
from fisherlib.spectral import fisher_spectrum
from tests.estimators.fisher_reference import dense_fisher, jacobians

D, C, N = 3, 3, 150


@pytest.fixture(scope="module")
def problem():
    """Random inputs with random labels (not separable: a finite minimum), θ* by Newton's method."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    y = rng.integers(0, C, size=N)
    model = Linear(D, C)
    be = backends.get("numpy")
    theta = model.init(seed=1)
    for _ in range(40):  # Newton with the exact Hessian F (pseudo-inverse: F is singular along shifts)
        g = flat(grad(model, theta, x, y))
        z, J = jacobians(be, model, theta, x)
        step = np.linalg.lstsq(dense_fisher(J, z), g, rcond=1e-12)[0]
        theta = unflat(flat(theta) - step)
    assert np.abs(flat(grad(model, theta, x, y))).max() < 1e-10
    return model, theta, x, y


def flat(tree):
    return np.concatenate([tree["weight"].ravel(), tree["bias"].ravel()])


def unflat(v):
    return {"weight": v[:C * D].reshape(C, D), "bias": v[C * D:]}


def loss(model, theta, x, y):
    z = model.forward(theta, x)
    z = z - z.max(axis=1, keepdims=True)
    return float(np.sum(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


def grad(model, theta, x, y):
    z = model.forward(theta, x)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return model.vjp(theta, x, p - np.eye(C)[y])


def test_lambda_max_is_the_hessians(problem):
    torch = pytest.importorskip("torch")
    model, theta, x, y = problem
    s = fisher_spectrum(model, theta, x, k=2, method="estimate")
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)

    def ce(v):
        w, b = v[:C * D].reshape(C, D), v[C * D:]
        return torch.nn.functional.cross_entropy(xt @ w.T + b, yt, reduction="sum")

    H = torch.autograd.functional.hessian(ce, torch.as_tensor(flat(theta))).numpy()
    top = np.linalg.eigvalsh(H)[::-1][:2]
    np.testing.assert_allclose(s.eigenvalues, top, rtol=1e-9)
    assert np.all(s.residuals < 1e-8 * top[0])
    # The mean loss has the Hessian F / N: reduction="mean" gives its step bound.
    m = fisher_spectrum(model, theta, x, method="exact", bounds=False, reduction="mean")
    assert m.lr_max == pytest.approx(N * s.lr_max, rel=1e-9)


@pytest.mark.parametrize("start", ["top eigenvector", "random"])
def test_gradient_descent_stable_below_2_over_lambda_max(problem, start):
    model, theta, x, y = problem
    s = fisher_spectrum(model, theta, x, method="estimate", bounds=False)
    rng = np.random.default_rng(2)
    if start == "random":
        d = rng.normal(size=C * D + C)
        d -= d.mean()
    else:
        d = np.concatenate([s.eigenvector(0)["weight"].ravel(), s.eigenvector(0)["bias"].ravel()])
    delta0 = 1e-4 * d / np.linalg.norm(d)
    L0 = loss(model, theta, x, y)

    def run(eta, steps):
        v = flat(theta) + delta0
        gaps = []
        for _ in range(steps):
            v = v - eta * flat(grad(model, unflat(v), x, y))
            gaps.append(loss(model, unflat(v), x, y) - L0)
        return np.linalg.norm(v - flat(theta)), np.array(gaps)

    gap0 = loss(model, unflat(flat(theta) + delta0), x, y) - L0
    dist, gaps = run(0.9 * s.lr_max, 150)
    if start == "top eigenvector":  # contracts by |1 − 1.8| = 0.8 per step
        assert dist < 1e-6 * np.linalg.norm(delta0)
    else:  # every step lowers the loss (η < 2/λ_max on a near-quadratic)
        assert gaps[-1] < 0.5 * gap0 and np.all(np.diff(gaps) < 1e-12 * L0)
    dist, gaps = run(1.2 * s.lr_max, 150)  # grows by |1 − 2.4| = 1.4 per step along the top
    assert dist > 100 * np.linalg.norm(delta0)
    assert gaps[-1] > 100 * gap0
