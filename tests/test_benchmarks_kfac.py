"""Smoke tests of the K-FAC benchmarks (``benchmarks/kfac.py``, ``benchmarks/kfac_accuracy.py``) in quick mode.

They run on tiny models in a few seconds, so that the scripts cannot rot; the accuracy run also
checks two inequalities that hold for any model: unit-wise blocks and EK-FAC are never further
from the exact Fisher in Frobenius norm than the diagonal and K-FAC they refine.
"""

from __future__ import annotations

import pytest

from tests._benchmarks import load_benchmark
from tests.test_benchmarks_smoke import _tables

pytest.importorskip("torch")


def test_kfac_benchmark_quick(capsys):
    import torch

    threads = torch.get_num_threads()
    load_benchmark("kfac").main(["--quick", "--repeats", "1", "--no-memory"])
    assert torch.get_num_threads() == threads  # the script restores the caller's threads
    out = capsys.readouterr().out
    tables = _tables(out)
    assert len(tables) == 2  # the quick MLP and CNN
    for table in tables:
        rows = {r[0]: r for r in table[1:]}
        assert [r for r in rows if not r.startswith("↳")] == load_benchmark("kfac").ROWS
        assert sum(r.startswith("↳") for r in rows) == 3  # the parts of the 1-probe call
        assert rows["training step"][2] == "1.00"
        for name in ("fisherlib K-FAC, 1 probe", "fisherlib K-FAC, 1 MC sample"):
            assert float(rows[name][1].replace(",", "")) > 0
        for peer in ("curvlinops KFAC (mc, 1 sample)", "nngeometry PMatKFAC (MC, 1 trial)"):
            assert rows[peer][1].startswith("n/a") or float(rows[peer][1].replace(",", "")) > 0


def test_kfac_benchmark_memory_subprocess():
    mb, how = load_benchmark("kfac").memory_row("mlp", 10, 8, "fisherlib K-FAC, 1 probe", True)
    assert how in ("VmHWM", "ru_maxrss")
    assert 0 <= mb < 1024


def test_kfac_accuracy_quick(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    figure = tmp_path / "kfac-accuracy.png"
    results = load_benchmark("kfac_accuracy").main(["--quick", "--figure", str(figure)])
    assert figure.stat().st_size > 0
    assert len(_tables(capsys.readouterr().out)) == 2
    for res in results:
        rows = res["rows"]
        assert rows["none (F̂ = 0)"]["fro"] == pytest.approx(1.0)
        assert rows["unit-wise blocks"]["fro"] <= rows["diag"]["fro"] + 1e-12  # exact sub-blocks of F
        assert rows["EK-FAC"]["fro"] <= rows["K-FAC (expand)"]["fro"] + 1e-12  # best diagonal in K-FAC's basis
        assert rows["diag"]["fro"] < 1.0
        for r in rows.values():
            assert all(-1 - 1e-12 <= c <= 1 + 1e-12 for c in r["cos"])
            assert all(e >= 0 for e in r["solve"])
