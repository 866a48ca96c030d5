"""NaturalGradient(preconditioner="sophia"): the step is Sophia's clipped rule with the Fisher diagonal
computed here by hand in float64; the clip bounds every coordinate; the Fisher is refreshed exactly every
k steps from the captured batch; parameter groups, checkpoints, GradScaler and bad input."""

from __future__ import annotations

import copy
import io

import pytest

torch = pytest.importorskip("torch")

from fisherlib import backends  # noqa: E402
from fisherlib.estimators._running import _step_seed  # noqa: E402
from fisherlib.natural import FisherSophia, NaturalGradient  # noqa: E402

N = 24


def _net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)


def _data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 5, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def _hand_fisher(model, x, seed, refresh_index, keep=None):
    """One Hutchinson diagonal by hand: p = softmax(z), Bξ = √p⊙ξ − p(√p·ξ), g = Jᵀ Bξ, g² / n."""
    params = [p for p in model.parameters()]
    z = model(x)
    zf = z.detach().reshape(-1, z.shape[-1])
    xi = backends.get("torch").probes(_step_seed(seed, refresh_index), (1, *zf.shape), "rademacher", like=zf)[0]
    p = torch.softmax(zf, dim=-1)
    s = p.sqrt()
    ct = s * xi - p * (s * xi).sum(-1, keepdim=True)
    n = zf.shape[0]
    if keep is not None:
        ct = ct * keep[:, None]
        n = int(keep.sum())
    grads = torch.autograd.grad(z, params, ct.reshape(z.shape))
    return [g * g / n for g in grads]


