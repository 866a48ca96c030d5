"""Smoke test of ``benchmarks/lm_optimizer.py``: its Sophia-G is the published update, and ``--quick`` runs
and prints a table whose rows parse."""

from __future__ import annotations

import pytest

from tests._benchmarks import load_benchmark

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_sophia_g_is_the_published_update():
    mod = load_benchmark("lm_optimizer")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    p0 = p.detach().clone()
    opt = mod.SophiaG([p], lr=0.1, betas=(0.9, 0.8), rho=0.5, weight_decay=0.2)
    h_grad = torch.randn(7, dtype=torch.float64)
    p.grad = h_grad.clone()
    opt.update_hessian()
    g = torch.randn(7, dtype=torch.float64)
    p.grad = g.clone()
    opt.step(bs=3)
    h = 0.2 * h_grad ** 2
    m = 0.1 * g
    want = p0 * (1 - 0.1 * 0.2) - 0.1 * torch.sign(m) * torch.clamp(m.abs() / (0.5 * 3 * h + 1e-15), max=1)
    torch.testing.assert_close(p.detach(), want, rtol=1e-14, atol=0)
    assert mod.schedule(0, 100) == pytest.approx(0.2) and mod.schedule(99, 100) == pytest.approx(0.1, abs=1e-3)
    assert mod.reach([(0, 5.0), (10, 3.0), (20, 2.0)], 3.0) == 10 and mod.reach([(0, 5.0)], 1.0) is None


def test_quick_run_prints_a_table(capsys):
    mod = load_benchmark("lm_optimizer")
    mod.main(["--quick", "--steps", "10", "--timing-blocks", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "optimizer" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["adamw", "sophia-g", "fisherlib"]
    assert all(r.count("|") == 9 for r in rows)  # two targets by default
