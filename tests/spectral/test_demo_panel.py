"""The demo's spectrum panel on a small untrained network: its numbers, figure and report section."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import fisherlib  # noqa: E402
from fisherlib.demo import nets, spectrum_panel  # noqa: E402


@pytest.mark.slow
def test_panel_numbers_and_files(tmp_path):
    net = nets.build("numpy", (8, 12, 5), seed=0)
    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    exact = fisherlib.fisher(net.model, net.params, net.asarray(x), method="exact")
    a = SimpleNamespace(results={"exact": SimpleNamespace(value=exact.to_numpy().value)}, n_inputs=len(x))
    paths = {"report": tmp_path / "report.md", "json": tmp_path / "report.json"}
    paths["report"].write_text("# report\n")
    paths["json"].write_text(json.dumps({"backend": "numpy"}))
    lines = []
    d = spectrum_panel.add(net, x, a, paths, quick=True, seed=0, echo=lines.append)

    s = json.loads(paths["json"].read_text())["spectrum"]
    assert s["n_inputs"] == 60 and s["n_params"] == 8 * 12 + 12 + 12 * 5 + 5
    assert s["lambda_max_lower"] <= s["lambda_max"] * (1 + 1e-4) <= s["lambda_max_upper"] * (1 + 2e-4)
    assert s["lambda_max"] <= s["trace"] + 4 * s["trace_stderr"]
    assert s["residuals"][0] < 1e-3 * s["lambda_max"]
    assert abs(s["m1"] - s["m1_exact"]) < 4 * s["m1_stderr"]  # Hutchinson against the exact trace
    assert s["lr_max"] == pytest.approx(2 / s["lambda_max"])
    # Against dense float64: F / N from the per-example Jacobians.
    from tests.estimators.fisher_reference import dense_fisher, jacobians

    p64 = {k: v.astype(np.float64) for k, v in net.params.items()}
    z, J = jacobians(net.backend, net.model, p64, x.astype(np.float64))
    F = dense_fisher(J, z) / len(x)
    assert s["lambda_max"] == pytest.approx(np.linalg.eigvalsh(F)[-1], rel=1e-4)
    assert s["m1_exact"] == pytest.approx(np.trace(F) / len(F), rel=1e-4)
    assert abs(s["m2"] - np.sum(F ** 2) / len(F)) < 4 * s["m2_stderr"]

    assert (tmp_path / s["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["report"].read_text()
    assert "## The spectrum of the Fisher on the parameter space" in md and f"]({s['figure']})" in md
    assert "2/λ_max" in lines[0] and d["flat_share"] >= 0
