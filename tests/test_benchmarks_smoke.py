"""Smoke test of ``benchmarks/estimators.py --quick``: it runs and prints tables that parse."""

from __future__ import annotations

import pytest

from tests._benchmarks import load_benchmark

pytest.importorskip("torch")


def _load():
    return load_benchmark("estimators")


def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables as lists of rows of cells (header first, separator dropped)."""
    tables, cur = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cur is None:
                cur = []
                tables.append(cur)
            if not all(set(c) <= {"-", ":"} for c in cells):
                cur.append(cells)
        else:
            cur = None
    return tables


def _number(cell: str) -> float:
    return float(cell.split()[0].replace(",", ""))


def test_estimators_quick(capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        _load().main(["--quick", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    methods, gaps, sweep = _tables(out)
    for table in (methods, gaps, sweep):
        assert all(len(row) == len(table[0]) for row in table)
    head = methods[0]
    rows = {(r[0], r[1], r[4]): dict(zip(head, r)) for r in methods[1:]}
    assert len(rows) == 3 * 8  # three settings, the training step and seven fisher rows each
    for (model, classes, method), r in rows.items():
        assert _number(r["time / batch (ms)"]) > 0
        if method == "exact":
            assert _number(r["median rel. err., budget"]) < 1e-4  # the reference itself
        elif method != "train step":
            assert 0 <= _number(r["median rel. err., budget"]) < 10
            assert _number(r["calls in the budget"]) >= 1
    assert [int(r[0].replace(",", "")) for r in sweep[1:]] == [10, 100, 1000]
    for r in sweep[1:]:
        assert _number(r[2]) > 0 and _number(r[3]) > 0 and _number(r[4]) > 0


def test_estimators_memory_subprocess():
    mb, how = _load().memory_row("mlp", 10, 8, "hutchinson", True, 1)
    assert how in ("VmHWM", "ru_maxrss")
    assert 0 <= mb < 1024