def _hand_run(model, batches, steps, *, lr, betas, gamma, eps, wd, refresh, seed, groups=None, rows=None):
    """Sophia's rule in plain float64 torch: m, bias-corrected EMA of the hand Fisher, clip, decoupled decay."""
    b1, b2 = betas
    params = list(model.parameters())
    groups = groups or [dict(idx=list(range(len(params))), lr=lr, wd=wd)]
    m = [torch.zeros_like(p) for p in params]
    num = [torch.zeros_like(p) for p in params]
    den = 0.0
    for t in range(steps):
        x, y = batches[t]
        if t % refresh == 0:
            fx = x if rows is None else x[:rows]
            hat = _hand_fisher(model, fx, seed, t // refresh)
            num = [b2 * a + (1 - b2) * h for a, h in zip(num, hat)]
            den = b2 * den + (1 - b2)
        grads = torch.autograd.grad(_loss(model, x, y), params)
        with torch.no_grad():
            for grp in groups:
                for i in grp["idx"]:
                    m[i] = b1 * m[i] + (1 - b1) * grads[i]
                    h = num[i] / den
                    step = torch.clamp(m[i] / torch.clamp(gamma * h, min=eps), -1.0, 1.0)
                    params[i].mul_(1 - grp["lr"] * grp["wd"])
                    params[i].sub_(grp["lr"] * step)
    return model


def _batches(steps):
    return [_data(seed=t % 3) for t in range(steps)]


@pytest.mark.parametrize("rows", [None, 8])
def test_step_is_the_hand_formula_in_float64(rows):
    model, batches = _net(), _batches(7)
    ref = copy.deepcopy(model)
    opt = NaturalGradient(model, lr=0.02, preconditioner="sophia", betas=(0.9, 0.8), gamma=0.3, eps=1e-6,
                          weight_decay=0.1, refresh=3, seed=5, fisher_batch=rows)
    assert isinstance(opt, FisherSophia) and isinstance(opt, NaturalGradient)
    for x, y in batches:
        opt.zero_grad()
        _loss(model, x, y).backward()  # a plain backward: the forward hook captured x
        opt.step()
    _hand_run(ref, batches, 7, lr=0.02, betas=(0.9, 0.8), gamma=0.3, eps=1e-6, wd=0.1, refresh=3, seed=5, rows=rows)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_the_refresh_is_unbiased_for_the_exact_diagonal_within_its_error_bar():
    """h (β₂ → 1, θ fixed) is the mean of one-probe diagonals: within 5 standard errors of the exact
    per-input mean Fisher diagonal (per-example Jacobians, float64), where 2·F is not."""
    model, (x, y) = _net(), _data()
    opt = NaturalGradient(model, lr=1e-300, preconditioner="sophia", betas=(0.0, 0.999), weight_decay=0.0,
                          refresh=1, seed=1)
    for _ in range(300):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    params = dict(model.named_parameters())
    exact = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(N):
        z = model(x[i:i + 1])[0]
        p = torch.softmax(z.detach(), -1)
        Fz = torch.diag(p) - torch.outer(p, p)
        J = [torch.autograd.grad(z[c], list(params.values()), retain_graph=True) for c in range(3)]
        for k, n in enumerate(params):
            Jk = torch.stack([J[c][k].reshape(-1) for c in range(3)])  # (C, P_leaf)
            exact[n] += torch.einsum("cp,cd,dp->p", Jk, Fz, Jk).reshape(params[n].shape) / N
    value, se = opt.fisher.value, opt.fisher.stderr
    far_from_double = 0
    for n in params:
        h, s, F = value[f"diag:{n}"], se[f"diag:{n}"], exact[n]
        assert bool(((h - F).abs() <= 5 * s + 1e-12).all()), n
        far_from_double += int(((h - 2 * F).abs() > 5 * s + 1e-12).sum())
    assert far_from_double > 0.8 * sum(p.numel() for p in params.values())


def test_every_coordinate_moves_at_most_lr():
    model, (x, y) = _net(), _data()
    opt = NaturalGradient(model, lr=0.05, preconditioner="sophia", gamma=1e-3, weight_decay=0.0, refresh=2)
    clipped = free = 0
    for _ in range(6):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        for p, b in zip(model.parameters(), before):
            d = (p.detach() - b).abs()
            assert bool((d <= 0.05 * (1 + 1e-12)).all())
            clipped += int((d >= 0.05 * (1 - 1e-12)).sum())
            free += int((d < 0.05 * 0.99).sum())
    assert clipped > 0 and free > 0  # both regimes occur: the bound is not vacuous


def test_refresh_exactly_every_k_steps_from_the_captured_batch():
    model, batches = _net(), _batches(10)
    forwards = []
    model.register_forward_hook(lambda m, i, o: forwards.append(1))
    opt = NaturalGradient(model, lr=0.01, preconditioner="sophia", refresh=4)
    seen = []
    for t, (x, y) in enumerate(batches):
        with torch.no_grad():
            model(x + 100.0)  # an evaluation forward: not captured
        assert opt.due() == (t % 4 == 0)
        opt.zero_grad()
        _loss(model, x, y).backward()
        assert (opt._batch is not None) == (t % 4 == 0)  # held only before a refresh step
        before = {k: v.clone() for k, v in opt.fisher.state["m"].items()} if opt.fisher else None
        opt.step()
        seen.append(opt.fisher.steps)
        assert opt._batch is None
        if t % 4:
            assert all(torch.equal(v, opt.fisher.state["m"][k]) for k, v in before.items())
    assert seen == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3] and opt.refreshes == 3
    assert len(forwards) == 2 * 10 + 3  # each step's forward, the evaluations, one per refresh


def test_refresh_uses_the_training_batch_not_an_evaluation_one():
    model, (x, y) = _net(), _data()
    ref = copy.deepcopy(model)
    opt = NaturalGradient(model, lr=0.01, preconditioner="sophia", refresh=5, seed=2)
    _loss(model, x, y).backward()
    with torch.no_grad():
        model(torch.zeros(3, 5, dtype=torch.float64))
    opt.step()
    want = _hand_fisher(ref, x, 2, 0)
    for (n, _), w in zip(ref.named_parameters(), want):
        torch.testing.assert_close(opt.fisher.value[f"diag:{n}"], w, rtol=1e-12, atol=1e-15)


def test_explicit_capture_closure_and_missing_batch():
    model, (x, y) = _net(), _data()
    opt = NaturalGradient(model, lr=0.01, preconditioner="sophia", capture=False, refresh=2)
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="capture"):
        opt.step()
    opt.capture(x)
    opt.step()
    assert opt.fisher.steps == 1

    model2 = copy.deepcopy(model)
    opt2 = NaturalGradient(model2, lr=0.01, preconditioner="sophia", refresh=2)

    def closure():
        opt2.zero_grad()
        loss = _loss(model2, x, y)
        loss.backward()
        return loss

    value = opt2.step(closure)
    assert value.ndim == 0 and opt2.fisher.steps == 1
    loss = opt2.backward(x, y)  # the convenience forward + backward captures too
    assert float(loss) > 0
    opt2.step()
    opt2.remove_hook()
    with pytest.raises(ValueError, match="capture"):
        opt2.capture()


