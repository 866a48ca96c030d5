"""The Fisher of causal language models (issue 24), on the tiny twin of GPT-2 small.

The workload (:mod:`fisherlib.demo.lm`), the memory-lean paths (cotangents formed in chunks of
positions, the graph freed by the last pull-back) against the one-piece computation, and the
integrations language-model users run, each against a dense float64 reference or the plain
float32 path.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import fisherlib  # noqa: E402
from fisherlib.core import cotangents  # noqa: E402
from fisherlib.demo import lm  # noqa: E402

from token_reference import as_numpy, diag_tree, token_fisher  # noqa: E402

V = 37  # a small vocabulary keeps the dense references' per-class loops short


def _model(**kw):
    return lm.gpt2("tiny", seed=0, vocab_size=V, **kw)


def _batch(n=2, length=6, seed=1, vocab=V):
    return next(lm.lm_batches(lm.random_ids(n * length + 1, vocab, seed=seed), n, length))


def _flat(est):
    return np.concatenate([np.asarray(v.detach().double()).ravel() for v in est.value.values()])


# ------------------------------------------------------------------------------- the workload


def test_gpt2_small_config_is_gpt2_small():
    cfg = lm.SIZES["small"]
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab_size"]) == (12, 768, 12, 50257)
    model = _model()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.transformer.wte.weight
    assert model.config._attn_implementation == "sdpa"
    out = model(input_ids=_batch()["input_ids"]).logits
    assert tuple(out.shape) == (2, 6, V)


def test_text_and_batches():
    text = lm.text()
    assert len(text) > 400_000 and "assert" in text  # CPython's help topics ship with Python
    ids = lm.token_ids("bytes")
    assert ids.max() < 256 and ids.shape[0] >= len(text)
    b = list(lm.lm_batches(ids, n=3, length=8, batches=2))
    assert len(b) == 2
    x, y = b[0]["input_ids"], b[0]["labels"]
    assert tuple(x.shape) == tuple(y.shape) == (3, 8)
    assert torch.equal(y[:, :-1], x[:, 1:]) and bool((y[:, -1] == -100).all())
    assert int(y[0, -1 - 0 - 1]) == int(x[0, -1])  # position t's label is token t + 1
    assert torch.equal(b[1]["input_ids"].reshape(-1)[:1], torch.as_tensor(ids[24:25]))
    with pytest.raises(ValueError, match="tokenizer"):
        lm.token_ids("words")
    with pytest.raises(ValueError, match="size"):
        lm.gpt2("medium")


def test_lm_loss_is_the_models_own_loss():
    model, batch = _model(), _batch()
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])  # HF shifts its labels itself
    mine = lm.lm_loss(out.logits, batch["labels"])
    assert torch.allclose(mine, out.loss, rtol=1e-6)


# ---------------------------------------------------------------------- memory-lean paths


@pytest.mark.parametrize("method", ["hutchinson", "mc"])
def test_cotangents_in_chunks_of_positions_give_the_same_numbers(monkeypatch, method):
    model, batch = _model(), _batch(n=3, length=8)
    whole = fisherlib.fisher(model, None, [batch], method=method, probes=2, seed=3)
    calls = []
    by_rows = cotangents.by_rows

    def spy(f, z, stack, budget=None):
        calls.append(z.shape)
        return by_rows(f, z, stack, budget=budget)

    monkeypatch.setattr(cotangents, "ROWS", 5 * V)  # a few positions per chunk
    monkeypatch.setattr(cotangents, "by_rows", spy)
    chunked = fisherlib.fisher(model, None, [batch], method=method, probes=2, seed=3)
    assert calls  # the chunked path ran
    np.testing.assert_allclose(_flat(chunked), _flat(whole), rtol=1e-6, atol=0)


def test_hutchinson_draws_its_probes_by_rows_with_the_same_values(monkeypatch):
    """fisher() takes the adapter's draw by rows (no (K, N·T, V) probe array) and gets the numbers
    of the whole draw; a subclass that redefines ``probes`` keeps its own draws."""
    from fisherlib.backends.torch import TorchBackend

    model, batch = _model(), _batch(n=3, length=8)
    monkeypatch.setattr(cotangents, "ROWS", 5 * V)  # a few positions per chunk
    whole_calls = []

    class Whole(TorchBackend):  # the probes drawn whole, as adapters without probe_rows do
        def probes(self, seed, shape, dist, like):
            whole_calls.append(shape)
            return super().probes(seed, shape, dist, like)

    class Spy(TorchBackend):
        def probe_rows(self, seed, shape, dist, like):
            rows = super().probe_rows(seed, shape, dist, like)
            spans.append(shape)

            class Rows:
                def __init__(self):
                    self.shape = rows.shape

                def __call__(self, a, b):
                    spans.append((a, b))
                    return rows(a, b)

            return Rows()

    spans = []
    for probes in (1, 3):
        lazy = fisherlib.fisher(model, None, [batch], probes=probes, seed=3, backend=Spy())
        whole = fisherlib.fisher(model, None, [batch], probes=probes, seed=3, backend=Whole())
        assert spans[0] == (probes, 3 * 8, V) and len(spans) > 2 and all(b - a < 24 for a, b in spans[1:])
        assert whole_calls == [(probes, 3 * 8, V)]  # Whole's probes: probe_rows not used
        np.testing.assert_array_equal(_flat(lazy), _flat(whole))
        spans.clear(), whole_calls.clear()


def test_by_rows_writes_every_chunk():
    rng = np.random.default_rng(0)
    z, xi = rng.normal(size=(11, 4)), rng.choice([-1.0, 1.0], size=(3, 11, 4))
    want = cotangents.hutchinson(z, xi)
    got = cotangents.by_rows(lambda a, b: cotangents.hutchinson(a, b), z, xi, budget=3 * 4 * 2)
    np.testing.assert_array_equal(got, want)

    class Rows:  # a draw by rows: asked only for chunks
        shape = xi.shape

        def __call__(self, a, b):
            asked.append((a, b))
            return xi[:, a:b]

    asked = []
    np.testing.assert_array_equal(cotangents.hutchinson(z, Rows()), want)  # fits ROWS: one call
    assert asked == [(0, 11)]
    asked.clear()
    np.testing.assert_array_equal(cotangents.by_rows(cotangents.simplex.factor_matvec, z, Rows(), budget=24), want)
    assert asked == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 11)]
    u = rng.uniform(size=(3, 11))
    np.testing.assert_array_equal(cotangents.by_rows(cotangents.sample_labels, z, u, budget=12),
                                  cotangents.sample_labels(z, u))


def test_last_pull_back_frees_the_graph_and_gives_the_same_gradients():
    model, batch = _model(), _batch()
    be = fisherlib.backends.get("torch")
    z, vjp = be.linearize(model, None, {"input_ids": batch["input_ids"]})
    assert vjp.frees_graph
    ct = torch.randn(2, *z.shape, generator=torch.Generator().manual_seed(0))
    kept = vjp(ct)
    freed = vjp(ct, last=True)
    for k in kept:
        assert torch.equal(kept[k], freed[k])
    with pytest.raises(RuntimeError):
        vjp(ct)  # the saved activations are gone


# ------------------------------------------------------------------ exact head, subsets


def _untied():
    return _model(tie=False)


def test_exact_head_diagonal_in_closed_form_matches_the_dense_reference(monkeypatch):
    model, batch = _untied(), _batch(n=2, length=5)
    head = {"lm_head.weight": model.lm_head.weight}
    weights = (batch["labels"] != -100).double().numpy()
    ref = diag_tree(*token_fisher(model.double(), {"input_ids": batch["input_ids"]}, weights, params=dict(
        head), full=False))
    model.float()
    columns = []
    from fisherlib.estimators import _products

    orig = _products.column_chunks
    monkeypatch.setattr(_products, "column_chunks", lambda *a, **k: columns.append(1) or orig(*a, **k))
    est = fisherlib.fisher(model, head, [batch], method="exact")
    assert not columns  # one column √diag I(z), not V·T of them
    np.testing.assert_allclose(as_numpy(est.value)["lm_head.weight"], ref["lm_head.weight"], rtol=2e-5,
                               atol=1e-9 * ref["lm_head.weight"].max())
    assert est.n_outputs == 2 * 4


def test_exact_and_per_example_methods_on_the_last_block_and_head():
    model, batch = _untied().double(), _batch(n=2, length=4)
    last = {n: p for n, p in model.named_parameters()
            if n.startswith(("transformer.h.1.", "transformer.ln_f.", "lm_head."))}
    weights = (batch["labels"] != -100).double().numpy()
    inputs = {"input_ids": batch["input_ids"]}
    F, names, shapes = token_fisher(model, inputs, weights, params=last, full=False)
    ref = diag_tree(F, names, shapes)
    exact = as_numpy(fisherlib.fisher(model, last, [batch], method="exact").value)
    emp_ref = diag_tree(*token_fisher(model, inputs, weights, params=last, full=False,
                                      labels=torch.where(batch["labels"] < 0, 0, batch["labels"]).numpy()))
    emp = as_numpy(fisherlib.fisher(model, last, [batch], method="empirical").value)
    for n in names:
        np.testing.assert_allclose(exact[n], ref[n], rtol=1e-8, atol=1e-12 * ref[n].max())
        np.testing.assert_allclose(emp[n], emp_ref[n], rtol=1e-8, atol=1e-12 * max(emp_ref[n].max(), 1e-300))
    # per-example Hutchinson: unbiased for the same F; its trace within 5 standard errors
    est = fisherlib.fisher(model, last, [batch], per_example=True, probes=64, seed=0, structure="trace")
    value, se = float(est.value), float(est.stderr)
    assert 0 < se < 0.3 * value
    assert abs(value - sum(ref[n].sum() for n in names)) < 5 * se


# ----------------------------------------------------------------------------------- K-FAC


def _hand_factors(model, batch, layer):
    """A and G of a Conv1D layer by hand (float64): x̃ from a hook, g by one backward per output
    term, the columns √p_k (e_k − p) of the output Fisher's factor at each counted position."""
    seen = {}
    hook = layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), y=o))
    logits = model(input_ids=batch["input_ids"]).logits
    hook.remove()
    x, y, p = seen["x"], seen["y"], torch.softmax(logits.detach(), -1)
    keep = batch["labels"] != -100
    N, T = keep.shape
    cts = []
    for n, t in keep.nonzero().tolist():
        for k in range(V):
            ct = torch.zeros_like(logits)
            ct[n, t] = p[n, t, k].sqrt() * (torch.eye(V, dtype=p.dtype)[k] - p[n, t])
            cts.append(ct)
    g = torch.autograd.grad(logits, y, torch.stack(cts), is_grads_batched=True)[0]  # (M, N, T, O)
    w = keep.double()
    xt = torch.cat([x, torch.ones(N, T, 1, dtype=x.dtype)], -1)
    xbar = (xt * w[..., None]).sum(1) / w.sum(1, keepdim=True)  # mean over the counted positions
    return {"expand": (torch.einsum("ns,nsi,nsj->ij", w, xt, xt) / w.sum(), torch.einsum("mnso,mnsp->op", g, g)),
            "reduce": (xbar.T @ xbar / N, torch.einsum("mno,mnp->op", g.sum(2), g.sum(2)))}


