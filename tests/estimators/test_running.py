"""RunningFisher: one batched backward per step, unbiased terms with honest error bars, EMA, state."""

from __future__ import annotations

import numpy as np
import pytest

import fisherlib
from fisherlib import backends
from fisherlib.estimators import RunningFisher
from fisherlib.estimators._running import to_units
from fisherlib.models import MLP

N = 12


def _setup():
    model = MLP([4, 5, 3])
    params = model.init(seed=0, like=np.zeros(1))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4))
    y = rng.integers(0, 3, size=N)
    return model, params, x, y


class _Counting:
    """A numpy backend that counts forward passes and VJP calls (and the cotangents' shapes)."""

    def __init__(self):
        self.be = backends.get("numpy")
        self.forwards, self.vjps = 0, []

    def __getattr__(self, name):
        return getattr(self.be, name)

    def linearize(self, model, params, inputs):
        self.forwards += 1
        z, vjp = self.be.linearize(model, params, inputs)

        def counted(ct):
            self.vjps.append(tuple(ct.shape))
            return vjp(ct)

        return z, counted


def test_step_is_one_forward_and_one_batched_backward_with_the_loss_gradient():
    model, params, x, y = _setup()
    be = _Counting()
    rf = RunningFisher("quasidiag", probes=3, backend=be)
    loss, grads = rf.step(model, params, x, y)
    assert be.forwards == 1 and be.vjps == [(4, N, 3)]  # [loss; 3 probes] in one call
    # The loss gradient: the empirical residual's pull-back, -Σ Jᵀ(e_y - p)/N.
    z, vjp = backends.get("numpy").linearize(model, params, x)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = vjp((p - np.eye(3)[y]) / N)
    for k in params:
        np.testing.assert_allclose(grads[k], ref[k], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(loss, -np.mean(np.log(p[np.arange(N), y])), rtol=1e-12)


@pytest.mark.slow
def test_terms_are_unbiased_for_the_mean_fisher_and_error_bars_are_honest():
    """Running mean over many steps at fixed θ against the exact unit-wise blocks / N; every
    term within 5 standard errors, most within 2; the upper bound F_UB (a deliberately wrong
    target) is rejected by the same test."""
    model, params, x, y = _setup()
    exact = fisherlib.fisher(model, params, x, method="exact", structure="blocks", blocks="unitwise")
    upper = fisherlib.fisher(model, params, x, method="exact", bound="upper", structure="blocks",
                             blocks="unitwise")
    rf = RunningFisher("unitwise", probes=8, decay=None, seed=3)
    for _ in range(150):
        rf.step(model, params, x, y)
    assert rf.steps == 150
    value, se = rf.value, rf.stderr
    z_all, z_up = [], []
    for name in exact.value:
        ref, ub = exact.value[name] / N, upper.value[name] / N
        v, s = value[f"unit:{name}"], se[f"unit:{name}"]
        assert np.all(s > 0)
        z_all.append(np.abs(v - ref) / s)
        z_up.append(np.abs(v - ub) / s)
    z_all, z_up = np.concatenate([z.ravel() for z in z_all]), np.concatenate([z.ravel() for z in z_up])
    assert z_all.max() < 5 and np.mean(z_all < 2) > 0.85
    assert np.mean(z_up > 5) > 0.3


def test_quasidiag_terms_match_the_unit_blocks_probe_by_probe():
    model, params, x, y = _setup()
    a, b = RunningFisher("quasidiag", probes=2, seed=1), RunningFisher("unitwise", probes=2, seed=1)
    a.step(model, params, x, y)
    b.step(model, params, x, y)
    u = b.layout.units[0]
    blk = b.value["unit:0.weight"]
    np.testing.assert_allclose(a.value["cross:0.weight"], blk[:, :-1, -1], rtol=1e-12)
    np.testing.assert_allclose(to_units(u, a.value["diag:0.weight"], a.value["diag:0.bias"]),
                               np.diagonal(blk, axis1=1, axis2=2), rtol=1e-12)


def test_ema_weights_and_stderr_formula():
    """update() with known probe gradients: EMA value m/W with bias correction, se from W₂."""
    rf = RunningFisher("diag", probes=2, decay=0.5)
    qs = []
    for t in range(3):
        g = np.array([[1.0 + t], [2.0 - t]])  # K = 2 probes, one scalar leaf
        rf.update([g], ["w"], n=1)
        qs.append(g[:, 0] ** 2)
    w = np.array([0.25, 0.5, 1.0]) * 0.5  # α β^(T-1-t)
    mean = np.sum(w * np.array([q.mean() for q in qs])) / w.sum()
    np.testing.assert_allclose(rf.value["diag:w"], [mean])
    second = np.sum(w * np.array([(q ** 2).mean() for q in qs])) / w.sum()
    se = np.sqrt((second - mean ** 2) * np.sum(w ** 2) / w.sum() ** 2 / 2)
    np.testing.assert_allclose(rf.stderr["diag:w"], [se])


def test_state_dict_round_trip_continues_identically():
    model, params, x, y = _setup()
    a = RunningFisher("unitwise", probes=2, decay=0.9, seed=5)
    a.step(model, params, x, y)
    b = RunningFisher("unitwise", probes=2, decay=0.9, seed=5)
    b.load_state_dict(a.state_dict())
    a.step(model, params, x, y)
    b.step(model, params, x, y)
    for k in a.value:
        np.testing.assert_array_equal(a.value[k], b.value[k])
    with pytest.raises(ValueError, match="structure"):
        RunningFisher("diag").load_state_dict(a.state_dict())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="structure"):
        RunningFisher("full")
    with pytest.raises(ValueError, match="probes"):
        RunningFisher(probes=0)
    with pytest.raises(ValueError, match="decay"):
        RunningFisher(decay=1.0)
    with pytest.raises(ValueError, match="no step yet"):
        RunningFisher().value
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match="targets"):
        RunningFisher().step(model, params, x, y[:3])
    with pytest.raises(TypeError, match="loss_linearize"):
        RunningFisher().step(model, params, x, y, loss=lambda z, t: 0.0)


