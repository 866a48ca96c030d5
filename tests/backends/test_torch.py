"""The torch adapter beyond the conformance suite: batch norm, frozen and unused parameters,
convolutions and attention, chunks, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from backend_cases import HAS

from fisherlib.backends import BatchNormWarning, get, testing

pytestmark = pytest.mark.skipif(not HAS["torch"], reason="torch is not installed")


@pytest.fixture
def torch():
    import torch

    torch.manual_seed(0)
    return torch


@pytest.fixture
def be():
    return get("torch")


def _bn_net(torch):
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_batchnorm_in_training_mode_warns_at_the_callers_line(torch, be):
    net = _bn_net(torch)
    with pytest.warns(BatchNormWarning, match="training mode .* batch-norm .* model.eval()") as rec:
        be.linearize(net, None, torch.randn(5, 3))
    assert rec[0].filename == __file__


def test_batchnorm_warning_also_for_explicit_params_and_per_example(torch, be):
    net = _bn_net(torch)
    params = {k: v.detach() for k, v in net.named_parameters()}
    with pytest.warns(BatchNormWarning):
        be.linearize(net, params, torch.randn(5, 3))
    # Per input, training-mode batch norm either updates its running statistics in place inside
    # a torch.func transform (RuntimeError) or cannot normalise a batch of one (ValueError).
    with pytest.warns(BatchNormWarning), pytest.raises((RuntimeError, ValueError)):
        be.per_example_vjp(net, None, torch.randn(5, 3), torch.randn(1, 5, 2))


def test_no_batchnorm_warning_in_eval_mode_or_when_disabled(torch, be):
    net = _bn_net(torch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get("torch", warn_batchnorm=False).linearize(net, None, torch.randn(5, 3))
        net.eval()
        be.linearize(net, None, torch.randn(5, 3))
        be.per_example_vjp(net, None, torch.randn(5, 3), torch.randn(2, 5, 2))
        plain = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
        be.linearize(plain, None, torch.randn(5, 3))  # training mode without batch norm


def test_frozen_parameters_are_left_out(torch, be):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)
    z, vjp = be.linearize(net, None, torch.randn(5, 3))
    assert list(vjp(torch.ones_like(z))) == ["0.bias", "2.weight", "2.bias"]
    assert [n for n, _ in be.leaves(net)] == ["0.bias", "2.weight", "2.bias"]
    rows = be.per_example_vjp(net, None, torch.randn(5, 3), torch.ones(2, 5, 2))
    assert list(rows) == ["0.bias", "2.weight", "2.bias"] and rows["2.weight"].shape == (2, 5, 2, 4)
    assert net[0].weight.grad is None and net[2].weight.grad is None  # .grad is never touched


def test_unused_parameters_get_zeros(torch, be):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    z, vjp = be.linearize(Net(), None, torch.randn(4, 3))
    one, many = vjp(torch.ones_like(z)), vjp(torch.ones(3, *z.shape))
    assert torch.all(one["unused.weight"] == 0) and one["unused.weight"].shape == (2, 3)
    assert torch.all(many["unused.bias"] == 0) and many["unused.bias"].shape == (3, 2)


def test_logits_are_detached_and_vjp_can_be_called_again(torch, be):
    net = torch.nn.Linear(3, 2)
    z, vjp = be.linearize(net, None, torch.randn(4, 3))
    assert not z.requires_grad
    a, b = vjp(torch.ones_like(z)), vjp(torch.ones_like(z))
    assert torch.equal(a["weight"], b["weight"])
    assert not a["weight"].requires_grad


def _conv_net(torch):
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 3),
    ).double()


def _encoder(torch):
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(2, 8)
            self.layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.layer(self.embed(x)).mean(dim=1))

    return Encoder().double().eval()


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # SDPA has no batching rule on CPU
@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_conv_and_attention_models_conform(torch, be, kind):
    """Any differentiable layer works: no layer whitelist."""
    net = _conv_net(torch) if kind == "conv" else _encoder(torch)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64) if kind == "conv" else torch.randn(3, 4, 2, dtype=torch.float64)
    case = testing.Case(net, None, x, lambda a: a.detach().numpy(), torch.from_numpy)
    testing.check_vjp_directional(be, case)
    testing.check_vjp_batched(be, case)
    testing.check_per_example(be, case)


def test_per_example_chunks_agree(torch, be):
    net = _conv_net(torch)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    ct = torch.randn(2, 5, 3, dtype=torch.float64)
    whole = be.per_example_vjp(net, None, x, ct)
    for chunks in (get("torch", chunk_size=2).per_example_vjp(net, None, x, ct),
                   be.per_example_vjp(net, None, x, ct, chunk_size=1)):
        for k in whole:
            torch.testing.assert_close(chunks[k], whole[k])


def test_per_example_with_grad_requiring_dict_records_no_graph(torch, be):
    """A dict of the module's own parameters must not build a graph across chunks."""
    import fisherlib

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(6, 3)
    params = dict(net.named_parameters())
    ct = torch.randn(2, 6, 2)
    for leaf in be.per_example_vjp(net, params, x, ct).values():
        assert not leaf.requires_grad and leaf.grad_fn is None
    est = fisherlib.fisher(net, params, x, method="exact")
    assert all(v.grad_fn is None for v in est.value.values())
    ref = fisherlib.fisher(net, None, x, method="exact")
    for k in ref.value:
        torch.testing.assert_close(est.value[k], ref.value[k])


