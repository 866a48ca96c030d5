"""EWC inside torch and JAX losses (its gradient against autograd), and tiny end-to-end runs of
pruning and EWC on a torch model (the CI check that the uses work on a trained network)."""

from __future__ import annotations

import numpy as np
import pytest

import fisherlib
from fisherlib.uses import EWC, apply_mask, magnitude_mask, prune_mask, sensitivity


def _torch_net(torch, seed=0, sizes=(6, 16, 4)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.Tanh()] if i < len(sizes) - 2 else [])
    return torch.nn.Sequential(*layers).double()


def test_ewc_gradient_is_autograd_torch():
    torch = pytest.importorskip("torch")
    net = _torch_net(torch)
    x = torch.randn(20, 6, dtype=torch.float64)
    est1 = fisherlib.fisher(net, None, x, method="exact")
    ewc = EWC(3.0).add_task(est1, net)
    with torch.no_grad():  # a second task at moved weights, the anchor given as a dict
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ewc.add_task(fisherlib.fisher(net, None, x, probes=4, seed=1),
                 {n: p.detach().clone() for n, p in net.named_parameters()})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    loss = net(x).square().mean() + ewc.penalty(net)
    loss.backward()
    model_grad = {n: g for n, g in zip(
        [n for n, _ in net.named_parameters()],
        torch.autograd.grad(net(x).square().mean(), list(net.parameters())))}
    analytic = ewc.gradient(net)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, model_grad[n] + analytic[n], rtol=1e-12, atol=1e-12)
    # The stored anchors and Fisher are outside the graph (training in place does not touch them).
    assert not any(t.requires_grad for t in ewc._anchor + ewc._precision)


def test_ewc_gradient_is_jax_grad():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from fisherlib.models import MLP

    if not jax.config.read("jax_enable_x64"):
        pytest.skip("needs float64 (jax_enable_x64)")
    mlp = MLP([5, 7, 3])
    params = mlp.init(seed=1, xp=jnp, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 5)))
    # Plain trees of diag F (a JAX estimate would compile the model's per-example VJPs: slow).
    F1 = jax.tree_util.tree_map(lambda a: a ** 2 + 0.1, params)
    F2 = jax.tree_util.tree_map(lambda a: jnp.abs(a) + 0.5, params)
    ewc = EWC(0.5).add_task(F1, params)
    moved = jax.tree_util.tree_map(lambda a: a + 0.1, params)
    ewc.add_task(F2, moved)

    def loss(p):
        return jnp.mean(mlp.forward(p, x) ** 2) + ewc.penalty(p)

    at = jax.tree_util.tree_map(lambda a: a * 0.5, params)
    got = jax.grad(loss)(at)
    task = jax.grad(lambda p: jnp.mean(mlp.forward(p, x) ** 2))(at)
    want = ewc.gradient(at)
    for k in got:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(task[k] + want[k]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(jax.jit(ewc.penalty)(at)), float(ewc.penalty(at)), rtol=1e-12)


def _two_tasks(seed=0, n=200):
    """Two 2-class Gaussian tasks on the same 6-d inputs, with different discriminating directions."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(2):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 6))
        x[:, 2 * t] += 2.0 * (2 * y - 1)
        x[:, 2 * t + 1] += 1.0 * (2 * y - 1)
        out.append((x, y))
    return out


def _fit(torch, net, x, y, lo, steps, penalty=None, lr=0.05):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(x)[:, lo:lo + 2], y)
        if penalty is not None:
            loss = loss + penalty(net)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _acc(torch, net, x, y, lo):
    with torch.no_grad():
        return float((net(torch.as_tensor(x))[:, lo:lo + 2].argmax(1).numpy() == y).mean())


@pytest.mark.slow
def test_ewc_reduces_forgetting_on_a_tiny_model():
    """Two heads on one trunk: EWC from the exact and the Hutchinson Fisher keeps task 1 better
    than plain fine-tuning, and still learns task 2."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    (x1, y1), (x2, y2) = _two_tasks()

    class Head(torch.nn.Sequential):
        def forward(self, x):
            return super().forward(x)[:, :2]

    results = {}
    for method in ("plain", "exact", "hutchinson"):
        net = _torch_net(torch, seed=3, sizes=(6, 3, 4))  # a narrow trunk: the tasks compete
        _fit(torch, net, x1, y1, 0, 150)
        before = _acc(torch, net, x1, y1, 0)
        penalty = None
        if method != "plain":
            opts = {"method": "exact"} if method == "exact" else {"probes": 8, "seed": 0}
            est = fisherlib.fisher(Head(*net), None, torch.as_tensor(x1), reduction="mean", **opts)
            penalty = EWC(50.0).add_task(est, net).penalty
        _fit(torch, net, x2, y2, 2, 300, penalty=penalty)
        results[method] = (before - _acc(torch, net, x1, y1, 0), _acc(torch, net, x2, y2, 2))
    assert results["plain"][0] > 0.1, results  # there is forgetting to prevent
    for method in ("exact", "hutchinson"):
        assert results[method][0] < 0.5 * results["plain"][0], results
        assert results[method][1] > 0.85, results