def test_torch_framework_loss_and_core_loss_agree_with_a_training_step():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(N, 4, dtype=torch.float64), torch.randint(0, 3, (N,))
    loss = torch.nn.functional.cross_entropy(m(x), y)
    loss.backward()
    for kw in ({}, {"loss": torch.nn.functional.cross_entropy}):
        rf = RunningFisher("unitwise", probes=2, seed=2)
        value, grads = rf.step(m, None, x, y, **kw)
        assert abs(float(value) - loss.item()) < 1e-12
        for n, p in m.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=1e-14)
        assert rf.value["unit:0.weight"].shape == (5, 5, 5)
    # The same probes through either loss path: the same Fisher terms.
    a, b = RunningFisher("diag", probes=2, seed=2), RunningFisher("diag", probes=2, seed=2)
    a.step(m, None, x, y)
    b.step(m, None, x, y, loss=torch.nn.functional.cross_entropy)
    for k in a.value:
        torch.testing.assert_close(a.value[k], b.value[k])


@pytest.mark.slow
def test_jax_flax_style_kernels_pair_with_their_bias():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    optax = pytest.importorskip("optax")

    def f(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(4, 5))), "b1": jnp.zeros(5),
              "w2": jnp.asarray(rng.normal(size=(5, 3))), "b2": jnp.zeros(3)}
    x, y = jnp.asarray(rng.normal(size=(N, 4))), jnp.asarray(rng.integers(0, 3, N))
    rf = RunningFisher("quasidiag", probes=2)
    value, grads = rf.step(f, params, x, y)
    ref = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(f(p, x), y).mean())(params)
    for k in params:
        np.testing.assert_allclose(grads[k], ref[k], rtol=1e-10, atol=1e-12)
    assert rf.value["cross:w1"].shape == (5, 4) and rf.value["cross:w2"].shape == (3, 5)
    rf2 = RunningFisher("quasidiag", probes=2)
    v2, g2 = rf2.step(f, params, x, y, loss=lambda z, t: optax.softmax_cross_entropy_with_integer_labels(z, t).mean())
    np.testing.assert_allclose(float(v2), float(value), rtol=1e-12)
    np.testing.assert_allclose(rf2.value["cross:w1"], rf.value["cross:w1"], rtol=1e-10)


