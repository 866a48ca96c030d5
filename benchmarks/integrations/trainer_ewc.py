"""Continual fine-tuning with the HuggingFace Trainer: EWC from FisherCallback's running Fisher.

Task 1 = digits 0–4, task 2 = digits 5–9, two heads on one trunk (the MLP 64-100-100-10, logits
0–4 and 5–9), trained with ``transformers.Trainer`` (Adam, lr 2e-3, batch 64). During task 1 a
``FisherCallback`` samples the Fisher of the task-1 head (K = 1 probe every ``--every`` steps,
EMA decay 0.9, per-input mean) and writes it as safetensors; task 2 is then trained from task
1's weights with loss + (λ/2) Σ F_ii (θ_i − θ*_i)² read from that file (``fisherlib.uses.EWC``),
for λ in a grid, against plain fine-tuning (λ = 0) and against EWC with the exact Fisher of the
task-1 head on all task-1 training images (``fisherlib.fisher(method="exact")``).
Reported: task-1 held-out accuracy before and after task 2 (forgetting) and task-2 accuracy.

    .venv/bin/python benchmarks/integrations/trainer_ewc.py            # 3 seeds
    .venv/bin/python benchmarks/integrations/trainer_ewc.py --quick    # 1 seed, short
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "uses"))
import _setup as S  # noqa: E402

import transformers  # noqa: E402

import fisherlib  # noqa: E402
from fisherlib import FisherEstimate  # noqa: E402
from fisherlib.integrations.huggingface import FisherCallback  # noqa: E402
from fisherlib.uses import EWC  # noqa: E402

LAMBDAS = (100.0, 1000.0, 10000.0)


class Head(torch.nn.Module):
    """The trunk and head as one module with a HuggingFace-style forward: the logits of one
    head (columns lo:hi), and the cross-entropy when labels are given."""

    def __init__(self, net, lo, hi):
        super().__init__()
        self.net, self.lo, self.hi = net, lo, hi

    def forward(self, x, labels=None):
        logits = self.net(x)[:, self.lo:self.hi]
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


class EWCTrainer(transformers.Trainer):
    def __init__(self, *args, ewc=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ewc = ewc

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, out = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if self.ewc is not None:
            loss = loss + self.ewc.penalty(model.net)
        return (loss, out) if return_outputs else loss


def _rows(x, y):
    return [{"x": a, "labels": b} for a, b in zip(x, y)]


def _args(out, epochs, seed):
    return transformers.TrainingArguments(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=64,
                                          learning_rate=2e-3, lr_scheduler_type="constant", warmup_steps=0,
                                          weight_decay=0.0, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True, seed=seed, disable_tqdm=True)


def run_seed(seed: int, epochs: int, every: int, tmp: str) -> dict:
    split = S.digits(seed)
    t1, t1_test = split.y_train < 5, split.y_test < 5
    x1, y1, x2, y2 = split.x_train[t1], split.y_train[t1], split.x_train[~t1], split.y_train[~t1] - 5
    net = S.mlp(seed)
    cb = FisherCallback(f"{tmp}/task1.safetensors", every=every, probes=1, decay=0.9, seed=seed)
    t0 = time.perf_counter()
    transformers.Trainer(model=Head(net, 0, 5), args=_args(f"{tmp}/t1", epochs, seed), train_dataset=_rows(x1, y1),
                         callbacks=[cb]).train()
    task1_s = time.perf_counter() - t0
    plain_cb = time.perf_counter()
    transformers.Trainer(model=Head(S.mlp(seed), 0, 5), args=_args(f"{tmp}/t0", epochs, seed),
                         train_dataset=_rows(x1, y1)).train()
    plain_s = time.perf_counter() - plain_cb

    def acc1(n):
        return S.accuracy(n, split.x_test[t1_test], split.y_test[t1_test], hi=5)

    def acc2(n):
        return S.accuracy(n, split.x_test[~t1_test], split.y_test[~t1_test], lo=5)

    before = acc1(net)
    anchor = {k: v.detach().clone() for k, v in net.state_dict().items()}
    running = FisherEstimate.load(f"{tmp}/task1.safetensors", model=Head(net, 0, 5))
    running = {k.removeprefix("net."): torch.as_tensor(v) for k, v in running.value.items()}
    exact = fisherlib.fisher(Head(net, 0, 5), None, [{"x": x1, "labels": y1}], method="exact", reduction="mean")
    exact = {k.removeprefix("net."): v for k, v in exact.value.items()}
    out = {"before": before, "samples": cb.samples, "task1_s": task1_s, "plain_task1_s": plain_s, "runs": {}}
    for name, F in (("plain", None), ("callback", running), ("exact", exact)):
        for lam in ((0.0,) if F is None else LAMBDAS):
            net.load_state_dict(anchor)
            ewc = EWC(lam).add_task(F, net) if F is not None else None
            EWCTrainer(model=Head(net, 5, None), args=_args(f"{tmp}/t2", epochs, seed + 1),
                       train_dataset=_rows(x2, y2), ewc=ewc).train()
            out["runs"][f"{name} {lam:g}"] = (acc1(net), acc2(net))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    seeds = 1 if args.quick else args.seeds
    epochs, every = (2, 5) if args.quick else (10, 5)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_seed(s, epochs, every, tmp) for s in range(seeds)]
    ms = S.mean_sd
    lines = [f"Digits, task 1 = 0–4 then task 2 = 5–9 (two heads), transformers.Trainer, {epochs} epochs per task; "
             f"FisherCallback: K=1 probe every {every} steps, EMA 0.9 ({runs[0]['samples']} samples); "
             f"{seeds} seed(s), held-out accuracy % (mean ± sd over seeds)", "",
             f"Task-1 accuracy before task 2: {ms([r['before'] for r in runs])}. Task-1 training took "
             f"{np.median([r['task1_s'] for r in runs]):.2f} s with the callback and "
             f"{np.median([r['plain_task1_s'] for r in runs]):.2f} s without (median).", "",
             "| task 2 trained with | λ | task 1 after, % | forgetting, points | task 2, % |", "|---|---:|---:|---:|---:|"]
    for key in runs[0]["runs"]:
        name, lam = key.rsplit(" ", 1)
        a1 = [r["runs"][key][0] for r in runs]
        a2 = [r["runs"][key][1] for r in runs]
        forget = [r["before"] - r["runs"][key][0] for r in runs]
        label = {"plain": "plain fine-tuning", "callback": "EWC, FisherCallback's running Fisher",
                 "exact": "EWC, exact Fisher of task 1"}[name]
        lines.append(f"| {label} | {lam} | {ms(a1)} | {ms(forget)} | {ms(a2)} |")
    table = "\n".join(lines)
    S.write("trainer_ewc", table, runs, None, args, results=HERE / "results")
    return {"runs": runs, "table": table}


if __name__ == "__main__":
    main()