@pytest.mark.slow
def test_pruning_a_tiny_model():
    """A trained net with a block of useless inputs: saliency prunes their weights first, so at
    50 % sparsity it keeps the accuracy, and its layer scores have error bars that cover exact."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    (x, y), _ = _two_tasks(seed=1)
    x = x.copy()
    x[:, 2:] *= 20.0  # large, uninformative inputs: their weights are not small, just useless
    net = _torch_net(torch, seed=0)
    with torch.no_grad():
        net[0].weight[:, 2:] *= 0.05  # so that big inputs start sane
    _fit(torch, net, x, y, 0, 200, lr=0.02)
    dense = _acc(torch, net, x, y, 0)
    assert dense > 0.9
    xt = torch.as_tensor(x)
    exact = fisherlib.fisher(net, None, xt, method="exact")
    est = fisherlib.fisher(net, None, xt, probes=16, seed=0)
    weights = ["0.weight", "2.weight"]
    acc = {}
    for name, mask in (("exact", prune_mask(exact, net, 0.5, leaves=weights)),
                       ("hutchinson", prune_mask(est, net, 0.5, leaves=weights)),
                       ("magnitude", magnitude_mask(net, 0.5, leaves=weights))):
        pruned = apply_mask(net, mask)
        with torch.no_grad():
            z = torch.func.functional_call(net, pruned, (xt,))
        acc[name] = float((z[:, :2].argmax(1).numpy() == y).mean())
    assert acc["exact"] > dense - 0.05 and acc["hutchinson"] > dense - 0.05, acc
    s_exact, s_est = sensitivity(exact, net), sensitivity(est, net)
    for layer in s_exact.layers:
        err = abs(s_est.layers[layer] - s_exact.layers[layer])
        assert err < 5 * s_est.layer_stderr[layer] + 1e-12, (layer, err, s_est.layer_stderr[layer])


def test_ewc_with_a_numpy_anchor_trains_torch_parameters():
    """F and θ* given as NumPy arrays, the parameters a torch module (float32, as trained): the
    penalty is a torch scalar whose autograd gradient is λ F ⊙ (θ − θ*), and it works inside
    NaturalGradient's loss, whose step then carries the penalty's pull."""
    torch = pytest.importorskip("torch")
    net = _torch_net(torch).float()
    rng = np.random.default_rng(0)
    anchor = {n: p.detach().numpy().astype(np.float64) + rng.normal(size=p.shape) for n, p in net.named_parameters()}
    F = {n: rng.uniform(0.5, 2.0, size=a.shape) for n, a in anchor.items()}
    ewc = EWC(2.0).add_task(F, anchor)
    pen = ewc.penalty(net)
    assert isinstance(pen, torch.Tensor) and pen.dtype == torch.float32
    pen.backward()
    grad = ewc.gradient(net)
    for n, p in net.named_parameters():
        want = 2.0 * F[n] * (p.detach().numpy() - anchor[n])
        np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad[n].detach().numpy(), want, rtol=1e-5, atol=1e-6)
    x = torch.randn(16, 6)
    y = torch.randint(0, 4, (16,))
    from fisherlib.natural import NaturalGradient

    opt = NaturalGradient(net, lr=0.1, preconditioner="diag", damping=1.0)
    opt.backward(x, y, loss=lambda z, t: torch.nn.functional.cross_entropy(z, t) + ewc.penalty(net))
    net.zero_grad()
    (torch.nn.functional.cross_entropy(net(x), y) + ewc.penalty(net)).backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.backward(x, y, loss=lambda z, t: torch.nn.functional.cross_entropy(z, t) + ewc.penalty(net))
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6)