def test_fused_training_cotangents_equal_the_separate_ones(xp):
    """cross_entropy_and_hutchinson = [label-residual loss cotangent; hutchinson] from one softmax."""
    from fisherlib.core import cotangents
    from tests._backends import to_numpy, to_xp

    rng = np.random.default_rng(0)
    z = to_xp(rng.normal(size=(5, 4)) * 3, xp)
    y = to_xp(rng.integers(0, 4, 5), xp)
    xi = to_xp(rng.choice([-1.0, 1.0], size=(2, 5, 4)), xp)
    loss, cts = cotangents.cross_entropy_and_hutchinson(z, y, xi)
    zn = to_numpy(z)
    lp = zn - zn.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    np.testing.assert_allclose(float(to_numpy(loss)), -lp[np.arange(5), to_numpy(y)].mean(), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(cts[0, ...]), -to_numpy(cotangents.label_residual(z, y)) / 5, atol=1e-15)
    np.testing.assert_allclose(to_numpy(cts[1:, ...]), to_numpy(cotangents.hutchinson(z, xi)), atol=1e-15)


def test_without_stderr_the_estimate_is_the_same():
    model, params, x, y = _setup()
    a, b = RunningFisher("quasidiag", probes=3, seed=1), RunningFisher("quasidiag", probes=3, seed=1, stderr=False)
    for _ in range(2):
        a.step(model, params, x, y)
        b.step(model, params, x, y)
    for k in a.value:
        np.testing.assert_allclose(a.value[k], b.value[k], rtol=1e-14)
    with pytest.raises(ValueError, match="stderr=False"):
        b.stderr
    c = RunningFisher("quasidiag", probes=3, seed=1, stderr=False)
    c.load_state_dict(b.state_dict())
    np.testing.assert_array_equal(c.value["cross:0.weight"], b.value["cross:0.weight"])


@pytest.mark.parametrize("batch_probes", [None, True])
def test_in_place_steps_equal_the_pure_update_of_the_same_probes(batch_probes):
    """step() squares its own probe gradients and updates its state in place (rows pulled back one
    by one on a CPU by default, or as one stack), keeping the moments in a shrinking unit with the
    EMA's weights folded into the cotangents: the same numbers as the pure update_state fed with
    those probes. quasidiag reads each weight gradient twice (g², g_w g_b), so a square taken in
    place too early would show here; decay 0.5 over 25 steps crosses the renormalisation of the
    unit (below 1e-6 after 20 steps)."""
    torch = pytest.importorskip("torch")
    from fisherlib.core import cotangents
    from fisherlib.estimators._running import _step_seed, init_state, layout, state_stderr, state_value, update_state

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(N, 4, dtype=torch.float64), torch.randint(0, 3, (N,))
    be = backends.get("torch", batch_probes=batch_probes)
    rf = RunningFisher("quasidiag", probes=2, decay=0.5, seed=4, backend=be)
    names = [n for n, _ in m.named_parameters()]
    lay = layout(names, [tuple(p.shape) for p in m.parameters()], "quasidiag")
    ref = init_state(lay, next(m.parameters()).detach())
    renormalised = False
    for t in range(25):
        unit = rf._unit
        rf.step(m, None, x, y)
        renormalised |= rf._unit > unit
        z, vjp = be.linearize(m, None, x)
        xi = be.probes(_step_seed(4, t), (2, N, 3), "rademacher", like=z)
        _, cts = cotangents.cross_entropy_and_hutchinson(z, y, xi)
        pulled = [vjp(cts[k]) for k in (1, 2)]
        ref = update_state(lay, ref, [torch.stack([p[n] for p in pulled]) for n in names], N, 0.5)
    assert renormalised
    for k, v in state_value(ref).items():
        torch.testing.assert_close(rf.value[k], v, rtol=1e-12, atol=0)
        torch.testing.assert_close(rf.stderr[k], state_stderr(ref, 2)[k], rtol=1e-10, atol=0)


