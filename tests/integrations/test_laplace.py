"""fisherlib as a laplace-torch curvature backend, against laplace-torch's own backends."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
fl = pytest.importorskip("fisherlib.integrations.laplace")  # imports laplace-torch

import fisherlib  # noqa: E402
from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsEF, CurvlinopsGGN  # noqa: E402


def _data(n=40, d=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()


def _fit(backend, structure="diag", subset="all", **kw):
    net = _net()
    la = Laplace(net, "classification", subset_of_weights=subset, hessian_structure=structure, backend=backend, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPACK's and torch's deprecation notes
        la.fit(_data())
    return la


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_exact_ggn_posterior_precision_matches_laplace_backends(subset, structure):
    ours = _fit(fl.FisherlibCurvature, structure, subset)
    refs = [BackPackGGN] + ([CurvlinopsGGN] if structure == "diag" else [])
    for ref in refs:
        theirs = _fit(ref, structure, subset)
        torch.testing.assert_close(ours.posterior_precision, theirs.posterior_precision, rtol=0, atol=1e-6)
        assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-12)
        assert ours.posterior_precision.shape == theirs.posterior_precision.shape


def test_empirical_matches_laplace_ef():
    ours = _fit(fl.curvature(method="empirical"))
    theirs = _fit(BackPackEF)
    torch.testing.assert_close(ours.posterior_precision, theirs.posterior_precision, rtol=0, atol=1e-6)


def test_hutchinson_is_fishers_estimate_batch_by_batch():
    """The backend's H is the sum of fisher()'s per-batch estimates with the batch's global index
    (fresh probes for every batch), and lies within its error bars of the exact GGN."""
    la = _fit(fl.FisherlibCurvature, backend_kwargs={"method": "hutchinson", "probes": 64, "seed": 3})
    net = _net()
    parts = [fisherlib.fisher(net, None, [(X, y)], probes=64, seed=3, first_batch=b)
             for b, (X, y) in enumerate(_data())]
    total = parts[0].merge(parts[1]).merge(parts[2])
    H = torch.cat([total.value[n].reshape(-1) for n, _ in net.named_parameters()])
    se = torch.cat([total.stderr[n].reshape(-1) for n, _ in net.named_parameters()])
    torch.testing.assert_close(la.H, H, rtol=1e-12, atol=0)
    exact = _fit(fl.FisherlibCurvature).H
    assert bool(torch.all((la.H - exact).abs() <= 5 * se + 1e-12))
    assert not torch.allclose(la.H, exact)  # a real estimate, not the exact GGN


def test_subnetwork_and_predictive():
    idx = torch.tensor([0, 3, 7, 50, 70])
    ours = _fit(fl.FisherlibCurvature, subset="subnetwork", subnetwork_indices=idx)
    full = _fit(fl.FisherlibCurvature)
    torch.testing.assert_close(ours.H, full.H[idx], rtol=1e-12, atol=0)
    X, _ = next(iter(_data()))
    probs = full(X, pred_type="glm", link_approx="probit")
    assert probs.shape == (16, 4) and torch.allclose(probs.sum(1), torch.ones(16, dtype=torch.float64))


class _DictModel(torch.nn.Module):
    """laplace-torch's HuggingFace convention: the model takes the batch dict, returns logits."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, batch):
        return self.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_huggingface_bert_where_backpack_fails():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = _DictModel(transformers.BertForSequenceClassification(config).double().eval())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (12, 6), generator=g)
    am = torch.ones(12, 6, dtype=torch.long)
    am[3, 4:] = 0
    data = [{"input_ids": ids[i:i + 4], "attention_mask": am[i:i + 4], "labels": torch.arange(4) % 3}
            for i in range(0, 12, 4)]

    class Loader(list):
        dataset = range(12)

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                 backend=fl.FisherlibCurvature)
    la.fit(Loader(data))
    ref = fisherlib.fisher(model.hf, None, [{k: v for k, v in b.items()} for b in data], method="exact")
    H = torch.cat([ref.value[n.removeprefix("hf.")].reshape(-1) for n, _ in model.named_parameters()])
    torch.testing.assert_close(la.H, H, rtol=1e-10, atol=1e-14)
    bp = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", backend=BackPackGGN)
    with pytest.raises(ValueError, match="BackPACK"):
        bp.fit(Loader(data))


def _conv_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=10)


def _conv_net(groups=1):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, groups=groups), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 2, 2, stride=2, bias=False), torch.nn.Flatten(),
                               torch.nn.Linear(8, 3)).double()


