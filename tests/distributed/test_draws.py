"""Draw records: batch b's draws depend on (seed, b) only; merge refuses to count a draw twice.

Also the map-reduce recipe of docs/distributed.md (workers save, one process merges): a merge
of k shards equals the whole, and a resumed run counts nothing twice.
"""

from __future__ import annotations

import numpy as np
import pytest

import fisherlib
from fisherlib.estimators import FisherEstimate
from fisherlib.models import MLP

N_BATCHES, B, D, C = 6, 4, 3, 4


@pytest.fixture(scope="module")
def setup():
    model = MLP([D, 5, C], activation="tanh")
    params = model.init(seed=3, like=np.zeros(1))
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(B, D)) for _ in range(N_BATCHES)]
    return model, params, batches


def flat(est):
    v = est.to_numpy().value
    return np.concatenate([np.ravel(v[n]) for n in est.names])


def test_shard_with_first_batch_draws_what_the_whole_run_draws(setup):
    model, params, batches = setup
    whole = fisherlib.fisher(model, params, batches, probes=3, seed=5)
    a = fisherlib.fisher(model, params, batches[:2], probes=3, seed=5)
    b = fisherlib.fisher(model, params, batches[2:], probes=3, seed=5, first_batch=2)
    np.testing.assert_allclose(flat(a + b), flat(whole), rtol=1e-12)
    assert (a + b).draws == whole.draws == ((5, 0, N_BATCHES),)
    # Without first_batch the second shard would redraw batch 0's probes for batch 2.
    wrong = fisherlib.fisher(model, params, batches[2:], probes=3, seed=5)
    assert not np.allclose(flat(wrong), flat(b))


def test_strided_batch_indices(setup):
    model, params, batches = setup
    whole = fisherlib.fisher(model, params, batches, probes=2, seed=1, method="mc")
    shards = [fisherlib.fisher(model, params, batches[r::3], probes=2, seed=1, method="mc",
                               batch_indices=range(r, N_BATCHES, 3)) for r in range(3)]
    assert shards[1].draws == ((1, 1, 2), (1, 4, 5))
    merged = shards[0] + shards[1] + shards[2]
    np.testing.assert_allclose(flat(merged), flat(whole), rtol=1e-12)
    assert merged.draws == ((1, 0, N_BATCHES),)


def test_chain_of_merges_cannot_reuse_a_seed(setup):
    """Before draw records, only the two operands' seeds were compared: (a + b) + c passed."""
    model, params, batches = setup
    a = fisherlib.fisher(model, params, batches[:2], seed=1)
    b = fisherlib.fisher(model, params, batches[2:4], seed=2)
    c = fisherlib.fisher(model, params, batches[4:], seed=2)  # batch 0 of seed 2 again
    with pytest.raises(ValueError, match="seed=2"):
        (a + b) + c
    with pytest.raises(ValueError, match="seed=2"):
        a + (b + c)
    ok = (a + b) + fisherlib.fisher(model, params, batches[4:], seed=2, first_batch=2)
    assert ok.draws == ((1, 0, 2), (2, 0, 4))


def test_deterministic_methods_record_batches_when_told(setup):
    model, params, batches = setup
    a = fisherlib.fisher(model, params, batches[:3], method="exact")
    assert a.draws == () and a.seed is None
    a + fisherlib.fisher(model, params, batches[3:], method="exact")  # positions unknown: merges
    a3 = fisherlib.fisher(model, params, batches[:3], method="exact", first_batch=0)
    assert a3.draws == ((None, 0, 3),)
    with pytest.raises(ValueError, match="batches 2..2"):
        a3 + fisherlib.fisher(model, params, batches[2:], method="exact", first_batch=2)


def test_estimates_without_a_record_keep_the_old_seed_guard(setup):
    model, params, batches = setup
    a = fisherlib.fisher(model, params, batches[:2], seed=4)
    legacy = FisherEstimate(**{**a.__dict__, "draws": ()})
    assert legacy.draws[0][:2] == (4, 0)
    with pytest.raises(ValueError, match="seed=4"):
        legacy + fisherlib.fisher(model, params, batches[2:], seed=4, first_batch=2)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(first_batch=-1), ValueError, "first_batch"),
    (dict(first_batch=1.5), ValueError, "first_batch"),
    (dict(first_batch=0, batch_indices=[0, 1]), ValueError, "not both"),
    (dict(batch_indices=[0, 0]), ValueError, "appears twice"),
    (dict(batch_indices=[0]), ValueError, "fewer indices"),
    (dict(batch_indices=[0, -2]), ValueError, "non-negative"),
    (dict(batch_indices=3), TypeError, "batch_indices"),
])
def test_bad_batch_positions(setup, kwargs, error, match):
    model, params, batches = setup
    with pytest.raises(error, match=match):
        fisherlib.fisher(model, params, batches[:2], **kwargs)


# ------------------------------------------------------------- map-reduce without a process group


def test_map_reduce_of_k_saved_shards_equals_the_whole(setup, tmp_path):
    """docs/distributed.md's recipe: worker w runs batches [starts[w], starts[w+1]) and saves."""
    model, params, batches = setup
    for method, kw in (("hutchinson", dict(probes=4, seed=9)), ("exact", {})):
        whole = fisherlib.fisher(model, params, batches, method=method, **kw)
        starts = [0, 1, 4, N_BATCHES]  # k = 3 uneven shards
        for w in range(3):
            shard = batches[starts[w]:starts[w + 1]]
            fisherlib.fisher(model, params, shard, method=method, first_batch=starts[w],
                             **kw).save(tmp_path / f"{method}-{w}.npz")
        loaded = [FisherEstimate.load(tmp_path / f"{method}-{w}.npz") for w in (2, 0, 1)]
        merged = loaded[0] + loaded[1] + loaded[2]
        assert merged.n_inputs == N_BATCHES * B
        assert merged.draws == ((kw.get("seed"), 0, N_BATCHES),)
        np.testing.assert_allclose(flat(merged), flat(whole), rtol=1e-12)


def test_resumed_run_counts_nothing_twice(setup, tmp_path):
    model, params, batches = setup
    whole = fisherlib.fisher(model, params, batches, probes=2, seed=3)
    # A worker saved after batch 2 and was stopped; the resumed run starts at the saved count.
    fisherlib.fisher(model, params, batches[:3], probes=2, seed=3).save(tmp_path / "ckpt.npz")
    ckpt = FisherEstimate.load(tmp_path / "ckpt.npz")
    assert ckpt.draws == ((3, 0, 3),)
    resumed = ckpt + fisherlib.fisher(model, params, batches[3:], probes=2, seed=3, first_batch=3)
    np.testing.assert_allclose(flat(resumed), flat(whole), rtol=1e-12)
    # Resuming one batch too early would count batch 2 twice: refused, also after save/load.
    again = fisherlib.fisher(model, params, batches[2:], probes=2, seed=3, first_batch=2)
    with pytest.raises(ValueError, match="batches 2..2"):
        ckpt + again
    resumed.save(tmp_path / "all.npz")
    with pytest.raises(ValueError, match="twice"):
        FisherEstimate.load(tmp_path / "all.npz") + again


def test_importing_distributed_loads_no_framework():
    import json
    import subprocess
    import sys

    code = ("import json, sys, fisherlib.distributed; "
            "print(json.dumps([m for m in ('torch', 'jax', 'cupy') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
