"""The Trainer callback: a running Fisher during ``Trainer.train``, written at the end."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

import fisherlib  # noqa: E402
from fisherlib import FisherEstimate  # noqa: E402
from fisherlib.integrations.huggingface import FisherCallback  # noqa: E402

N, T, C = 24, 6, 3


def _model(seed=0, dropout=0.0):
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20, max_position_embeddings=16, num_labels=C,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


def _rows(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (N, T), generator=g)
    am = torch.ones(N, T, dtype=torch.long)
    am[::3, 4:] = 0
    y = ids[:, 1] % C  # learnable from the first token
    return [{"input_ids": ids[i], "attention_mask": am[i], "labels": y[i]} for i in range(N)]


def _batches(rows, size=6):
    return [{k: torch.stack([r[k] for r in rows[i:i + size]]) for k in rows[0]} for i in range(0, len(rows), size)]


def test_samples_are_fishers_hutchinson_probes():
    """decay=None: the running estimate is the per-input mean of fisher()'s Hutchinson estimate
    over the sampled batches, draw for draw (batch j's probes come from (seed, j))."""
    model = _model().double().eval()
    batches = _batches(_rows())
    cb = FisherCallback(probes=3, seed=5)
    for b in batches:
        cb.sample(model, b)
    est = cb.to_estimate()
    ref = fisherlib.fisher(model, None, batches, probes=3, seed=5, reduction="mean")
    for name in ref.names:
        np.testing.assert_allclose(est.value[name], ref.value[name].detach().numpy(), rtol=1e-10)
    assert est.n_inputs == N and cb.samples == 4 and est.draws == ((5, 0, 4),)
    se = cb.running.stderr  # RunningFisher's error bar (tests/estimators/test_running.py)
    for name in ref.names:
        np.testing.assert_allclose(est.stderr[name], se[f"diag:{name}"].detach().numpy(), rtol=1e-10)
    one = FisherCallback(probes=1)
    one.sample(model, batches[0])
    e1 = one.to_estimate()
    assert e1.stderr_kind == "bound"  # K = 1: std <= √2 F_ii (theory.md §5.2)
    np.testing.assert_allclose(e1.stderr[name], np.sqrt(2) * e1.value[name], rtol=1e-12)


def _train(tmp_path, callbacks, steps=8, dropout=0.0):
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, seed=0, disable_tqdm=True)
    model = _model(dropout=dropout)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_rows(), callbacks=callbacks)
    trainer.train()
    return model


@pytest.mark.slow
def test_trainer_writes_the_estimate_and_training_is_unchanged(tmp_path):
    path = tmp_path / "fisher.safetensors"
    cb = FisherCallback(path, every=3, probes=2, decay=0.5, batches=_batches(_rows(seed=2)))
    model = _train(tmp_path, [cb])
    assert cb.samples == 2  # steps 3 and 6 of 8
    est = FisherEstimate.load(path, model=model)  # named as the model's parameters
    assert est.method == "hutchinson" and est.n_probes == 2 and est.n_inputs == 12
    assert all(np.all(np.isfinite(est.value[n])) and np.all(est.value[n] >= 0) for n in est.names)
    plain = _train(tmp_path, [])
    for (n, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)  # the callback leaves training alone
    # With dropout, and batches from the Trainer's own dataloader (whose fresh iterator draws a
    # shuffling seed from torch's generator): still the same training, over 2 epochs.
    ours = _train(tmp_path, [FisherCallback(every=2)], steps=12, dropout=0.2)
    plain = _train(tmp_path, [], steps=12, dropout=0.2)
    for (n, a), (_, b) in zip(ours.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


@pytest.mark.slow
def test_trainer_dataloader_and_ewc_continual_fine_tuning(tmp_path):
    """Task 1 with the callback (batches from the Trainer's own dataloader), then task 2 with EWC
    from the written Fisher: the penalty keeps the weights nearer task 1's than plain training."""
    from fisherlib.uses import EWC

    path = tmp_path / "task1.safetensors"
    model = _train(tmp_path, [FisherCallback(path, every=2, probes=1)])
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = FisherEstimate.load(path, model=model)

    class EWCTrainer(transformers.Trainer):
        def __init__(self, *a, ewc=None, **k):
            super().__init__(*a, **k)
            self.ewc = ewc

        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            loss, out = super().compute_loss(model, inputs, return_outputs=True, **kw)
            loss = loss + self.ewc.penalty(model)
            return (loss, out) if return_outputs else loss

    task2 = [{**r, "labels": (r["input_ids"][2] % C)} for r in _rows(seed=3)]
    drift = {}
    for lam in (0.0, 1e4):
        m = _model()
        m.load_state_dict({**m.state_dict(), **anchor})
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "t2"), max_steps=6, per_device_train_batch_size=4,
                                              learning_rate=1e-2, report_to=[], save_strategy="no",
                                              logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
        EWCTrainer(model=m, args=args, train_dataset=task2, ewc=EWC(lam).add_task(fisher, anchor)).train()
        F = {n: torch.as_tensor(fisher.value[n]) for n in fisher.names}
        drift[lam] = sum(float((F[n] * (p.detach() - anchor[n]) ** 2).sum()) for n, p in m.named_parameters())
    assert drift[1e4] < 0.5 * drift[0.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="every: expected an integer >= 1"):
        FisherCallback(every=0)
    with pytest.raises(ValueError, match="no sample yet"):
        FisherCallback().to_estimate()
