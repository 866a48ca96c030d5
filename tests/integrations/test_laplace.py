"""fisherlib as a laplace-torch curvature backend, against laplace-torch's own backends."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
fl = pytest.importorskip("fisherlib.integrations.laplace")  # imports laplace-torch

import fisherlib  # noqa: E402
from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsGGN  # noqa: E402


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


def test_unsupported():
    with pytest.raises(NotImplementedError, match="kron"):
        _fit(fl.FisherlibCurvature, structure="kron")
    with pytest.raises(ValueError, match="likelihood: fisherlib's curvature covers 'classification' only"):
        fl.FisherlibCurvature(_net(), "regression")
    with pytest.raises(ValueError, match="method: expected one of"):
        fl.curvature(method="adam")
    with pytest.raises(TypeError, match="options: unknown \\['damping'\\]"):
        fl.curvature(damping=1.0)
