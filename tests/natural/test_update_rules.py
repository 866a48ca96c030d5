"""The optimizers' update rules beyond the preconditioner, step by step against float64 references
(issue 23: planted bugs in the KL clip, momentum, weight decay, stale factorisations, the learning-
rate schedule, the Levenberg–Marquardt model and the running average survived the suite).

The direction d = (F̃ + λI)⁻¹ g is the preconditioner's (checked in test_precondition.py); here
F̃ is diagonal and known, so d = g / (F̃ + λ) and every other part of the step is written out:
g ← g + wd·θ, η' = η·min(1, √(κ / (η² gᵀd))), b ← μ·b + d, θ ← θ − η'·b.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

LAM, LR, MOM, WD = 0.1, 0.5, 0.9, 0.05


def clipped(lr, g, d, kl):
    gd = float(np.sum(g * d))
    return lr * min(1.0, math.sqrt(kl / (lr * lr * gd))), lr * lr * gd > kl


def test_torch_step_rule_matches_a_reference():
    torch = pytest.importorskip("torch")
    import fisherlib
    from fisherlib.natural import NaturalGradient

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 4).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.arange(12) % 4
    ref = {n: p.detach().clone() for n, p in net.named_parameters()}

    def exact():  # F̃ at the current θ: a new curvature at every refresh
        return fisherlib.fisher(net, None, x, method="exact", reduction="mean")

    kl = 0.18  # between the steps' η² gᵀd (0.22, 0.20, 0.16, 0.11): clipped twice, then not
    opt = NaturalGradient(net, lr=LR, preconditioner="diag", damping=LAM, momentum=MOM, weight_decay=WD,
                          kl_clip=kl, curvature=exact, refresh=1)
    buf, active = None, []
    for _ in range(4):
        opt.zero_grad()
        opt.backward(x, y)
        opt.step()
        # The reference step from the same θ, written out.
        with torch.enable_grad():
            theta = {n: v.clone().requires_grad_(True) for n, v in ref.items()}
            loss = torch.nn.functional.cross_entropy(x @ theta["weight"].T + theta["bias"], y)
            grads = torch.autograd.grad(loss, list(theta.values()))
        tmp = torch.nn.Linear(3, 4).double()
        with torch.no_grad():
            tmp.weight.copy_(ref["weight"])
            tmp.bias.copy_(ref["bias"])
        F = fisherlib.fisher(tmp, None, x, method="exact", reduction="mean").value
        g = {n: gr.detach().numpy() + WD * ref[n].numpy() for n, gr in zip(ref, grads)}
        d = {n: g[n] / (F[n].numpy() + LAM) for n in ref}
        flat = lambda t: np.concatenate([t[n].ravel() for n in ref])  # noqa: E731
        lr, on = clipped(LR, flat(g), flat(d), kl)
        active.append(on)
        buf = d if buf is None else {n: MOM * buf[n] + d[n] for n in ref}
        ref = {n: torch.as_tensor(ref[n].numpy() - lr * buf[n]) for n in ref}
        for n, p in net.named_parameters():
            np.testing.assert_allclose(p.detach().numpy(), ref[n].numpy(), rtol=1e-10, atol=1e-12, err_msg=n)
    assert any(active) and not all(active)  # the clip is tested both ways


def test_predicted_change_is_the_damped_quadratic_model():
    """M(δ) − M(0) = gᵀδ + ½ δᵀ(F̃ + λI)δ for δ = −η d, d = (F̃ + λI)⁻¹ g."""
    from fisherlib.natural._damping import predicted_change

    rng = np.random.default_rng(0)
    f, g = rng.uniform(0.1, 2.0, 6), rng.normal(size=6)
    d = g / (f + LAM)
    for lr in (0.1, 0.7, 1.5):
        delta = -lr * d
        want = g @ delta + 0.5 * delta @ ((f + LAM) * delta)
        assert predicted_change(g @ d, lr) == pytest.approx(want, rel=1e-12)


def test_optax_update_rule_matches_a_reference():
    """Refresh, a step between refreshes (the kept factors), refresh again; a schedule of the step."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from fisherlib.estimators._running import state_value
    from fisherlib.natural import natural_gradient

    def model(p, x):
        return x @ p["w"] + p["b"]

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4))}
    schedule = lambda count: LR / (1.0 + count)  # noqa: E731
    kl = 1.0  # between the steps' η² gᵀd (7.2, 5.3, 0.46): clipped twice, then not
    tx = natural_gradient(schedule, preconditioner="diag", damping=LAM, momentum=MOM, kl_clip=kl, decay=0.5)
    state = tx.init(params)
    buf, active, F = None, [], None
    for step, refresh in enumerate((True, False, True)):
        g = {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in params.items()}
        probes = {k: jnp.asarray(rng.normal(size=(2, *v.shape))) * (1 + step) for k, v in params.items()}
        kw = dict(probe_grads=probes, n=5) if refresh else {}
        out, state = tx.update(g, state, params, **kw)
        if refresh:  # F̃ after this step's fold (the running average: checked below)
            F = {k[len("diag:"):]: np.asarray(v) for k, v in state_value(state.fisher).items()}
        gn = {k: np.asarray(v) for k, v in g.items()}
        d = {k: gn[k] / (F[k] + LAM) for k in gn}
        flat = lambda t: np.concatenate([t[k].ravel() for k in sorted(t)])  # noqa: E731
        lr, on = clipped(schedule(step), flat(gn), flat(d), kl)
        active.append(on)
        buf = d if buf is None else {k: MOM * buf[k] + d[k] for k in d}
        for k in d:
            np.testing.assert_allclose(np.asarray(out[k]), -lr * buf[k], rtol=1e-10, atol=1e-13, err_msg=(step, k))
    assert any(active) and not all(active)


def test_running_average_is_the_bias_corrected_ema():
    """m ← β m + α q, W ← β W + α, F̃ = m / W with q the mean over the K probes of g² / n."""
    from fisherlib.estimators._running import init_state, layout, state_value, update_state

    rng = np.random.default_rng(1)
    lay = layout(["a"], [(3,)], "diag")
    beta, n = 0.7, 4
    state = init_state(lay, np.zeros(1), stderr=False)
    m = w = 0.0
    for t in range(3):
        g = rng.normal(size=(2, 3)) * (1 + t)
        state = update_state(lay, state, [g], n, beta)
        m = beta * m + (1 - beta) * np.mean(g ** 2, axis=0) / n
        w = beta * w + (1 - beta)
        np.testing.assert_allclose(np.asarray(state_value(state)["diag:a"]), m / w, rtol=1e-12)


def test_running_error_bar_scales_like_the_estimate():
    """Gradients × c: the estimate and its standard error both × c² (an error bar without its
    square root would go as c⁴); and it shrinks as steps accumulate with decay=None."""
    from fisherlib.estimators import RunningFisher

    rng = np.random.default_rng(2)
    grads = [rng.normal(size=(3, 5)) for _ in range(4)]
    out = []
    for c in (1.0, 3.0):
        rf = RunningFisher("diag", probes=3, decay=None)
        for g in grads:
            rf.update([c * g], ["a"], 4)
        out.append((np.asarray(rf.value["diag:a"]), np.asarray(rf.stderr["diag:a"])))
    (v1, s1), (v3, s3) = out
    np.testing.assert_allclose(v3, 9 * v1, rtol=1e-12)
    np.testing.assert_allclose(s3, 9 * s1, rtol=1e-12)
    assert np.all(s1 > 0) and np.all(s1 < v1)
