"""NaturalGradient (torch.optim): its step is precondition() of the running Fisher; it trains; it checkpoints."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fisherlib  # noqa: E402
from fisherlib.estimators import RunningFisher  # noqa: E402
from fisherlib.natural import (  # noqa: E402
    Curvature,
    LevenbergMarquardt,
    Preconditioner,
    NaturalGradient,
    lr_from_lambda_max,
    precondition,
)
from fisherlib.natural._damping import predicted_change  # noqa: E402

N = 32


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


@pytest.mark.parametrize("kind", ["diag", "quasidiag", "ollivier", "unitwise", "blocks"])
def test_step_is_the_preconditioned_gradient(kind):
    m, (x, y) = _net(), _data()
    ref = copy.deepcopy(m)
    opt = NaturalGradient(m, lr=0.1, preconditioner=kind, damping=0.1, probes=2, seed=4, kl_clip=None)
    opt.backward(x, y)
    opt.step()
    # By hand: the same probes through RunningFisher, then precondition().
    rf = RunningFisher(opt.fisher.structure, probes=2, seed=4)
    _, grads = rf.step(ref, None, x, y)
    d = precondition(grads, Curvature.from_running(rf), kind, 0.1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            torch.testing.assert_close(dict(m.named_parameters())[n], p - 0.1 * d[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["diag", "ollivier", "unitwise"])
def test_trains(kind):
    m, (x, y) = _net(), _data()
    opt = NaturalGradient(m, lr=0.05, preconditioner=kind, damping=1e-2, probes=1)
    first = float(opt.backward(x, y))
    opt.step()
    for _ in range(60):
        loss = opt.backward(x, y)
        opt.step()
    assert float(loss) < 0.5 * first


def test_state_dict_round_trip_continues_identically():
    x, y = _data()

    def make(m):
        return NaturalGradient(m, lr=0.05, preconditioner="unitwise", damping=1e-2, momentum=0.5, refresh=2,
                               adapt_damping=True, seed=1)

    a = _net()
    opt_a = make(a)
    for _ in range(3):
        opt_a.backward(x, y)
        opt_a.step(lambda: torch.nn.functional.cross_entropy(a(x), y))
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    b = _net(seed=9)
    b.load_state_dict(saved["model"])
    opt_b = make(b)
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.damping == opt_a.damping and opt_b.steps == 3
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.backward(x, y)
            o.step(lambda m=m: torch.nn.functional.cross_entropy(m(x), y))
    # To rounding: where λ did not change, the original run applies the inverse of a dense block
    # it kept from the step before, the resumed one solves afresh (Preconditioner's first use).
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)


def test_refresh_interval_and_lr_callable():
    m, (x, y) = _net(), _data()
    calls = []
    opt = NaturalGradient(m, lr=lambda: calls.append(1) or 0.01, refresh=3)
    for _ in range(6):
        opt.backward(x, y)
        opt.step()
    assert opt.fisher.steps == 2 and len(calls) == 2
    assert opt.param_groups[0]["lr"] == 0.01


def test_kl_clip_bounds_the_step():
    m, (x, y) = _net(), _data()
    before = [p.detach().clone() for p in m.parameters()]
    opt = NaturalGradient(m, lr=10.0, preconditioner="diag", damping=1e-4, kl_clip=1e-4)
    opt.backward(x, y)
    g = {n: p.grad.clone() for n, p in m.named_parameters()}
    opt.step()
    delta = {n: p.detach() - b for (n, p), b in zip(m.named_parameters(), before)}
    # η'² gᵀd = κ with the clipped η': the step δ = −η' d has −gᵀδ = η' gᵀd = √(κ gᵀd).
    d = precondition(g, opt.curvature, "diag", 1e-4)
    gd = float(sum(torch.sum(g[n] * d[n]) for n in g))
    assert math.isclose(float(-sum(torch.sum(g[n] * delta[n]) for n in g)), math.sqrt(1e-4 * gd), rel_tol=1e-9)


def test_errors_are_named():
    m = _net()
    with pytest.raises(TypeError, match="model"):
        NaturalGradient(list(m.parameters()))
    with pytest.raises(ValueError, match="preconditioner"):
        NaturalGradient(m, preconditioner="shampoo")
    with pytest.raises(ValueError, match="refresh"):
        NaturalGradient(m, refresh=0)
    with pytest.raises(RuntimeError, match="backward"):
        NaturalGradient(m).step()


def test_levenberg_marquardt_and_lr_from_lambda_max():
    lm = LevenbergMarquardt(1.0, factor=2.0)
    assert lm.update(actual=-0.9, predicted=-1.0) == 0.5  # ρ = 0.9: trust more
    assert lm.update(actual=-0.5, predicted=-1.0) == 0.5  # ρ = 0.5: keep
    assert lm.update(actual=+0.1, predicted=-1.0) == 1.0  # loss rose: damp more
    assert lm.update(actual=float("nan"), predicted=-1.0) == 2.0
    assert predicted_change(2.0, 1.0) == -1.0
    assert lr_from_lambda_max(4.0, safety=1.0) == 0.5
    assert lr_from_lambda_max(lambda: 4.0, damping=4.0, safety=0.5) == 2.0
    with pytest.raises(ValueError, match="lambda_max"):
        lr_from_lambda_max(0.0)
    with pytest.raises(ValueError, match="factor"):
        LevenbergMarquardt(factor=1.0)
    np.testing.assert_equal(lm.state_dict()["damping"], 2.0)


@pytest.mark.parametrize("kind", ["ollivier", "unitwise", "quasidiag"])
def test_steps_between_refreshes_apply_the_cached_factorisation(kind):
    """Steps 2..k of a refresh interval: a plain backward (the same gradient as the probing
    one) and the cached (F̃ + λI)⁻¹, equal to a fresh precondition() of the same estimate."""
    m, (x, y) = _net(), _data()
    opt = NaturalGradient(m, lr=0.05, preconditioner=kind, damping=0.1, refresh=3, kl_clip=None, seed=2)
    ref = copy.deepcopy(m)
    rf = RunningFisher(opt.fisher.structure, probes=1, seed=2)
    _, g_probe = rf.step(ref, None, x, y)
    for t in range(3):
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        opt.backward(x, y)
        g = {n: p.grad.clone() for n, p in m.named_parameters()}
        if t == 0:  # the probing backward's gradient is the plain one (same parameters)
            for n in g:
                torch.testing.assert_close(g[n], g_probe[n], rtol=1e-12, atol=1e-14)
        else:  # a plain backward: torch's own gradient
            m.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            for n, p in m.named_parameters():
                torch.testing.assert_close(g[n], p.grad, rtol=1e-12, atol=1e-15)
                p.grad = g[n]
        curv = opt.curvature
        opt.step()
        assert opt.fisher.steps == 1 and opt.curvature is curv
        d = precondition(g, curv, kind, 0.1)
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.detach(), before[n] - 0.05 * d[n], rtol=1e-10, atol=1e-13)


def test_a_changed_damping_rebuilds_the_factorisation():
    m, (x, y) = _net(), _data()
    opt = NaturalGradient(m, lr=0.05, preconditioner="ollivier", damping=0.1, refresh=10, kl_clip=None)
    opt.backward(x, y)
    opt.step()
    plan = opt._plan
    opt.backward(x, y)
    opt.step()
    assert opt._plan is plan  # same F̃, same λ: reused
    opt.damping = 0.5  # as Levenberg–Marquardt does
    g = {n: p.grad.clone() for n, p in m.named_parameters()}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.step()
    assert opt._plan is not plan and opt._plan.damping == 0.5
    d = precondition(g, opt.curvature, "ollivier", 0.5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.05 * d[n], rtol=1e-10, atol=1e-13)


def test_plain_backward_gives_unused_parameters_zero_gradients_and_checks_targets():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = _net(), torch.nn.Linear(2, 2).double()

        def forward(self, x):
            return self.used(x)

    net, (x, y) = Net(), _data()
    opt = NaturalGradient(net, lr=0.05, refresh=2)
    for _ in range(2):
        opt.backward(x, y)
        assert all(p.grad is not None and (n.startswith("used") or not p.grad.any())
                   for n, p in net.named_parameters())
        opt.step()
    opt.backward(x, y.numpy())  # a refresh step takes class indices of any array kind
    opt.step()
    with pytest.raises(ValueError, match="targets"):
        opt.backward(x, y[:-1].numpy())  # and so does a plain one, checked the same way


def test_batch_norm_statistics_update_as_in_plain_training():
    """The optimizer's forward is the training step's: batch-norm running statistics move on
    refresh steps and between them exactly as under torch.optim.SGD; fisher() leaves them."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3)).double()
    ref = copy.deepcopy(net)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt = NaturalGradient(net, lr=0.1, preconditioner="diag", refresh=2)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):  # a refresh, a plain step, a refresh
        opt.backward(x, y)
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        bn, bn_ref = net[1], ref[1]
        torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-12, atol=0)
        assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked)
        opt.zero_grad()
        sgd.zero_grad()  # both models keep θ: only the statistics are compared
    before = net[1].running_mean.clone()
    with pytest.warns(fisherlib.backends.BatchNormWarning):  # training mode: inputs are coupled
        fisherlib.fisher(net, None, x, probes=1)
    torch.testing.assert_close(net[1].running_mean, before, rtol=0, atol=0)


