"""Smoke test of benchmarks/natural_gradient.py: a few steps of each kind of method, and its table."""

from __future__ import annotations

import pytest

from tests._benchmarks import load_benchmark

pytest.importorskip("torch")
pytest.importorskip("sklearn")


def _load():
    return load_benchmark("natural_gradient")


def test_runs_and_tabulates():
    import torch

    mod = _load()
    Xtr, ytr, Xte, yte = mod.data()
    split = (torch.tensor(Xtr[:256], dtype=torch.float32), torch.tensor(ytr[:256]),
             torch.tensor(Xte[:100], dtype=torch.float32), torch.tensor(yte[:100]))
    results = {}
    for method in ("SGD", "EF diag", "fisherlib ollivier", "fisherlib ollivier r=5", "fisherlib ollivier r=10 rel",
                   "fisherlib default"):
        runs = [mod.run(method, "mlp", mod.GRIDS[method][0], seed, 8, 4, split) for seed in (1, 2)]
        checked, losses, accs, per_step = runs[0]
        assert checked == [0, 4, 8] and len(losses) == 3 and per_step > 0 and all(0 <= a <= 1 for a in accs)
        results[method] = (mod.GRIDS[method][0], runs)
    text = mod.table(results, target_loss=10.0, target_acc=0.0)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "method" not in line]
    assert len(rows) == 6 and all(line.count("|") == 9 for line in rows)
    assert mod.first_reach([0, 10, 20], [3.0, 1.0, 0.5], 1.0) == 10
    assert mod.first_reach([0, 10], [0.1, 0.5], 0.9, below=False) is None


def test_standardised_pixels():
    mod = _load()
    Xtr, _, Xte, _ = mod.data("standard")
    assert abs(Xtr.mean(0)).max() < 1e-12 and abs(Xtr.std(0).max() - 1.0) < 1e-12 and Xte.shape == (500, 64)
    with pytest.raises(ValueError, match="scaling"):
        mod.data("8")