def test_state_dict_is_a_snapshot_and_update_leaves_the_callers_arrays():
    model, params, x, y = _setup()
    rf = RunningFisher("diag", probes=2, decay=0.9)
    rf.step(model, params, x, y)
    sd = rf.state_dict()
    before = {k: np.copy(v) for k, v in sd["arrays"].items()}
    rf.step(model, params, x, y)
    for k, v in sd["arrays"].items():
        np.testing.assert_array_equal(v, before[k])
    other = RunningFisher("diag", probes=2, decay=0.9)
    other.load_state_dict(sd)
    other.step(model, params, x, y)
    for k, v in sd["arrays"].items():
        np.testing.assert_array_equal(v, before[k])
    g = np.array([[1.0], [3.0]])
    rf2 = RunningFisher("diag", probes=2)
    rf2.update([g], ["w"], n=1)
    rf2.update([g], ["w"], n=1)
    np.testing.assert_array_equal(g, [[1.0], [3.0]])
    np.testing.assert_allclose(rf2.value["diag:w"], [5.0])


def test_update_without_a_backend_takes_immutable_arrays_too():
    """update() with no backend runs the eager in-place path; JAX arrays cannot change in place,
    so the new moments must be stored, not lost."""
    jnp = pytest.importorskip("jax.numpy")
    a, b = RunningFisher("diag", probes=2, decay=0.5), RunningFisher("diag", probes=2, decay=0.5)
    for t in range(25):  # past a renormalisation of the unit (0.5^20 < 1e-6)
        g = np.array([[1.0 + t % 3, 2.0], [2.0 - t % 3, 0.5]])
        a.update([g], ["w"], n=2)
        b.update([jnp.asarray(g)], ["w"], n=2)
    np.testing.assert_allclose(np.asarray(b.value["diag:w"]), a.value["diag:w"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b.stderr["diag:w"]), a.stderr["diag:w"], rtol=1e-5)


