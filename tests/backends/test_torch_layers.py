"""Layer I/O for torch: per-example products from layer rules agree with the generic vmap path.

Every recognised layer kind, and models mixing covered and uncovered leaves, in float64: the
layer route (``backends.get("torch")``) against the generic per-example VJP
(``backends.get("torch", layer_io=False)``) to rounding, for every per-example method and the
diag / trace / blocks structures. Models the generic path cannot run (a HuggingFace BERT) are
checked against a loop over inputs with plain autograd.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import fisherlib  # noqa: E402
from fisherlib import backends  # noqa: E402

TOL = 1e-10

CASES = [
    dict(method="exact"),
    dict(method="exact", bound="upper"),
    dict(method="exact", bound="lower", rank=2),
    dict(method="exact", likelihood="sigmoid"),
    dict(method="empirical"),
    dict(method="hutchinson", per_example=True, probes=3),
    dict(method="hutchinson", per_example=True, probes=2, bound="upper"),
    dict(method="mc", per_example=True, probes=2),
    dict(method="exact", structure="trace"),
    dict(method="exact", structure="blocks", blocks="unitwise"),
]


class Tokens(nn.Module):
    """Embedding (with padding and repeated rows), a positional parameter added directly
    (uncovered), LayerNorm, RMSNorm and a Linear over shared positions."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(5, 4))
        self.ln = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.lin = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.rms(torch.tanh(self.ln(self.emb(ids) + self.pos)))
        return self.lin(h).mean(1)


class Block(nn.Module):
    """A resnet basic block: conv-bn-relu(inplace)-conv-bn, residual added in place."""

    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        out += x
        return self.relu(out)


def _warm(model, x):
    with torch.no_grad():
        model(x.float() if x.is_floating_point() else x)
    return model