def test_parameter_groups_match_the_hand_formula():
    model, batches = _net(), _batches(5)
    ref = copy.deepcopy(model)
    ps = list(model.parameters())
    groups = [{"params": [ps[0], ps[2]], "lr": 0.03, "weight_decay": 0.2}, {"params": [ps[1], ps[3]]}]
    opt = NaturalGradient(model, lr=0.01, preconditioner="sophia", params=groups, weight_decay=0.0,
                          betas=(0.9, 0.9), gamma=0.2, refresh=2, seed=3)
    for x, y in batches:
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    _hand_run(ref, batches, 5, lr=None, betas=(0.9, 0.9), gamma=0.2, eps=1e-12, wd=None, refresh=2, seed=3,
              groups=[dict(idx=[0, 2], lr=0.03, wd=0.2), dict(idx=[1, 3], lr=0.01, wd=0.0)])
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_parameter_without_gradient_does_not_move():
    model, (x, y) = _net(), _data()
    ps = list(model.parameters())
    opt = NaturalGradient(model, lr=0.01, preconditioner="sophia", weight_decay=0.5)
    opt.zero_grad()
    _loss(model, x, y).backward()
    ps[3].grad = None
    before = ps[3].detach().clone()
    opt.step()
    assert torch.equal(ps[3].detach(), before) and not opt.state[ps[3]]


