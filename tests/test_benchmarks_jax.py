"""Smoke test of ``benchmarks/jax_compiled.py``: one small run prints a row per method whose
columns parse and add up (per batch over B = steady per batch + per call / B)."""

from __future__ import annotations

import pytest

from tests._benchmarks import load_benchmark

pytest.importorskip("jax")
pytest.importorskip("optax")


def test_jax_compiled_rows(capsys):
    load_benchmark("jax_compiled").main(["--models", "mlp", "--n", "8", "--batches", "2", "--repeats", "1",
                                          "--methods", "hutchinson", "--no-eager"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("jax ") and "B = 2 and 8 batches" in lines[0]
    rows = {}
    for line in lines[2:]:
        cells = line.split()
        method = " ".join(cells[1:-5])
        rows[method] = [float(c) for c in cells[-5:]]
    assert set(rows) == {"train step", "hutchinson"}
    for first, per_batch, steady, ratio, per_call in rows.values():
        assert first > 0 and per_batch > 0
        assert per_batch == pytest.approx(steady + per_call / 2, abs=0.02)  # the columns' definitions
    assert rows["train step"][3] == 1.0