def test_kfac_on_the_tied_causal_lm_matches_hand_computed_factors():
    """K-FAC (reduce and expand) of a first-block layer of the tied tiny twin: A and G equal the
    hand-computed ones (attention in the next block mixes the positions, so the two differ); the
    whole tied model runs, the tied embedding on its diagonal (named in the warning)."""
    from fisherlib import KroneckerFallbackWarning

    model, batch = _model(dtype=torch.float64, attn="eager"), _batch(n=2, length=5)
    assert model.lm_head.weight is model.transformer.wte.weight
    name = "transformer.h.0.mlp.c_fc"
    layer = model.transformer.h[0].mlp.c_fc
    ref = _hand_factors(model, batch, layer)
    assert not torch.allclose(ref["expand"][1], ref["reduce"][1], rtol=1e-3)
    model.config._attn_implementation = "sdpa"  # the estimate through the fused attention
    sub = {f"{name}.weight": layer.weight, f"{name}.bias": layer.bias}
    for setting, (A, G) in ref.items():
        f = fisherlib.fisher(model, sub, [batch], structure="kfac", kfac_approx=setting, method="exact").factors[name]
        np.testing.assert_allclose(f["A"][0].numpy(), A.numpy(), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(f["G"][0].numpy(), G.numpy(), rtol=1e-8, atol=1e-12 * float(G.abs().max()))
    for setting, (A, G) in ref.items():  # every parameter, one probe each: the benchmark's call
        with pytest.warns(KroneckerFallbackWarning, match="transformer.wte.weight"):
            est = fisherlib.fisher(model, None, [batch], structure="kfac", kfac_approx=setting, probes=64, seed=0)
        assert "transformer.wte.weight" in est.fallback and name in [b.name for b in est.blocks]
        assert all(bool(torch.isfinite(v).all()) for v in est.value.values())
        np.testing.assert_allclose(est.factors[name]["A"][0].numpy(), A.numpy(), rtol=1e-10, atol=1e-14)
        g_hat, se = torch.diagonal(est.factors[name]["G"][0]), torch.diagonal(est.factor_stderr[name]["G"][0])
        assert bool((se > 0).all()) and bool(((g_hat - torch.diagonal(G)).abs() <= 5 * se).all())  # unbiased G


# ------------------------------------------------------------------------------ integrations


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_reduced_precision_weights_accumulate_in_float32(dtype, tol):
    batch = _batch(n=2, length=6)
    ref = fisherlib.fisher(_model(dtype=torch.float64), None, [batch], probes=4, seed=2)
    low = fisherlib.fisher(_model(dtype=dtype), None, [batch], probes=4, seed=2)
    assert all(v.dtype == torch.float32 for v in low.value.values())
    assert all(v.dtype == torch.float32 for v in low.stderr.values())
    assert _rel(_flat(low), _flat(ref)) < tol  # the same probes (seeded signs), rounding apart
    worse = fisherlib.fisher(_model(dtype=torch.float64), None, [batch], probes=4, seed=3)
    assert _rel(_flat(worse), _flat(ref)) > 5 * tol  # another draw is far: the check can fail
    model64, modellow = _model(dtype=torch.float64, tie=False), _model(dtype=dtype, tie=False)
    e64 = fisherlib.fisher(model64, {"lm_head.weight": model64.lm_head.weight}, [batch], method="exact")
    elow = fisherlib.fisher(modellow, {"lm_head.weight": modellow.lm_head.weight}, [batch], method="exact")
    assert elow.value["lm_head.weight"].dtype == torch.float32
    assert _rel(_flat(elow), _flat(e64)) < tol


def test_autocast_forward_accumulates_in_float32():
    batch = _batch(n=2, length=6)
    ref = fisherlib.fisher(_model(dtype=torch.float64), None, [batch], probes=4, seed=2)
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        est = fisherlib.fisher(model, None, [batch], probes=4, seed=2)
        mc = fisherlib.fisher(model, None, [batch], method="mc", probes=2, seed=2)
    assert all(v.dtype == torch.float32 for v in est.value.values())
    assert _rel(_flat(est), _flat(ref)) < 0.03  # measured 0.004; another draw: 0.95
    assert np.isfinite(_flat(mc)).all() and _flat(mc).sum() > 0


def test_gradient_checkpointing_gives_the_same_fisher():
    batch = _batch(n=2, length=6)
    model = _model(tie=False)
    sub = {n: p for n, p in model.named_parameters() if n.startswith(("transformer.h.1.", "lm_head."))}
    plain = [fisherlib.fisher(model, None, [batch], probes=2, seed=1),
             fisherlib.fisher(model, None, [batch], method="mc", seed=1),
             fisherlib.fisher(model, sub, [batch], method="exact")]
    model.gradient_checkpointing_enable()
    model.train()  # HuggingFace checkpoints in training mode only; dropout is 0
    assert model.transformer.gradient_checkpointing
    ckpt = [fisherlib.fisher(model, None, [batch], probes=2, seed=1),
            fisherlib.fisher(model, None, [batch], method="mc", seed=1),
            fisherlib.fisher(model, sub, [batch], method="exact")]
    for a, b in zip(ckpt, plain):
        np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-5, atol=1e-7 * np.abs(_flat(b)).max())