def models():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, stride=2, groups=2), nn.GroupNorm(2, 4), nn.ReLU(inplace=True),
                        nn.Conv2d(4, 3, (2, 3), dilation=(1, 2), padding="same"), nn.BatchNorm2d(3), nn.Flatten(),
                        nn.LazyLinear(5))
    xc = torch.randn(3, 2, 6, 6, generator=g)
    c1 = nn.Sequential(nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular"), nn.Flatten(), nn.LazyLinear(3))
    x1 = torch.randn(3, 2, 7, generator=g)
    c3 = nn.Sequential(nn.Conv3d(1, 2, 2, stride=(1, 2, 1)), nn.Flatten(), nn.LazyLinear(3))
    x3 = torch.randn(3, 1, 4, 4, 4, generator=g)
    res = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True), Block(3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    xr = torch.randn(4, 1, 5, 5, generator=g)
    ids = torch.randint(0, 11, (4, 5), generator=g)
    ids[0, :2] = 0
    ids[1, 1] = ids[1, 3]
    mha = _MHA()
    xm = torch.randn(3, 4, 6, generator=g)
    out = [("mlp", mlp, torch.randn(7, 6, generator=g)), ("cnn", _warm(cnn, xc), xc), ("conv1d", _warm(c1, x1), x1),
           ("conv3d", _warm(c3, x3), x3), ("resnet-block", res, xr), ("tokens", Tokens(), ids), ("mha", mha, xm)]
    for _, m, _ in out:
        for mod in m.modules():  # non-trivial batch-norm statistics and affine parameters
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
                with torch.no_grad():
                    mod.weight.uniform_(0.5, 1.5, generator=g)
                    mod.bias.uniform_(-0.5, 0.5, generator=g)
        m.double().eval()
    return [(name, m, x.double() if x.is_floating_point() else x) for name, m, x in out]


class _MHA(nn.Module):
    """nn.MultiheadAttention uses its projection weights directly: they take the fallback."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.att(x, x, x, need_weights=False)[0].mean(1))


MODELS = models()


def _max_rel(a, b):
    """Largest error relative to each leaf's scale, floored at 1e-8 of the largest leaf's: leaves
    that vanish in exact arithmetic (attention key biases) hold only rounding noise."""
    if not isinstance(a, dict):
        return float((a - b).abs().max() / (b.abs().max() + 1e-300))
    top = max(float(v.abs().max()) for v in b.values())
    return max(float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), 1e-8 * top, 1e-300) for k in b)


@pytest.mark.parametrize("name,model,x", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_layer_rules_match_generic_path(name, model, x, kw):
    C = model(x).shape[-1]
    if kw.get("likelihood") == "sigmoid":
        y = torch.randint(0, 2, (x.shape[0], C)).double()
    else:
        y = torch.arange(x.shape[0]) % C
    batches = [(x, y)] if kw["method"] == "empirical" else [x]
    fast = fisherlib.fisher(model, None, batches, seed=3, **kw)
    slow = fisherlib.fisher(model, None, batches, seed=3, backend=backends.get("torch", layer_io=False), **kw)
    assert _max_rel(fast.value, slow.value) < TOL
    if fast.stderr_kind == "probes":  # to rounding on the scale of the values
        for k in slow.value:
            assert float((fast.stderr[k] - slow.stderr[k]).abs().max()) <= 1e-8 * float(slow.value[k].abs().max())


def test_explicit_params_and_chunks():
    """A params dict (functional_call), several batches, and chunk_size forcing chunks."""
    _, model, x = MODELS[1]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = [x[:2], x[2:]]
    for kw in (dict(method="exact"), dict(method="exact", structure="blocks", chunk_size=1)):
        fast = fisherlib.fisher(model, params, batches, **kw)
        slow = fisherlib.fisher(model, params, batches, backend=backends.get("torch", layer_io=False), **kw)
        assert _max_rel(fast.value, slow.value) < TOL


def _vjp_calls(monkeypatch):
    calls = []
    cls = type(backends.get("torch"))
    orig = cls.per_example_vjp

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(cls, "per_example_vjp", spy)
    return calls


def test_covered_model_takes_no_per_example_vjp(monkeypatch):
    calls = _vjp_calls(monkeypatch)
    _, model, x = MODELS[0]
    for structure in ("diag", "trace", "blocks"):
        fisherlib.fisher(model, None, x, method="exact", structure=structure)
    assert calls == []
    _, model, ids = MODELS[5]  # the positional parameter is uncovered: one generic call
    fisherlib.fisher(model, None, ids, method="exact")
    assert len(calls) == 1


def test_uncovered_leaves():
    be = backends.get("torch")
    for name, model, x in MODELS:
        _, cap = be.layer_io(model, None, x)
        expected = {"tokens": ["pos"], "mha": ["att.in_proj_weight", "att.in_proj_bias", "att.out_proj.weight",
                                                "att.out_proj.bias"]}.get(name, [])
        assert cap.uncovered == expected, name


def test_tied_weight_is_uncovered():
    emb = nn.Embedding(7, 4)
    head = nn.Linear(4, 7, bias=False)
    head.weight = emb.weight  # tied, as language models tie input and output embeddings

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = emb, head

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids))).mean(1)

    model = Tied().double()
    ids = torch.randint(0, 7, (3, 4))
    _, cap = backends.get("torch").layer_io(model, None, ids)
    assert cap.uncovered == ["emb.weight"]
    fast = fisherlib.fisher(model, None, ids, method="exact")
    slow = fisherlib.fisher(model, None, ids, method="exact", backend=backends.get("torch", layer_io=False))
    assert _max_rel(fast.value, slow.value) < TOL


def test_sequence_first_layout_is_detected():
    """A (T, N, d) layout with T == N must not be read as N inputs: one backward tells."""
    layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0)  # batch_first=False

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = layer, nn.Linear(6, 3)

        def forward(self, x):  # x (N, T, d) -> (T, N, d) inside
            return self.head(self.enc(x.transpose(0, 1)).mean(0))

    model = SeqFirst().double().eval()
    x = torch.randn(4, 4, 6, dtype=torch.float64)  # T == N
    _, cap = backends.get("torch").layer_io(model, None, x)
    assert "enc.linear1.weight" in cap.uncovered and "head.weight" not in cap.uncovered
    fast = fisherlib.fisher(model, None, x, method="exact")
    slow = fisherlib.fisher(model, None, x, method="exact", backend=backends.get("torch", layer_io=False))
    assert _max_rel(fast.value, slow.value) < TOL


def test_batchnorm_in_training_mode_is_refused_and_statistics_never_change():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    x = torch.randn(6, 3, dtype=torch.float64)
    before = [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError, match="model: BatchNorm1d normalises with the statistics of the batch"):
        fisherlib.fisher(model, None, x, method="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fisherlib.fisher(model, None, x, probes=2)  # a batch method runs in training mode
        fisherlib.fisher(model, None, x, method="mc")
    for a, b in zip(before, model.buffers()):
        assert torch.equal(a, b)


def test_dropout_in_training_mode_warns_and_is_exact_for_its_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="training mode with dropout"):
        est = fisherlib.fisher(model, None, x, method="exact")
    # the same forward (same dropout mask) as a deterministic model gives the same Fisher
    torch.manual_seed(1)
    mask = (nn.functional.dropout(torch.ones(4, 8, dtype=torch.float64), 0.5, training=True))
    ref = _loop_exact(lambda n: model[3](mask[n:n + 1] * model[1](model[0](x[n:n + 1])))[0], model, 4)
    assert _max_rel(est.value, ref) < TOL


def _loop_exact(out_of, model, N):
    """Σ_n Σ_k (∂ (B e_k)ᵀ z_n / ∂θ)²: the exact diagonal by plain autograd, one input at a time."""
    params = dict(model.named_parameters())
    ref = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(N):
        z = out_of(n)
        p = z.softmax(-1).detach()
        B = torch.diag(p.sqrt()) - torch.outer(p, p.sqrt())
        for k in range(z.shape[-1]):
            gs = torch.autograd.grad(z @ B[:, k], list(params.values()), retain_graph=True, allow_unused=True)
            for (name, _), g in zip(params.items(), gs):
                if g is not None:
                    ref[name] += g * g
    return ref


def test_huggingface_bert_with_attention_mask():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    bert = transformers.BertForSequenceClassification(cfg).double().eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = bert

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).logits

    model = Wrap()
    ids = torch.randint(1, 50, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    _, cap = backends.get("torch").layer_io(model, None, (ids, mask))
    assert cap.uncovered == []  # the (1, T) position embeddings are expanded over the batch
    est = fisherlib.fisher(model, None, [((ids, mask), torch.tensor([0, 1, 2, 1]))], method="exact")
    ref = _loop_exact(lambda n: model(ids[n:n + 1], mask[n:n + 1])[0], model, 4)
    assert _max_rel(est.value, ref) < 1e-9
    for kw in (dict(method="empirical"), dict(per_example=True, probes=2), dict(method="mc", per_example=True)):
        batch = [((ids, mask), torch.tensor([0, 1, 2, 1]))]
        value = fisherlib.fisher(model, None, batch, **kw).value
        assert all(bool(torch.isfinite(v).all()) for v in value.values())
    bert.train()  # dropout: one forward, a warning
    with pytest.warns(UserWarning, match="dropout"):
        fisherlib.fisher(model, None, [((ids, mask), None)], method="exact")


@pytest.mark.parametrize("structure", ["diag", "trace", "blocks"])
def test_exact_columns_in_chunks(monkeypatch, structure):
    """A tiny element budget splits the C exact columns (and the inputs) into many chunks."""
    from fisherlib.core import layers as core_layers
    from fisherlib.estimators import _products

    _, model, x = MODELS[1]  # convolutions (shared positions) and a dense head
    whole = fisherlib.fisher(model, None, x, method="exact", structure=structure)
    monkeypatch.setattr(_products, "ELEMENTS", 64)
    monkeypatch.setattr(_products, "COLUMN_ELEMENTS", 64)
    monkeypatch.setattr(core_layers, "_ELEMENTS", 64)
    chunked = fisherlib.fisher(model, None, x, method="exact", structure=structure)
    assert _max_rel(chunked.value, whole.value) < TOL


def test_huggingface_gpt2_with_transposed_linear_layers():
    """GPT-2's Conv1D layers (weights stored (in, out)) are dense layers: every leaf is covered."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=12, n_layer=2, n_head=2, num_labels=3,
                                  pad_token_id=0, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    gpt = transformers.GPT2ForSequenceClassification(cfg).double().eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = gpt

        def forward(self, ids):
            return self.m(input_ids=ids).logits

    model = Wrap()
    ids = torch.randint(1, 40, (3, 6))
    _, cap = backends.get("torch").layer_io(model, None, ids)
    assert cap.uncovered == []
    est = fisherlib.fisher(model, None, [(ids, None)], method="exact")
    ref = _loop_exact(lambda n: model(ids[n:n + 1])[0], model, 3)
    assert _max_rel(est.value, ref) < 1e-9


@pytest.mark.parametrize("kw", [dict(), dict(bound="upper"), dict(bound="lower", rank=2), dict(likelihood="sigmoid"),
                                dict(structure="trace"), dict(structure="blocks")])
def test_linear_head_on_fixed_features(kw, monkeypatch):
    """A layer whose output is the logits needs Σ_k u_k² only: one column, whatever C."""
    from fisherlib.estimators import _products

    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 7)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    columns = []
    orig = _products.column_chunks
    monkeypatch.setattr(_products, "column_chunks", lambda *a: columns.append(1) or orig(*a))
    fast = fisherlib.fisher(head, None, x, method="exact", **kw)
    assert bool(columns) == (kw.get("structure") == "blocks")  # blocks need the columns themselves
    slow = fisherlib.fisher(head, None, x, method="exact", backend=backends.get("torch", layer_io=False), **kw)
    assert _max_rel(fast.value, slow.value) < TOL
