"""Scale out: the Fisher of a dataset across processes (torch.distributed) and devices (JAX).

* :func:`fisher`: called on every rank of a torch.distributed process group, each over its
  shard of the batches; one all-reduce gives every rank the estimate over all of them.
* :func:`jax_fisher`: batches spread over the local JAX devices, the sums reduced across them.
* Without a process group: each worker runs :func:`fisherlib.fisher` with ``first_batch`` and
  saves its estimate; one process loads and merges them (docs/distributed.md).

Both rest on one rule: the draws of global batch b depend on (seed, b) only, never on the
process or device that runs it, so a sharded run equals a single-process run over the same
batches in the same order. Importing this package imports no framework.
"""

from ._jax import jax_fisher
from ._torch import fisher, shard

__all__ = ["fisher", "jax_fisher", "shard"]
