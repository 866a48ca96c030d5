"""fisherlib's laplace-torch backend on a BERT encoder that takes token ids (a tensor), where laplace's
BackPACK backend fails: the MiniLM case study's classifier, tiny and random."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
fl = pytest.importorskip("fisherlib.integrations.laplace")  # imports laplace-torch

import fisherlib  # noqa: E402
from fisherlib.demo.minilm import Classifier  # noqa: E402
from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackGGN  # noqa: E402


def test_bert_on_token_ids_where_backpack_fails():
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20, max_position_embeddings=16)
    torch.manual_seed(0)
    net = Classifier(transformers.BertModel(config, add_pooling_layer=False), 3).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (12, 6), generator=g)
    ids[3, 4:] = 0  # padding
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, torch.arange(12) % 3), batch_size=4)

    la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="diag", backend=fl.FisherlibCurvature)
    la.fit(loader)
    ref = fisherlib.fisher(net, None, list(loader), method="exact")
    H = torch.cat([ref.value[n].reshape(-1) for n, _ in net.named_parameters()])
    torch.testing.assert_close(la.H, H, rtol=1e-10, atol=1e-14)

    # BackPACK's hooks write the attribute ``output`` on every module, and BertAttention has a child
    # module of that name (BertSelfOutput): the fit fails before any curvature is computed.
    bp = Laplace(copy.deepcopy(net), "classification", subset_of_weights="all", hessian_structure="diag",
                 backend=BackPackGGN)
    with warnings.catch_warnings(), pytest.raises(TypeError, match="child module 'output'"):
        warnings.simplefilter("ignore")
        bp.fit(loader)
