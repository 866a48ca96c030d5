"""fisherlib.distributed.fisher on 2 and 3 gloo processes equals one process over the same batches."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - builds without distributed support
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import fisherlib  # noqa: E402
from fisherlib.estimators import FisherEstimate, KroneckerEstimate  # noqa: E402

from . import _torch_workers as W  # noqa: E402

pytestmark = pytest.mark.slow


def flat(est):
    return np.concatenate([np.ravel(np.asarray(x)) for x in est.to_numpy().parts])


@pytest.fixture(scope="module")
def single():
    model, xs, ys = W.data()
    pairs = list(zip(xs, ys))
    out = {name: fisherlib.fisher(model, None, pairs if p else xs, first_batch=0, **kw)
           for name, (kw, p) in W.CASES.items()}
    out["ddp-contiguous"] = out["hutchinson"]
    out["tail"] = fisherlib.fisher(model, None, xs[:2], first_batch=5, probes=3, seed=4)
    out["kfac-tail"] = fisherlib.fisher(model, None, xs[:2], first_batch=5, structure="kfac", method="exact")
    return out


def load(path):
    return (KroneckerEstimate if path.name.startswith("kfac") else FisherEstimate).load(path)


@pytest.mark.parametrize("world", [2, 3])
def test_union_equals_single_process(world, single, tmp_path):
    import torch.multiprocessing as mp

    # A fork server that imported torch and fisherlib once starts the ranks in a fraction of a
    # second each (spawn re-imports them in every process: seconds on a loaded machine). The
    # first DistributedDataParallel imports torch._dynamo (~4 s): preloaded too.
    mp.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch._dynamo", "fisherlib.backends.torch", "fisherlib.distributed", W.__name__])
    mp.start_processes(W.run, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       join=True, start_method="forkserver")
    for name in [*W.CASES, "ddp-contiguous"]:
        ests = [load(tmp_path / f"{name}-{world}-{r}.npz") for r in range(world)]
        ref = single[name]
        for est in ests:  # every rank holds the union
            assert est.n_inputs == est.n_outputs == W.N_BATCHES * W.B
            assert est.draws == ref.draws
            np.testing.assert_allclose(flat(est), flat(ref), rtol=1e-12, atol=1e-15, err_msg=name)
    dst = FisherEstimate.load(tmp_path / f"dst-{world}.npz")
    assert dst.n_inputs == 2 * W.B and dst.draws == ((4, 5, 7),)
    np.testing.assert_allclose(flat(dst), flat(single["tail"]), rtol=1e-12)
    for r in range(world):  # K-FAC with ranks that had no batch: every rank holds rank 1's blocks
        est = load(tmp_path / f"kfac-tail-{world}-{r}.npz")
        np.testing.assert_allclose(est.to_dense(), single["kfac-tail"].to_dense().numpy(), rtol=1e-12)
    errors = [(tmp_path / f"error-{world}-{r}.txt").read_text() for r in range(world)]
    assert "pairs" in errors[-1] and all(f"rank {world - 1} failed" in e for e in errors[:-1])


def test_without_a_process_group():
    import fisherlib.distributed as fd

    model, xs, _ = W.data()
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.fisher(model, None, xs)
