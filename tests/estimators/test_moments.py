"""Running moments instead of K per-probe partial sums (``fisher(keep_probes=False)``).

The value is the same to rounding; the standard error is a different unbiased estimator of the
same variance (pooled over batches), so it is checked against the spread of estimates over seeds.
"""

from __future__ import annotations

import numpy as np
import pytest

import fisherlib
from fisherlib.estimators import _fisher
from fisherlib.models import MLP


@pytest.fixture(scope="module")
def setup():
    model = MLP([4, 6, 3])
    params = model.init(seed=0, like=np.zeros(1))
    x = np.random.default_rng(0).normal(size=(40, 4))
    return model, params, [x[i:i + 8] for i in range(0, 40, 8)]


@pytest.mark.parametrize("kw", [dict(), dict(per_example=True), dict(method="mc"), dict(structure="blocks"),
                                dict(structure="trace"), dict(bound="upper")])
def test_same_value_and_comparable_error_bars(setup, kw):
    model, params, batches = setup
    a = fisherlib.fisher(model, params, batches, probes=16, seed=1, keep_probes=True, **kw)
    b = fisherlib.fisher(model, params, batches, probes=16, seed=1, keep_probes=False, **kw)
    assert b.moments and not a.moments
    assert b.parts[0].shape[0] == 2 and a.parts[0].shape[0] == 16
    va, vb = a.to_numpy().value, b.to_numpy().value
    sa, sb = a.to_numpy().stderr, b.to_numpy().stderr
    for k in (va if isinstance(va, dict) else [None]):
        x, y = (va, vb) if k is None else (va[k], vb[k])
        np.testing.assert_allclose(y, x, rtol=1e-12, atol=1e-14)
        ea, eb = (sa, sb) if k is None else (sa[k], sb[k])
        # two estimates of one standard error, with 15 and 5·15 degrees of freedom
        ratio = np.median(np.asarray(eb)[np.asarray(ea) > 0] / np.asarray(ea)[np.asarray(ea) > 0])
        assert 0.6 < ratio < 1.6


def test_error_bars_match_the_spread_over_seeds(setup):
    model, params, batches = setup
    runs = [fisherlib.fisher(model, params, batches, probes=4, seed=s, keep_probes=False) for s in range(200)]
    v = np.stack([r.value["0.weight"] for r in runs])
    se = np.stack([r.stderr["0.weight"] for r in runs])
    ratio = v.std(axis=0, ddof=1) / np.sqrt((se ** 2).mean(axis=0))
    # 200 seeds: the spread's own relative error is about 1/√400 = 5 %; 24 entries
    assert 0.85 < np.median(ratio) < 1.15
    assert np.all((ratio > 0.7) & (ratio < 1.4))


def test_merge_save_load_and_refusals(setup, tmp_path):
    model, params, batches = setup
    a = fisherlib.fisher(model, params, batches[:3], probes=3, seed=1, keep_probes=False)
    b = fisherlib.fisher(model, params, batches[3:], probes=3, seed=1, keep_probes=False, first_batch=3)
    whole = fisherlib.fisher(model, params, batches, probes=3, seed=1, keep_probes=False)
    merged = a + b
    for k in whole.value:
        np.testing.assert_allclose(merged.value[k], whole.value[k], rtol=1e-12)
        np.testing.assert_allclose(merged.stderr[k], whole.stderr[k], rtol=1e-12)
    whole.save(tmp_path / "m")
    back = fisherlib.FisherEstimate.load(tmp_path / "m")
    assert back.moments
    np.testing.assert_allclose(back.stderr["0.weight"], whole.stderr["0.weight"])
    with pytest.raises(ValueError, match="other: cannot merge estimates with different moments"):
        a + fisherlib.fisher(model, params, batches[3:], probes=3, seed=1, keep_probes=True, first_batch=3)
    with pytest.raises(ValueError, match="^k: this estimate kept running moments"):
        whole.first_probes(2)
    with pytest.raises(ValueError, match="^keep_probes: a sketch"):
        fisherlib.fisher(model, params, batches, probes=3, structure="sketch", keep_probes=False)
    with pytest.raises(TypeError, match="^keep_probes: expected True, False or None"):
        fisherlib.fisher(model, params, batches, probes=3, keep_probes="no")


def test_default_switches_to_moments_past_the_size_limit(setup, monkeypatch):
    model, params, batches = setup
    assert not fisherlib.fisher(model, params, batches, probes=3).moments
    monkeypatch.setattr(_fisher, "_KEEP_PROBES", 10)
    est = fisherlib.fisher(model, params, batches, probes=3)
    assert est.moments and est.parts[0].shape[0] == 2
    assert not fisherlib.fisher(model, params, batches, probes=3, keep_probes=True).moments
    assert not fisherlib.fisher(model, params, batches, method="exact").moments  # nothing random