def test_state_dict_round_trip():
    model, batches = _net(), _batches(8)
    opt = NaturalGradient(model, lr=0.02, preconditioner="sophia", refresh=3, seed=4)

    def train(m, o, bs):
        for x, y in bs:
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()

    train(model, opt, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = _net(seed=9)
    model2.load_state_dict(saved["model"])
    opt2 = NaturalGradient(model2, lr=0.02, preconditioner="sophia", refresh=3, seed=4)
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps == 4 and opt2.refreshes == 2
    train(model, opt, batches[4:])  # crosses the refresh of step 6
    train(model2, opt2, batches[4:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_grad_scaler_unscales_and_skips_non_finite_steps():
    amp = pytest.importorskip("torch.amp")
    model, (x, y) = _net(dtype=torch.float32), _data(dtype=torch.float32)
    ref = copy.deepcopy(model)
    opt = NaturalGradient(model, lr=0.01, preconditioner="sophia", refresh=2)
    ref_opt = NaturalGradient(ref, lr=0.01, preconditioner="sophia", refresh=2)
    try:
        scaler = amp.GradScaler("cpu", init_scale=2.0 ** 10)
    except (TypeError, RuntimeError) as e:  # a torch without the CPU scaler
        pytest.skip(f"GradScaler('cpu'): {e}")
    off = amp.GradScaler("cpu", enabled=False)
    for t in range(3):
        opt.zero_grad()
        scaler.scale(_loss(model, x, y)).backward()
        scaler.step(opt)  # unscale_ divides p.grad by the scale (a power of 2: exact) before step()
        scaler.update()
        ref_opt.zero_grad()
        off.scale(_loss(ref, x, y)).backward()
        off.step(ref_opt)
        off.update()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # A non-finite gradient: the scaler skips step() (nothing moves, no refresh) and lowers its scale.
    before = [p.detach().clone() for p in model.parameters()]
    m_before = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    steps, refreshes, scale = opt.steps, opt.refreshes, scaler.get_scale()
    opt.zero_grad()
    scaler.scale(_loss(model, x, y)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(model.parameters(), m_before))
    assert (opt.steps, opt.refreshes) == (steps, refreshes) and scaler.get_scale() < scale


def test_a_sequence_model_counts_the_attention_mask():
    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 4, dtype=torch.float64)
            self.out = torch.nn.Linear(4, 7, dtype=torch.float64)

        def forward(self, input_ids, attention_mask=None):
            return {"logits": self.out(torch.tanh(self.emb(input_ids)))}

    torch.manual_seed(0)
    model = Seq()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 7, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    opt = NaturalGradient(model, lr=0.01, preconditioner="sophia", seed=6)
    logits = model(input_ids=ids, attention_mask=mask)["logits"]
    torch.nn.functional.cross_entropy(logits.reshape(-1, 7), ids.reshape(-1)).backward()
    opt.step()

    def hand(model_, x):
        return model_(input_ids=x)["logits"]

    class Wrap(torch.nn.Module):  # the hand Fisher takes a model of one argument
        def __init__(self):
            super().__init__()
            self.m = ref

        def forward(self, x):
            return hand(self.m, x)

    want = _hand_fisher(Wrap(), ids, 6, 0, keep=mask.reshape(-1).double())
    for (n, _), w in zip(ref.named_parameters(), want):
        torch.testing.assert_close(opt.fisher.value[f"diag:{n}"], w, rtol=1e-12, atol=1e-15)


def test_tiny_gpt2_drop_in_with_hf_style_call():
    pytest.importorskip("transformers")
    from fisherlib.demo import lm

    model = lm.gpt2("tiny", seed=0).train()
    batch = next(lm.lm_batches(lm.random_ids(400, 211), n=2, length=16))
    opt = NaturalGradient(model, lr=1e-3, preconditioner="sophia", refresh=2, fisher_batch=1)
    losses = []
    for _ in range(3):
        out = model(input_ids=batch["input_ids"])
        loss = lm.lm_loss(out.logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert opt.refreshes == 2 and losses[-1] < losses[0]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {k.split(":", 1)[1] for k in opt.fisher.value} == names


@pytest.mark.parametrize("kwargs, match, exc", [
    (dict(lr=-1.0), "lr:", ValueError),
    (dict(betas=(1.0, 0.9)), "betas:", ValueError),
    (dict(betas=(0.9,)), "betas:", ValueError),
    (dict(gamma=0.0), "gamma:", ValueError),
    (dict(eps=-1e-8), "eps:", ValueError),
    (dict(weight_decay=-0.1), "weight_decay:", ValueError),
    (dict(refresh=0), "refresh:", ValueError),
    (dict(probes=1.5), "probes:", ValueError),
    (dict(fisher_batch=0), "fisher_batch:", ValueError),
    (dict(likelihood="gauss"), "likelihood:", ValueError),
    (dict(kl_clip=0.1), "kl_clip:", TypeError),
    (dict(damping=0.1), "damping:", TypeError),
    (dict(decay=0.9), "decay:", TypeError),
    (dict(colour=1), "colour:", TypeError),
])
def test_bad_input_names_the_argument(kwargs, match, exc):
    with pytest.raises(exc, match=match):
        NaturalGradient(_net(), preconditioner="sophia", **kwargs)


def test_bad_groups_and_model():
    model = _net()
    ps = list(model.parameters())
    with pytest.raises(ValueError, match="params:"):
        NaturalGradient(model, preconditioner="sophia", params=[torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=r"params\[1\]: lr:"):
        NaturalGradient(model, preconditioner="sophia", params=[{"params": ps[:2]}, {"params": ps[2:], "lr": 0.0}])
    with pytest.raises(ValueError, match=r"params\[1\]: betas\[1\]"):
        NaturalGradient(model, preconditioner="sophia", params=[{"params": ps[:2]},
                                                                {"params": ps[2:], "betas": (0.9, 0.5)}])
    with pytest.raises(TypeError, match="model:"):
        NaturalGradient(lambda x: x, preconditioner="sophia")
    with pytest.raises(ValueError, match="preconditioner:"):
        NaturalGradient(model, preconditioner="sophie")


def test_signatures_show_the_options():
    import inspect

    assert inspect.signature(FisherSophia).parameters["gamma"].default == 0.04
    assert "kl_clip" in inspect.signature(NaturalGradient).parameters  # not __new__'s (*args, **kwargs)


def test_huggingface_trainer_drives_it(tmp_path):
    """Trainer(optimizers=(opt, None)): the Trainer's own forward (model(**batch)), backward, gradient
    clipping, scheduler and opt.step() (through accelerate's wrapper); the hook captures its batch."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from fisherlib.demo import lm

    model = lm.gpt2("tiny", seed=0)
    ids = torch.as_tensor(lm.random_ids(16 * 12, 211, seed=1)).reshape(16, 12)
    rows = [{"input_ids": r, "labels": r} for r in ids]  # the model shifts its labels itself
    opt = NaturalGradient(model, lr=1e-3, preconditioner="sophia", refresh=2)
    before = [p.detach().clone() for p in model.parameters()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=5, per_device_train_batch_size=4,
                                          report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                          seed=0, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None)).train()
    assert opt.steps == 5 and opt.refreshes == 3
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