def test_explicit_dict_with_nested_keys(torch, be):
    net = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    nested = {"0": {"weight": net[0].weight.detach(), "bias": net[0].bias.detach()}}
    x = torch.randn(4, 3, dtype=torch.float64)
    z, vjp = be.linearize(net, nested, x)
    g = vjp(torch.ones_like(z))
    assert set(g) == {"0"} and g["0"]["weight"].shape == (2, 3)
    assert not nested["0"]["weight"].requires_grad  # the caller's tensors are not modified
    torch.testing.assert_close(g["0"]["bias"], torch.full((2,), 4.0, dtype=torch.float64))


def test_errors_name_the_argument(torch, be):
    net = torch.nn.Linear(3, 2)
    z, vjp = be.linearize(net, None, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"ct: expected the logits' shape \(4, 2\)"):
        vjp(torch.ones(4, 3))
    with pytest.raises(TypeError, match="params: required"):
        be.linearize(lambda p, x: x, None, torch.randn(2, 2))
    with pytest.raises(TypeError, match="model: expected an nn.Module or a callable"):
        be.linearize(3, {"w": torch.ones(1)}, torch.randn(2, 2))
    with pytest.raises(ValueError, match="cotangents: expected shape"):
        be.per_example_vjp(net, None, torch.randn(4, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="dist: expected one of"):
        be.probes(0, (2,), "normal", z)
    with pytest.raises(TypeError, match="like: expected a floating torch tensor"):
        be.probes(0, (2,), "gaussian", torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="seed: expected an int"):
        be.probes(0.5, (2,), "gaussian", z)
    with pytest.raises(ValueError, match="leaves: the tree has 2 leaves"):
        be.unflatten(net, [torch.ones(1)])


def test_probes_follow_device_and_dtype(torch, be):
    like = torch.zeros(2, dtype=torch.float16)
    out = be.probes(3, (4, 5), "rademacher", like)
    assert out.dtype == torch.float16 and out.device == like.device
    assert torch.equal(out, be.probes(3, (4, 5), "rademacher", like))


@pytest.mark.parametrize("shape", [(1, 7, 5), (3, 11, 13), (2, 6, 3, 5)])
def test_probe_rows_are_the_probes_rows(torch, be, shape):
    """A draw by rows gives probes(...)[:, a:b] exactly, at offsets that split a random byte."""
    like = torch.zeros(1, dtype=torch.float32)
    whole = be.probes(4, shape, "rademacher", like)
    rows = be.probe_rows(4, shape, "rademacher", like)
    assert rows.shape == shape
    N = shape[1]
    for a, b in [(0, N), (0, 1), (1, 4), (3, N), (2, 2)]:
        assert torch.equal(rows(a, b), whole[:, a:b])
    assert torch.equal(torch.cat([rows(a, min(N, a + 3)) for a in range(0, N, 3)], dim=1), whole)
    assert set(whole.unique().tolist()) == {-1.0, 1.0} and rows(0, N).dtype == like.dtype
    gauss = be.probe_rows(4, shape, "gaussian", like)  # other distributions: drawn whole, sliced
    assert torch.equal(gauss(1, 3), be.probes(4, shape, "gaussian", like)[:, 1:3])
    with pytest.raises(ValueError, match="rows"):
        rows(2, N + 1)
    with pytest.raises(ValueError, match="shape"):
        be.probe_rows(4, (5,), "rademacher", like)


def test_probe_rows_keep_nothing_alive(torch, be):
    """A draw by rows holds ``like`` (a batch's logits) only while it lives: no cache keeps the
    draws, which kept one (N·T, V) logits array per batch of a language-model stream alive."""
    import gc
    import weakref

    like = torch.zeros(3, 4)
    gone = weakref.ref(like)
    rows = be.probe_rows(0, (1, 3, 4), "rademacher", like)
    rows(0, 3)
    del rows, like
    gc.collect()
    assert gone() is None


def test_leaves_and_unflatten_round_trip(torch, be):
    tree = {"a": [torch.ones(2), torch.zeros(3)], "b": (torch.ones(1), 7), "c": torch.arange(3)}
    named = be.leaves(tree)
    assert [n for n, _ in named] == ["a.0", "a.1", "b.0"]  # integers and ints are not parameters
    back = be.unflatten(tree, [2 * a for _, a in named])
    assert back["b"][1] == 7 and torch.equal(back["c"], tree["c"]) and torch.equal(back["a"][0], 2 * torch.ones(2))
    assert np.allclose(back["b"][0].numpy(), 2.0)


def test_looping_over_probes_gives_the_batched_result(torch):
    net = _conv_net(torch)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    case = testing.Case(net, None, x, lambda a: a.detach().numpy(), torch.from_numpy)
    testing.check_vjp_batched(get("torch", batch_probes=False), case)
    z, vjp = get("torch", batch_probes=False).linearize(net, None, x)
    _, ref = get("torch").linearize(net, None, x)
    ct = torch.randn(4, *z.shape, dtype=torch.float64)
    for k, g in vjp(ct).items():
        torch.testing.assert_close(g, ref(ct)[k])


class _Counting:
    """The torch adapter, counting VJP calls, optionally without its ``parameters`` method."""

    def __init__(self, be, with_parameters: bool):
        self.be, self.name, self.vjps = be, be.name, 0
        if with_parameters:
            self.parameters = be.parameters

    def linearize(self, model, params, inputs):
        z, vjp = self.be.linearize(model, params, inputs)

        def counted(ct):
            self.vjps += 1
            return vjp(ct)

        return z, counted

    def __getattr__(self, attr):  # per_example_vjp, probes, leaves, unflatten
        if attr == "parameters":
            raise AttributeError(attr)
        return getattr(self.be, attr)


def test_module_parameters_cost_no_extra_vjp(torch, be):
    import fisherlib

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(6, 3, dtype=torch.float32)
    results = {}
    for with_parameters in (True, False):
        counting = _Counting(be, with_parameters)
        est = fisherlib.fisher(net, None, [x[:3], x[3:]], probes=2, seed=1, backend=counting)
        results[with_parameters] = (counting.vjps, est.value)
    assert results[True][0] == 2 and results[False][0] == 3  # one per batch, + 1 to learn the tree
    for k, v in results[True][1].items():
        torch.testing.assert_close(v, results[False][1][k])
        assert v.shape == dict(net.named_parameters())[k].shape