def test_sdpa_and_eager_attention_give_the_same_fisher():
    batch = _batch(n=2, length=6)
    sdpa, eager = (_model(attn=a, tie=False, dtype=torch.float64) for a in ("sdpa", "eager"))
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    for kw in (dict(probes=2, seed=1), dict(method="mc", seed=1)):
        np.testing.assert_allclose(_flat(fisherlib.fisher(sdpa, None, [batch], **kw)),
                                   _flat(fisherlib.fisher(eager, None, [batch], **kw)), rtol=1e-9, atol=1e-15)
    subs = [{n: p for n, p in m.named_parameters() if n.startswith("transformer.h.1.attn.")} for m in (sdpa, eager)]
    a, b = (fisherlib.fisher(m, s, [batch], method="exact") for m, s in zip((sdpa, eager), subs))
    np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-9, atol=1e-14 * _flat(b).max())


def test_tied_embedding_counts_both_uses():
    model, batch = _model(dtype=torch.float64), _batch(n=2, length=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    wte = {"transformer.wte.weight": model.transformer.wte.weight}
    weights = (batch["labels"] != -100).double().numpy()
    ref = diag_tree(*token_fisher(model, {"input_ids": batch["input_ids"]}, weights, params=wte, full=False))
    est = as_numpy(fisherlib.fisher(model, wte, [batch], method="exact").value)
    r = ref["transformer.wte.weight"]
    np.testing.assert_allclose(est["transformer.wte.weight"], r, rtol=1e-8, atol=1e-12 * r.max())
    # the output projection alone (an untied copy) misses the input embedding's share
    untied = _model(dtype=torch.float64, tie=False)
    untied.load_state_dict(model.state_dict())
    head = as_numpy(fisherlib.fisher(untied, {"lm_head.weight": untied.lm_head.weight}, [batch],
                                     method="exact").value)["lm_head.weight"]
    used = np.unique(batch["input_ids"].numpy())  # rows that also feed the input embedding
    assert np.abs(head[used] - r[used]).max() > 1e-3 * r.max()


def test_lora_adapter_fisher_from_layer_io():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(dtype=torch.float64), peft.LoraConfig(
        r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0, init_lora_weights=False))
    batch = _batch(n=2, length=4)
    inputs = {"input_ids": batch["input_ids"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    _, capture = fisherlib.backends.get("torch").layer_io(model, None, inputs)
    assert capture.uncovered == [] and len(capture.calls) == len(trainable)  # lora_A, lora_B: dense layers
    est = fisherlib.fisher(model, None, [batch], method="exact")
    assert sorted(est.value) == sorted(trainable)  # the adapter's parameters only
    weights = (batch["labels"] != -100).double().numpy()
    ref = diag_tree(*token_fisher(model, inputs, weights, params=trainable, full=False))
    for n, r in ref.items():
        np.testing.assert_allclose(as_numpy(est.value)[n], r, rtol=1e-8, atol=1e-12 * r.max())
    probe = fisherlib.fisher(model, None, [batch], probes=256, seed=0, structure="trace")
    assert abs(float(probe.value) - sum(r.sum() for r in ref.values())) < 5 * float(probe.stderr)


def test_streaming_over_a_dataloader_with_tokens_per_second(capsys):
    pytest.importorskip("tqdm")
    model = _model()
    ids = lm.random_ids(4 * 3 * 6 + 1, V, seed=4)
    loader = torch.utils.data.DataLoader(lm.windows(ids, 6), batch_size=3)
    est = fisherlib.fisher(model, None, loader, probes=2, seed=5, progress=True)
    assert est.n_inputs == 12 and est.n_outputs == 12 * 5
    assert "tokens_per_s" in capsys.readouterr().err
    listed = fisherlib.fisher(model, None, list(lm.lm_batches(ids, 3, 6)), probes=2, seed=5)
    np.testing.assert_allclose(_flat(est), _flat(listed), rtol=1e-6)


def test_monte_carlo_cotangent_is_the_residual_of_the_sampled_labels():
    rng = np.random.default_rng(0)
    z, u = 3 * rng.normal(size=(13, 6)), rng.uniform(size=(4, 13))
    want = cotangents.label_residual(z, cotangents.sample_labels(z, u))
    np.testing.assert_allclose(cotangents.monte_carlo(z, u), want, rtol=0, atol=1e-12)
    chunked = cotangents.by_rows(lambda a, b: cotangents.monte_carlo(a, b), z, u, budget=4 * 6 * 3)
    np.testing.assert_allclose(chunked, want, rtol=0, atol=1e-12)
    us = rng.uniform(size=(4, 13, 6))  # sigmoid: 0/1 draws per class
    np.testing.assert_array_equal(cotangents.monte_carlo(z, us, "sigmoid"),
                                  cotangents.label_residual(z, cotangents.sample_labels(z, us, "sigmoid"), "sigmoid"))


def test_benchmark_script_runs_on_the_tiny_twin(capsys):
    from tests._benchmarks import load_benchmark

    threads = torch.get_num_threads()
    try:
        load_benchmark("language_model").main(["--quick", "--no-memory", "--repeats", "1", "--length", "8", "--rows",
                                               "hutchinson K=1,mc K=1,exact head (closed form)"])
    finally:
        torch.set_num_threads(threads)
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "---" not in r]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["train step", "hutchinson K=1", "mc K=1",
                                                           "exact head (closed form)"]
    assert all(float(r.split("|")[2].replace(",", "")) > 0 for r in rows[1:])
    assert all(float(r.split("|")[4].replace(",", "")) > 0 for r in rows[1:])  # CPU time


def test_benchmark_kfac_rows_and_stream_on_the_tiny_twin(capsys):
    from tests._benchmarks import load_benchmark

    threads = torch.get_num_threads()
    try:
        load_benchmark("language_model").main(["--quick", "--no-memory", "--repeats", "1", "--length", "8",
                                               "--rows", "kfac", "--tokens", "48", "--n", "2"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [r.split("|")[1].strip() for r in out.splitlines() if r.startswith("| ") and "---" not in r]
    assert rows[1:] == ["train step", "kfac reduce K=1", "kfac expand K=1"]
    assert "48 tokens in 3 batches (42 with a next token)" in out and "Training steps over the same batches" in out
    assert "10^6 tokens:" in out and "projected" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_benchmark_says_when_cuda_is_missing():
    from tests._benchmarks import load_benchmark

    bench = load_benchmark("language_model")
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        bench.main(["--quick", "--device", "cuda"])
    with pytest.raises(SystemExit, match="--device: expected cpu, cuda"):
        bench.main(["--quick", "--device", "tpu"])