def _fit_kron(backend, net, data, subset="all", **kw):
    la = Laplace(net, "classification", subset_of_weights=subset, hessian_structure="kron", backend=backend, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(data)
    return la


def _assert_same_kron(ours, theirs, atol=1e-12):
    assert [len(F) for F in ours.H_facs.kfacs] == [len(F) for F in theirs.H_facs.kfacs]
    for Fa, Fb in zip(ours.H_facs.kfacs, theirs.H_facs.kfacs):
        for a, b in zip(Fa, Fb):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_kron_factors_match_laplace_curvlinops_backend(subset):
    """Factor by factor over three batches (laplace sums each factor: the per-batch split of
    the scale must be the peer's), so the posterior precisions agree too."""
    ours = _fit_kron(fl.FisherlibCurvature, _net(), _data(), subset)
    theirs = _fit_kron(CurvlinopsGGN, _net(), _data(), subset)
    _assert_same_kron(ours, theirs)
    torch.testing.assert_close(ours.posterior_precision.to_matrix(), theirs.posterior_precision.to_matrix(),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("method, ref", [("exact", CurvlinopsGGN), ("empirical", CurvlinopsEF)])
def test_kron_on_convolutions_matches_curvlinops(method, ref):
    """Patches in the weight's (C, kh, kw) order, a weight without bias, a dense head."""
    ours = _fit_kron(fl.curvature(method=method), _conv_net(), _conv_data())
    _assert_same_kron(ours, _fit_kron(ref, _conv_net(), _conv_data()))


def test_kron_hutchinson_within_error_bars_of_exact():
    data = torch.utils.data.DataLoader(_data().dataset, batch_size=40)  # one batch: Kron = the factors
    ours = _fit_kron(fl.curvature(method="hutchinson", probes=64, seed=1), _net(), data)
    exact = _fit_kron(fl.FisherlibCurvature, _net(), data)
    est = fisherlib.fisher(_net(), None, list(data), structure="kfac", probes=64, seed=1)
    se = [est.factor_stderr[b]["G"][0] for b in ("0", "2")]
    for i, (Fa, Fb) in enumerate(zip(ours.H_facs.kfacs, exact.H_facs.kfacs)):
        if len(Fa) == 2:  # weights: [G, A]; A has no randomness
            torch.testing.assert_close(Fa[1], Fb[1], rtol=1e-12, atol=1e-14)
            assert bool(torch.all((Fa[0] - Fb[0]).abs() <= 5 * se[i // 2] + 1e-12))
            assert not torch.allclose(Fa[0], Fb[0])


def test_kron_on_huggingface_bert_is_fishers_kfac():
    """Embeddings ([diag A, G]), LayerNorm leaves (dense diagonals), a masked position: over one
    batch the diagonal of laplace's Kron is that of fisher(structure="kfac"), leaf by leaf in
    laplace's order, so every layout maps to laplace's axis order."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=12, max_position_embeddings=8, num_labels=3)
    torch.manual_seed(0)
    model = _DictModel(transformers.BertForSequenceClassification(config).double().eval())
    g = torch.Generator().manual_seed(1)
    am = torch.ones(6, 5, dtype=torch.long)
    am[2, 3:] = 0
    batch = {"input_ids": torch.randint(1, 30, (6, 5), generator=g), "attention_mask": am,
             "labels": torch.arange(6) % 3}

    class Loader(list):
        dataset = range(6)

    la = _fit_kron(fl.FisherlibCurvature, model, Loader([batch]))
    with pytest.warns(fisherlib.KroneckerFallbackWarning):
        est = fisherlib.fisher(model.hf, None, [batch], structure="kfac", method="exact")
    ours = torch.diagonal(la.H_facs.to_matrix())
    ref = torch.cat([est.value[n.removeprefix("hf.")].reshape(-1) for n, _ in model.named_parameters()])
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-14)
    probs = la(batch, pred_type="glm", link_approx="probit")
    assert probs.shape == (6, 3) and torch.allclose(probs.sum(1), torch.ones(6, dtype=torch.float64))


def test_unsupported():
    with pytest.raises(ValueError, match="grouped convolution"):
        _fit_kron(fl.FisherlibCurvature, _conv_net(groups=2), _conv_data())
    with pytest.raises(ValueError, match="subnetwork_indices: hessian_structure='kron'"):
        fl.FisherlibCurvature(_net(), "classification", subnetwork_indices=torch.tensor([0])).kron(
            *next(iter(_data())), N=40)
    with pytest.raises(ValueError, match="kfac_approx: expected"):
        fl.curvature(kfac_approx="both")(_net(), "classification")
    with pytest.raises(ValueError, match="likelihood: fisherlib's curvature covers 'classification' only"):
        fl.FisherlibCurvature(_net(), "regression")
    with pytest.raises(ValueError, match="method: expected one of"):
        fl.curvature(method="adam")
    with pytest.raises(TypeError, match="options: unknown \\['damping'\\]"):
        fl.curvature(damping=1.0)