def test_trains_a_huggingface_causal_lm_with_padded_labels():
    """A tiny random GPT-2 (transformers' Conv1D layers, (in, out) weights), dict inputs and
    (N, T) labels with -100 padding, as a HuggingFace training loop passes them: the reported
    loss is the model's own masked loss, and a few Ollivier steps lower it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # a deterministic reference
    lm = transformers.GPT2LMHeadModel(cfg).double()
    ids = torch.randint(0, 50, (4, 10))
    labels = ids.clone()
    labels[:, -3:] = -100
    batch = {"input_ids": ids}
    opt = NaturalGradient(lm, lr=0.05, preconditioner="ollivier", refresh=2)
    first = float(opt.backward(batch, labels))
    ref = torch.nn.functional.cross_entropy(lm(**batch).logits.reshape(-1, 50), labels.reshape(-1))
    assert abs(first - ref.item()) < 1e-10
    for _ in range(5):
        opt.step()
        last = float(opt.backward(batch, labels))
    assert last < first


def _l2_loss(model, c=0.3):
    def loss(z, t):  # cross-entropy plus a penalty on the parameters themselves (L2, EWC, ...)
        return torch.nn.functional.cross_entropy(z, t) + c * sum((p * p).sum() for p in model.parameters())

    return loss


@pytest.mark.parametrize("refresh", [1, 2])
def test_a_loss_that_depends_on_the_parameters_keeps_its_whole_gradient(refresh):
    """backward(x, y, loss=fn) with fn = cross-entropy + an L2 penalty: p.grad is autograd's
    gradient of the whole loss on refresh steps (probes drawn) and between them."""
    m, (x, y) = _net(), _data()
    opt = NaturalGradient(m, lr=0.1, preconditioner="ollivier", damping=0.1, refresh=refresh, seed=1)
    for _ in range(3):
        ref = copy.deepcopy(m)
        want = _l2_loss(ref)(ref(x), y)
        want.backward()
        value = opt.backward(x, y, loss=_l2_loss(m))
        assert abs(float(value) - want.item()) < 1e-12
        for (n, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=n)
        opt.step()


@pytest.mark.parametrize("kind", ["diag", "ollivier", "unitwise", "blocks", "kfac"])
def test_a_parameter_frozen_after_construction_is_skipped_as_torch_optim_does(kind):
    """Freezing a leaf after the optimizer was built: it keeps its value and p.grad = None, the
    others take the steps of an optimizer built on the frozen model (a fresh Fisher over the
    leaves that remain); unfreezing brings it back."""
    m, (x, y) = _net(), _data()
    opt = NaturalGradient(m, lr=0.1, preconditioner=kind, damping=0.1, seed=3)
    opt.backward(x, y)
    opt.step()
    m[0].bias.requires_grad_(False)
    frozen = m[0].bias.detach().clone()
    ref = copy.deepcopy(m)
    opt_ref = NaturalGradient(ref, lr=0.1, preconditioner=kind, damping=0.1, seed=3)
    for _ in range(3):
        for o in (opt, opt_ref):
            o.backward(x, y)
            o.step()
        assert m[0].bias.grad is None
    torch.testing.assert_close(m[0].bias.detach(), frozen, rtol=0, atol=0)
    if kind != "kfac":  # K-FAC's probes are seeded by the step count, which the reference restarts
        for (n, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)
    m[0].bias.requires_grad_(True)
    opt.backward(x, y)
    opt.step()
    assert not torch.equal(m[0].bias.detach(), frozen)


def test_dict_batch_without_targets_gets_a_clear_error_and_a_framework_loss_works():
    class DictNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return self.net(x)

    net, (x, y) = DictNet(), _data()
    opt = NaturalGradient(net, lr=0.05, refresh=2)
    for _ in range(2):  # a refresh step, then a plain one: the same message
        with pytest.raises(ValueError, match=r"targets: got None.*labels"):
            opt.backward({"x": x}, None)
        opt.steps += 1
    opt.steps = 0
    loss = lambda z, _: torch.nn.functional.cross_entropy(z, y)  # noqa: E731 - targets inside the loss
    for _ in range(2):
        value = opt.backward({"x": x}, None, loss=loss)
        opt.step()
    assert math.isfinite(float(value))


def test_kl_clip_default_is_one_value_everywhere():
    import inspect
    from pathlib import Path

    pytest.importorskip("optax")
    from fisherlib.natural import natural_gradient

    torch_default = inspect.signature(NaturalGradient).parameters["kl_clip"].default
    assert torch_default == inspect.signature(natural_gradient).parameters["kl_clip"].default == 1e-2
    page = Path(__file__).resolve().parents[2] / "docs" / "natural-gradient.md"
    if page.exists():  # (a copy of the package and its tests alone, as scripts/mutation.py makes, has no docs)
        assert "`kl_clip=1e-2` by default" in page.read_text(encoding="utf-8")


def test_a_given_exact_fisher_preconditions_through_the_curvature_argument():
    """NaturalGradient(curvature=est) with an exact FisherEstimate of a layer's grouped weight+bias
    blocks: no probes, each step is −η (F_layer + λI)⁻¹ g per layer (a dense float64 solve), and
    a callable is re-evaluated every ``refresh`` steps."""
    m, (x, y) = _net(), _data()
    groups = [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    est = fisherlib.fisher(m, None, x, method="exact", structure="blocks", blocks=groups, reduction="mean")
    opt = NaturalGradient(m, lr=0.1, preconditioner="blocks", damping=0.05, kl_clip=None, curvature=est)
    assert opt.fisher is None
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.backward(x, y)
    g = {n: p.grad.clone() for n, p in m.named_parameters()}
    opt.step()
    for w, b in groups:
        F = est.value[f"{w}+{b}"]
        d = torch.linalg.solve(F + 0.05 * torch.eye(F.shape[0], dtype=F.dtype), torch.cat([g[w].ravel(), g[b]]))
        got = torch.cat([(before[w] - m.get_parameter(w)).ravel(), before[b] - m.get_parameter(b)]) / 0.1
        torch.testing.assert_close(got, d, rtol=1e-10, atol=1e-12)
    calls = []

    def exact():
        calls.append(1)
        return fisherlib.fisher(m, None, x, method="exact")

    opt = NaturalGradient(m, lr=0.1, preconditioner="diag", refresh=2, curvature=exact)
    for _ in range(4):
        opt.backward(x, y)
        opt.step()
    assert len(calls) == 2
    with pytest.raises(TypeError, match="curvature"):
        NaturalGradient(m, curvature="exact")


def test_a_one_logit_binary_classifier_trains_with_the_sigmoid_likelihood():
    """Under the default softmax a one-logit model is refused with a message naming
    likelihood='sigmoid'; with it, p.grad is torch's BCE gradient on refresh and plain steps,
    and the loss falls. A model that outputs probabilities warns."""
    from fisherlib.estimators._running import LogitsWarning

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x, _ = _data()
    y = (x[:, 0] > 0).double()
    for refresh in (1, 2):  # the probing step and the plain one
        opt = NaturalGradient(net, lr=0.1, refresh=refresh)
        opt.steps = refresh - 1
        with pytest.raises(ValueError, match="likelihood='sigmoid'"):
            opt.backward(x, y.long())
    opt = NaturalGradient(net, lr=0.1, preconditioner="ollivier", damping=1e-2, refresh=2, likelihood="sigmoid")
    first = None
    for _ in range(30):
        ref = copy.deepcopy(net)
        want = torch.nn.functional.binary_cross_entropy_with_logits(ref(x), y[:, None])
        want.backward()
        value = opt.backward(x, y)
        first = first if first is not None else float(value)
        assert abs(float(value) - want.item()) < 1e-12
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)
        opt.step()
    assert float(value) < 0.7 * first
    probs = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Softmax(dim=-1)).double()
    with pytest.warns(LogitsWarning, match="logits"):
        NaturalGradient(probs, lr=0.1).backward(x, _data()[1])


def test_the_defaults_are_the_documented_recommended_setting_and_train():
    """NaturalGradient(model) and natural_gradient(lr) default to the setting that beat the tuned
    Adam on the digits (Ollivier's step, λ = 10⁻², probes every 10 steps, κ = 10⁻², η = 0.1), and
    that setting trains a small model with nothing passed but the model."""
    import inspect

    sig = inspect.signature(NaturalGradient).parameters
    assert (sig["preconditioner"].default, sig["damping"].default, sig["refresh"].default, sig["lr"].default,
            sig["kl_clip"].default) == ("ollivier", 1e-2, 10, 0.1, 1e-2)
    if __import__("importlib").util.find_spec("optax") is not None:
        from fisherlib.natural import natural_gradient

        osig = inspect.signature(natural_gradient).parameters
        assert (osig["preconditioner"].default, osig["damping"].default) == ("ollivier", 1e-2)
    m, (x, y) = _net(), _data()
    opt = NaturalGradient(m)
    first = float(opt.backward(x, y))
    opt.step()
    for _ in range(40):
        loss = opt.backward(x, y)
        opt.step()
    assert float(loss) < 0.5 * first


def test_relative_damping_reaches_the_preconditioner():
    m, (x, y) = _net(), _data()
    ref = copy.deepcopy(m)
    opt = NaturalGradient(m, lr=0.1, damping=0.3, relative_damping=True, kl_clip=None, seed=2)
    opt.backward(x, y)
    opt.step()
    assert opt._plan.relative and "relative_damping=True" in repr(opt)
    rf = RunningFisher(opt.fisher.structure, probes=1, seed=2)
    _, grads = rf.step(ref, None, x, y)
    pre = Preconditioner(Curvature.from_running(rf), "ollivier", 0.3, relative_damping=True)
    for n, d in zip(pre.names, pre.apply([grads[n] for n in pre.names])):
        torch.testing.assert_close(m.get_parameter(n), ref.get_parameter(n) - 0.1 * d, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="damping"):
        NaturalGradient(m, damping=0.0, relative_damping=True)
