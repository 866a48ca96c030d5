"""``fisherlib fisher``: a HuggingFace model directory or an importable torch module, to a file."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import fisherlib  # noqa: E402
from fisherlib import FisherEstimate, cli  # noqa: E402

from tests.integrations import _cli_models  # noqa: E402


def test_torch_module_over_an_npz_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)), np.arange(20) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    out = tmp_path / "f.safetensors"
    rc = cli.main(["fisher", "tests.integrations._cli_models:make_net", "--data", str(tmp_path / "d.npz"),
                   "--out", str(out), "--method", "empirical", "--batch-size", "8", "--no-progress"])
    assert rc == 0 and "empirical diag F over 20 inputs" in capsys.readouterr().out
    net = _cli_models.make_net()
    est = FisherEstimate.load(out, model=net)
    ref = fisherlib.fisher(net, None, [(torch.as_tensor(x[i:i + 8]), torch.as_tensor(y[i:i + 8]))
                                      for i in range(0, 20, 8)], method="empirical")
    for k in ref.names:
        np.testing.assert_allclose(est.value[k], ref.value[k].numpy(), rtol=1e-12)


def test_torch_module_over_importable_batches(tmp_path):
    out = tmp_path / "f.safetensors"
    cli.main(["fisher", "tests.integrations._cli_models:make_net", "--data",
              "tests.integrations._cli_models:batches", "--out", str(out), "--probes", "4", "--seed", "3",
              "--no-progress"])
    est = FisherEstimate.load(out)
    ref = fisherlib.fisher(_cli_models.make_net(), None, _cli_models.batches(), probes=4, seed=3)
    assert est.n_inputs == 18 and est.n_probes == 4 and est.seed == 3
    for k in ref.names:
        np.testing.assert_allclose(est.value[k], ref.value[k].numpy(), rtol=1e-12)


def test_kronecker_factors_to_a_file(tmp_path, capsys):
    out = tmp_path / "k.safetensors"
    rc = cli.main(["fisher", "tests.integrations._cli_models:make_net", "--data", "tests.integrations._cli_models:batches",
                   "--out", str(out), "--structure", "kfac", "--method", "exact", "--no-progress"])
    assert rc == 0 and "exact KFAC F (2 layers) over 18 inputs" in capsys.readouterr().out
    net = _cli_models.make_net()
    est = fisherlib.KroneckerEstimate.load(out, model=net)
    ref = fisherlib.fisher(net, None, _cli_models.batches(), structure="kfac", method="exact")
    for b in ref.blocks:
        for role in ("A", "G"):
            np.testing.assert_allclose(est.factors[b.name][role], ref.factors[b.name][role].numpy(), rtol=1e-12)


def _bert_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "very", "not", "a"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=20, max_position_embeddings=16,
                                     num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    path = tmp_path / "bert"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_huggingface_directory_over_a_table(tmp_path, capsys):
    path = _bert_dir(tmp_path)
    rows = ["text,label", "a very good film,1", "not a good film,0", "bad,0", "good good,1", "very bad film,0"]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "f.safetensors"
    cli.main(["fisher", str(path), "--data", str(tmp_path / "d.csv"), "--out", str(out), "--method", "exact",
              "--batch-size", "2", "--max-inputs", "4", "--dtype", "float64"])
    assert "exact diag F over 4 inputs" in capsys.readouterr().out
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).double().eval()
    est = FisherEstimate.load(out, model=model)  # every parameter, named as the state_dict
    assert set(est.names) == {n for n, _ in model.named_parameters()}
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["a very good film", "not a good film", "bad", "good good"]
    batches = [dict(tok(texts[i:i + 2], padding=True, return_tensors="pt")) for i in (0, 2)]
    ref = fisherlib.fisher(model, None, batches, method="exact")
    for k in ref.names:
        np.testing.assert_allclose(est.value[k], ref.value[k].numpy(), rtol=1e-9, atol=1e-15)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="model: cannot import module 'no_such_module'"):
        cli.main(["fisher", "no_such_module:net", "--data", "x.npz"])
    with pytest.raises(ValueError, match="model: directory .* has no config.json"):
        cli.main(["fisher", str(tmp_path), "--data", "x.npz"])
    np.savez(tmp_path / "d.npz", inputs=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="data: .* has no array named 'x'"):
        cli.main(["fisher", "tests.integrations._cli_models:make_net", "--data", str(tmp_path / "d.npz")])
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="data: .* needs a HuggingFace model directory"):
        cli.main(["fisher", "tests.integrations._cli_models:make_net", "--data", str(tmp_path / "t.txt")])
