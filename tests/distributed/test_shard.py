"""distributed.shard() is re-iterable: a second pass (an epoch, another fisher call) gave no batch,
and fisher() then said "no rank was given a batch" (issue 23). A one-process stand-in for
torch.distributed (world 1, or a rank of a larger world for the strided rule) runs in-process."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fisherlib  # noqa: E402
import fisherlib.distributed as fd  # noqa: E402
from fisherlib.distributed import _torch as T  # noqa: E402


class FakeDist:
    """The calls of fisherlib.distributed.fisher, for one rank of ``world`` (collectives: world 1)."""

    class ReduceOp:
        SUM = "sum"

    def __init__(self, rank=0, world=1):
        self.rank, self.world = rank, world

    def get_rank(self, group=None):
        return self.rank

    def get_world_size(self, group=None):
        return self.world

    def get_backend(self, group=None):
        return "gloo"

    def all_gather_object(self, out, obj, group=None):
        out[0] = obj

    def all_reduce(self, buf, op=None, group=None):
        return None


def test_strided_shard_iterates_again(monkeypatch):
    monkeypatch.setattr(T, "_dist", lambda: FakeDist(rank=1, world=3))
    s = fd.shard(list(range(8)))
    assert list(s) == [1, 4, 7] and list(s) == [1, 4, 7] and len(s) == 3
    gen = fd.shard(b for b in range(8))
    assert list(gen) == [1, 4, 7]
    with pytest.raises(ValueError, match="one-shot iterator"):
        list(gen)  # said nothing before: an empty second pass


def test_fisher_twice_over_one_shard(monkeypatch):
    monkeypatch.setattr(T, "_dist", lambda: FakeDist())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    xs = [torch.randn(2, 3, dtype=torch.float64) for _ in range(3)]
    mine = fd.shard(xs)
    a = fd.fisher(model, None, mine, probes=2, seed=1)
    b = fd.fisher(model, None, mine, probes=2, seed=1)  # "no rank was given a batch" before
    whole = fisherlib.fisher(model, None, xs, probes=2, seed=1)
    for est in (a, b):
        assert est.n_inputs == 6
        for n in whole.names:
            np.testing.assert_allclose(est.value[n].numpy(), whole.value[n].numpy(), rtol=1e-12)


class ThreadGroup(FakeDist):
    """``world`` ranks as threads of this process: the collectives meet at a barrier."""

    def __init__(self, world):
        import threading

        super().__init__(0, world)
        self.local, self.barrier = threading.local(), threading.Barrier(world, timeout=60)
        self.slots = [None] * world

    def get_rank(self, group=None):
        return self.local.rank

    def _exchange(self, obj):
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def all_gather_object(self, out, obj, group=None):
        out[:] = self._exchange(obj)

    def all_reduce(self, buf, op=None, group=None):
        total = sum(x.clone() for x in self._exchange(buf.clone()))
        buf.copy_(total)


def test_three_ranks_in_threads_equal_one_process(monkeypatch):
    """The strided shards, their global batch indices (the draws) and the one flat buffer split
    back into leaves: the union over 3 ranks equals one process over all 7 batches."""
    import threading

    group = ThreadGroup(3)
    monkeypatch.setattr(T, "_dist", lambda: group)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    xs = [torch.randn(2, 3, dtype=torch.float64) for _ in range(7)]
    whole = fisherlib.fisher(model, None, xs, probes=2, seed=3)
    out, errors = [None] * 3, []

    def rank(r):
        group.local.rank = r
        try:
            out[r] = fd.fisher(model, None, fd.shard(xs), probes=2, seed=3)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for est in out:
        assert est.n_inputs == 14 and est.draws == whole.draws
        for n in whole.names:
            np.testing.assert_allclose(est.value[n].numpy(), whole.value[n].numpy(), rtol=1e-12, err_msg=n)
