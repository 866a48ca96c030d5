"""The demo end to end on a tiny budget: its numbers are right and its figures are PNGs."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from fisherlib.cli import main
from fisherlib.demo import analysis, report

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

DEMO_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(
    b != "numpy" and importlib.util.find_spec(b) is None, reason=f"{b} not installed"))
    for b in ("numpy", "torch", "jax")]
PROBES = 16
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Run ``fisherlib demo --quick`` once per backend (through the CLI) and keep the outputs."""
    done = {}

    def get(backend):
        if backend not in done:
            out = tmp_path_factory.mktemp(f"report-{backend}")
            rc = main(["demo", "--quick", "--backend", backend, "--out", str(out), "--probes",
                       str(PROBES), "--no-progress"])
            assert rc == 0
            summary = json.loads((out / "report.json").read_text())
            with np.load(out / "fisher.npz") as f:
                arrays = dict(f)
            done[backend] = (out, summary, arrays)
        return done[backend]

    return get


def _layer(arrays, key, layers):
    return {layer: arrays[f"{key}/{layer}"] for layer in layers}


@pytest.mark.slow
@pytest.mark.parametrize("backend", DEMO_BACKENDS)
def test_report_numbers(reports, backend):
    out, s, arrays = reports(backend)
    assert s["backend"] == backend and s["n_inputs"] == 200 and s["classes"] == 10
    assert s["accuracy"] > 0.7  # it did learn the digits
    assert set(s["methods"]) == {r.key for r in analysis.RUNS}

    # Theorem 1 on every held-out output.
    lam, lo, hi = (arrays[f"core/{k}"] for k in ("lambda_max", "lower", "upper"))
    assert np.all(lo <= lam * (1 + 1e-6)) and np.all(lam <= hi * (1 + 1e-6))
    assert np.all(arrays["core/trace"] >= lam * (1 - 1e-6))  # trace >= λ_max (PSD)

    # F_LB ⪯ F ⪯ F_UB, so their diagonals are ordered, entry by entry (float32 rounding).
    layers = s["layers"]
    exact, up, low = (_layer(arrays, k, layers) for k in ("exact", "upper_exact", "lower_exact"))
    for layer in layers:
        tol = 1e-5 * exact[layer].max()
        assert np.all(low[layer] <= exact[layer] + tol), layer
        assert np.all(exact[layer] <= up[layer] + tol), layer
    assert any(np.any(low[x] < 0.9 * exact[x]) for x in layers)  # not trivially equal

    # Hutchinson against exact, within its error bars. For K probes, std/F <= sqrt(2/K), so the
    # median relative error is about 0.674 sqrt(2/K) = 0.24 at most (K = 16); with K = 16 probes
    # a t-distribution puts 93.6 % of entries within 2 SE.
    bound = 0.674 * math.sqrt(2 / PROBES)
    for key in ("hutchinson", "hutchinson_pe", "upper", "lower"):
        m = s["methods"][key]
        assert m["stderr_kind"] == "probes"
        assert m["median_rel_error"] < 1.25 * bound, (key, m["median_rel_error"])
        # Entries share their probes, so the fraction moves together across a draw: over seeds
        # 0-2 it ranged 0.85-0.95 (torch and JAX); an error bar too small by half gives ~0.68.
        assert m["within_2se"] > 0.8, (key, m["within_2se"])
        # The error falls with the number of probes.
        errors = [e for _, e in m["curve"]]
        assert errors[-1] < 0.6 * errors[0], (key, errors)
    # The exact estimators are exact; the empirical Fisher is not F.
    for key in ("exact", "upper_exact", "lower_exact"):
        assert s["methods"][key]["median_rel_error"] == 0.0
    assert s["methods"]["empirical"]["median_rel_error"] > 0.1

    # Costs: one VJP per batch per probe against C per input.
    assert s["methods"]["hutchinson"]["vectors"] == PROBES * 2
    assert s["methods"]["exact"]["vectors"] == 200 * 10


@pytest.mark.slow
@pytest.mark.parametrize("backend", DEMO_BACKENDS)
def test_report_files(reports, backend):
    out, s, _ = reports(backend)
    import matplotlib.image

    assert set(s["figures"]) == set(report.FIGURES)
    for name in s["figures"].values():
        raw = (out / name).read_bytes()
        assert raw[:8] == PNG_MAGIC, name
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 200, (name, img.shape)
        assert img[..., :3].std() > 0.01, f"{name} is blank"
    md = (out / "report.md").read_text()
    for name in s["figures"].values():
        assert f"]({name})" in md
    assert "| Hutchinson, 1 VJP per batch |" in md
    # The parameter-space spectrum panel (fisherlib.spectral): brackets hold, m1 matches the exact
    # trace within its error bars, the density figure is there (tests/spectral test the numbers).
    sp = s["spectrum"]
    assert sp["lambda_max_lower"] <= sp["lambda_max"] * (1 + 1e-3) <= sp["lambda_max_upper"] * (1 + 2e-3)
    assert abs(sp["m1"] - sp["m1_exact"]) < 4 * sp["m1_stderr"] and sp["lr_max"] > 0
    assert (out / sp["figure"]).read_bytes()[:8] == PNG_MAGIC and f"]({sp['figure']})" in md
    # The training panel (fisherlib.natural): three optimizers from the same weights, all learning,
    # with their curves in the report (tests/natural test the steps against dense solves).
    tr = s["training"]
    assert set(tr["runs"]) == {"SGD", "Adam", "natural gradient (Ollivier, fisherlib)"}
    for r in tr["runs"].values():
        assert len(r["losses"]) == tr["epochs"] * tr["steps_per_epoch"] and r["last_epoch_loss"] < r["losses"][0]
    assert (out / tr["figure"]).read_bytes()[:8] == PNG_MAGIC and f"]({tr['figure']})" in md


@pytest.mark.slow
def test_backends_compute_the_same_network(reports):
    """Same data, initial weights and training on every backend: the same exact Fisher."""
    present = [b for b in ("numpy", "torch", "jax") if b == "numpy" or importlib.util.find_spec(b)]
    if len(present) < 2:
        pytest.skip("needs two backends")
    ref_s, ref = reports("numpy")[1:]
    for b in present[1:]:
        s, arrays = reports(b)[1:]
        # float32 training on different frameworks rounds differently; the exact Fisher at the
        # trained weights agrees to a few parts in a thousand.
        for ln, lb in zip(_by_layer(ref_s["layers"]), _by_layer(s["layers"])):
            a, c = ref[f"exact/{ln}"], arrays[f"exact/{lb}"]
            assert a.shape == c.shape
            np.testing.assert_allclose(c, a, rtol=0.05, atol=1e-3 * a.max())


def _by_layer(names):
    """Leaf names ("0.weight", "2.bias", ...) in network order: torch numbers its Sequential's
    modules 0, 2, 4 (tanh between), models.MLP its layers 0, 1, 2, and JAX sorts dict keys."""
    return sorted(names, key=lambda n: (int(n.split(".")[0]), n.split(".")[1]))


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "numpy    installed" in text and "versions:" in text


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--probes", "0"])
    from fisherlib.demo import run

    with pytest.raises(ValueError, match="probes"):
        run(backend="numpy", probes=0)
    with pytest.raises(ValueError, match="backend"):
        run(backend="tensorflow")