@pytest.mark.parametrize("framework_loss", [False, True])
def test_ignored_targets_count_in_neither_the_loss_nor_the_fisher(framework_loss):
    """Targets equal to ignore_index (-100) leave their outputs out: the loss is the counted
    outputs' mean, the loss gradient theirs, and the running estimate equals the one from the
    counted outputs alone (the same probes on them: the ignored rows are zeroed, not dropped)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(N, 4, dtype=torch.float64), torch.randint(0, 3, (N,))
    y_ign = y.clone()
    y_ign[::3] = -100
    kept = y_ign != -100
    kw = {"loss": torch.nn.functional.cross_entropy} if framework_loss else {}
    rf = RunningFisher("diag", probes=3, decay=None, seed=1)
    value, grads = rf.step(m, None, x, y_ign, **kw)
    ref = torch.nn.functional.cross_entropy(m(x[kept]), y[kept])
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    assert abs(float(value) - ref.item()) < 1e-12
    for g, r in zip(grads.values(), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)
    # The same probes (same seed, same step) on the counted outputs only, through the pure update.
    from fisherlib.core import cotangents
    from fisherlib.estimators._running import _step_seed, init_state, layout, state_value, update_state

    be = backends.get("torch")
    z, vjp = be.linearize(m, None, x)
    xi = be.probes(_step_seed(1, 0), (3, N, 3), "rademacher", like=z)
    hut = cotangents.hutchinson(z, xi) * kept[:, None].double()
    pulled = [vjp(hut[k]) for k in range(3)]
    names = [n for n, _ in m.named_parameters()]
    lay = layout(names, [tuple(p.shape) for p in m.parameters()], "diag")
    st = update_state(lay, init_state(lay, z), [torch.stack([p[n] for p in pulled]) for n in names],
                      int(kept.sum()), None)
    for k, v in state_value(st).items():
        torch.testing.assert_close(rf.value[k], v, rtol=1e-10, atol=0)


def test_targets_out_of_range_are_named():
    model, params, x, y = _setup()
    bad = np.array(y)
    bad[2] = 7
    with pytest.raises(ValueError, match=r"targets: class indices must lie in \[0, 3\); got 7"):
        RunningFisher().step(model, params, x, bad)
    with pytest.raises(ValueError, match="no output counts"):
        RunningFisher().step(model, params, x, np.full(N, -100))
    with pytest.raises(ValueError, match="got -100"):
        RunningFisher(ignore_index=None).step(model, params, x, np.full(N, -100))
    with pytest.raises(ValueError, match="integer class indices"):
        RunningFisher().step(model, params, x, y.astype(float))


def test_sequence_targets_shaped_like_the_logits_are_flattened():
    """A sequence model's (N, T) labels with -100 padding, as HuggingFace passes them: the same
    step as with the flattened labels, and as NaturalGradient's plain steps between refreshes."""
    torch = pytest.importorskip("torch")
    from fisherlib.natural import NaturalGradient

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x = torch.randn(3, 6, 4, dtype=torch.float64)  # (N, T, features): logits (3, 6, 3)
    y = torch.randint(0, 3, (3, 6))
    y[:, -2:] = -100  # padding
    a, b = RunningFisher("diag", probes=2, seed=3), RunningFisher("diag", probes=2, seed=3)
    va, ga = a.step(net, None, x, y)
    vb, gb = b.step(net, None, x, y.reshape(-1))
    assert float(va) == float(vb)
    for k in a.value:
        torch.testing.assert_close(a.value[k], b.value[k], rtol=0, atol=0)
    ref = torch.nn.functional.cross_entropy(net(x).reshape(-1, 3), y.reshape(-1))
    assert abs(float(va) - ref.item()) < 1e-12
    opt = NaturalGradient(net, lr=0.1, refresh=2)
    for _ in range(2):  # a refresh, then a plain step
        assert abs(float(opt.backward(x, y)) - ref.item()) < 1e-12
    with pytest.raises(ValueError, match=r"\(18,\) or \(3, 6\)"):
        a.step(net, None, x, y[:, :3])


@pytest.mark.parametrize("decay", [None, 0.8])
def test_update_averages_the_rows_it_is_given_whatever_probes_says(decay):
    """update() with K rows is the mean of those K terms, as the pure update_state (which the
    optax path runs) computes it: an estimate made with probes=1 and one made with probes=4 fed
    the same 4 rows agree, and so do their error bars (both count the 4 draws)."""
    from fisherlib.estimators._running import init_state, layout, state_stderr, state_value, update_state

    rng = np.random.default_rng(3)
    names, shapes = ["w", "b"], [(3, 2), (3,)]
    steps = [[rng.normal(size=(K, *s)) for s in shapes] for K in (4, 2, 4)]
    est = {p: RunningFisher("quasidiag", probes=p, decay=decay) for p in (1, 4)}
    lay = layout(names, shapes, "quasidiag")
    pure = init_state(lay, steps[0][0])
    for grads in steps:
        pure = update_state(lay, pure, grads, 8, decay)
        for rf in est.values():
            rf.update(grads, names, 8)
    want = state_value(pure)
    for p, rf in est.items():
        for k in want:
            np.testing.assert_allclose(rf.value[k], want[k], rtol=1e-12, atol=1e-15, err_msg=f"probes={p} {k}")
    for k in want:
        np.testing.assert_allclose(est[1].stderr[k], est[4].stderr[k], rtol=1e-10, atol=1e-15, err_msg=k)
    # With K = probes at every step the error bar is the documented formula, unchanged.
    same = RunningFisher("diag", probes=4, decay=decay)
    lay_d = layout(names, shapes, "diag")
    ref = init_state(lay_d, steps[0][0])
    for grads in (steps[0], steps[2]):
        same.update(grads, names, 8)
        ref = update_state(lay_d, ref, grads, 8, decay)
    for k, v in state_stderr(ref, 4).items():
        np.testing.assert_allclose(same.stderr[k], v, rtol=1e-10, atol=1e-15)
    with pytest.raises(ValueError, match="probe_grads"):
        RunningFisher("diag").update([np.zeros((2, 3)), np.zeros((3, 3))], ["a", "b"], 8)


