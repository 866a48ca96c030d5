"""NaturalGradient(preconditioner="kfac"): its step is the damped K-FAC solve of its running factors."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fisherlib  # noqa: E402
from fisherlib.natural import KroneckerCurvature, NaturalGradient  # noqa: E402

from .test_torch_optim import _data, _net  # noqa: E402

def _kfac(net, x, y, step, **kw):
    return fisherlib.fisher(net, None, [(x, y)], structure="kfac", reduction="mean", seed=0, first_batch=step,
                            **kw)


@pytest.mark.parametrize("split", [True, False])
def test_step_is_the_damped_solve_of_the_batch_factors(split):
    x, y = _data()
    net, ref = _net(), _net()
    opt = NaturalGradient(net, lr=0.1, preconditioner="kfac", damping=1e-2, kl_clip=None)
    opt._kron.split = split
    opt.backward(x, y)
    opt.step()
    est = _kfac(ref, x, y, 0)
    loss = torch.nn.functional.cross_entropy(ref(x), y)
    grads = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(loss, list(ref.parameters()))))
    d = est.solve(grads, 1e-2, split=split)
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), (q - 0.1 * d[n]).detach().numpy(), rtol=1e-10, atol=1e-12)


def test_running_factors_are_an_ema_of_the_batch_means():
    x, y = _data()
    net = _net()
    a = _kfac(net, x[:16], y[:16], 0, method="exact")
    b = _kfac(net, x[16:], y[16:], 1, method="exact")
    run = KroneckerCurvature(decay=0.75)
    run.update(a)
    run.update(b)
    for name in ("0", "2"):
        for r in ("A", "G"):
            want = 0.75 * a.factors[name][r] + 0.25 * b.factors[name][r]
            np.testing.assert_allclose(run.estimate.factors[name][r].numpy(), want.numpy(), rtol=1e-12)
    mean = KroneckerCurvature(decay=None)
    for e in (a, b):
        mean.update(e)
    want = 0.5 * (a.factors["2"]["G"] + b.factors["2"]["G"])
    np.testing.assert_allclose(mean.estimate.factors["2"]["G"].numpy(), want.numpy(), rtol=1e-12)
    with pytest.raises(TypeError, match="batch"):
        run.update(fisherlib.fisher(net, None, [x], method="exact"))


def test_between_refreshes_the_factors_and_their_eigendecompositions_are_kept():
    x, y = _data()
    net = _net()
    opt = NaturalGradient(net, lr=0.05, preconditioner="kfac", refresh=3)
    calls = []
    update = opt._kron.update
    opt._kron.update = lambda est: (calls.append(1), update(est))[1]
    for _ in range(6):
        opt.backward(x, y)
        opt.step()
    assert len(calls) == 2  # steps 0 and 3
    assert opt._kron.estimate._cache  # the eigendecompositions, cached on the running estimate


def test_it_trains_and_checkpoints():
    x, y = _data()
    net = _net()
    opt = NaturalGradient(net, lr=0.2, preconditioner="kfac", damping=1e-2, refresh=2)
    with torch.no_grad():
        before = float(torch.nn.functional.cross_entropy(net(x), y))
    for _ in range(20):
        opt.backward(x, y)
        opt.step()
    with torch.no_grad():
        after = float(torch.nn.functional.cross_entropy(net(x), y))
    assert after < 0.5 * before
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = copy.deepcopy(net)
    opt2 = NaturalGradient(twin, lr=0.2, preconditioner="kfac", damping=1e-2, refresh=2)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    for o in (opt, opt2):  # a step between refreshes: the restored factors give the same step
        o.backward(x, y)
        o.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="curvature"):
        NaturalGradient(_net(), preconditioner="kfac", curvature=lambda: None)
    with pytest.raises(ValueError, match="decay"):
        KroneckerCurvature(decay=1.5)
    with pytest.raises(RuntimeError, match="update"):
        KroneckerCurvature().apply([], 1e-3)