def test_none_targets_get_a_clear_error():
    model, params, x, _ = _setup()
    with pytest.raises(ValueError, match=r"targets: got None.*labels"):
        RunningFisher("diag").step(model, params, x, None)


def test_one_logit_under_softmax_names_the_sigmoid_likelihood_and_probabilities_warn():
    """A one-logit model's softmax Fisher is identically 0: fisher() and RunningFisher refuse it,
    naming likelihood='sigmoid'; outputs that are already probabilities warn (first batch)."""
    torch = pytest.importorskip("torch")
    from fisherlib.estimators._running import LogitsWarning

    torch.manual_seed(0)
    binary = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="likelihood='sigmoid'"):
        fisherlib.fisher(binary, None, x, probes=1)
    with pytest.raises(ValueError, match="likelihood='sigmoid'"):
        RunningFisher("diag").step(binary, None, x, torch.zeros(12, dtype=torch.long))
    fisherlib.fisher(binary, None, x, probes=1, likelihood="sigmoid")  # the way out works
    probs = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(dim=-1)).double()
    with pytest.warns(LogitsWarning, match="probabilities"):
        fisherlib.fisher(probs, None, x, probes=1)
    with pytest.warns(LogitsWarning, match="probabilities"):
        RunningFisher("diag").step(probs, None, x, torch.zeros(12, dtype=torch.long))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", LogitsWarning)
        fisherlib.fisher(probs[0], None, x, probes=1)  # real logits: no warning


def test_sigmoid_running_fisher_is_unbiased_for_the_exact_one():
    """RunningFisher(likelihood='sigmoid') of a one-logit classifier: the loss and its gradient
    are torch's mean binary cross-entropy, and the running mean of the terms (θ fixed) is within
    4 standard errors of the exact sigmoid Fisher diagonal (per-input mean)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    x = torch.randn(24, 4, dtype=torch.float64)
    y = (x[:, 0] > 0).double()
    rf = RunningFisher("diag", probes=4, decay=None, likelihood="sigmoid")
    for _ in range(60):
        value, grads = rf.step(net, None, x, y)
    want = torch.nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y)
    assert abs(float(value) - want.item()) < 1e-12
    auto = torch.autograd.grad(want, list(net.parameters()))
    for (n, _), g in zip(net.named_parameters(), auto):
        torch.testing.assert_close(grads[n], g, rtol=1e-10, atol=1e-14)
    exact = fisherlib.fisher(net, None, x, method="exact", likelihood="sigmoid", reduction="mean")
    for n, _ in net.named_parameters():
        est, se = rf.value[f"diag:{n}"], rf.stderr[f"diag:{n}"]
        assert float(se.max()) > 0
        assert bool(((est - exact.value[n]).abs() <= 4 * se + 1e-12).all()), n
    softmax_rf = RunningFisher("diag", probes=4, decay=None)  # a biased variant: the softmax cotangent of
    with pytest.raises(ValueError, match="sigmoid"):           # one logit, refused rather than zero
        softmax_rf.step(net, None, x, y.long())


def test_a_changed_set_of_parameters_is_named():
    """A parameter frozen after the first step: the next step names the leaf that left instead of
    failing on mismatched shapes."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3
    rf = RunningFisher("quasidiag")
    rf.step(net, None, x, y)
    net[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"left out: \['0.bias'\]"):
        rf.step(net, None, x, y)
