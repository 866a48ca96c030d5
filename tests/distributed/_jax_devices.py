"""Run by tests/distributed/test_jax_devices.py in a fresh process with 4 host CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before jax is imported, hence a
process of its own. Prints one JSON line: per case, the largest difference from a single-device
run, the inputs counted and the draw record.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import fisherlib  # noqa: E402
import fisherlib.distributed as fd  # noqa: E402


def model(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def gap(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a.parts, b.parts))


def main():
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(3, 5))), "b1": jnp.asarray(rng.normal(size=5)),
              "w2": jnp.asarray(rng.normal(size=(5, 4)))}
    batches = [jnp.asarray(rng.normal(size=(4, 3))) for _ in range(8)]
    labels = [jnp.asarray(rng.integers(0, 4, size=4)) for _ in range(8)]
    out = {"devices": len(jax.devices())}
    kw = dict(probes=3, seed=2)
    # 9 batches: two steps of one batch per device, and the ninth on the first device.
    one = fisherlib.fisher(model, params, batches + batches[:1], **kw)
    many = fd.jax_fisher(model, params, batches + batches[:1], **kw)
    out["list"] = [gap(one, many), many.n_inputs, many.draws]
    out["n_outputs"] = [one.n_outputs, many.n_outputs]
    # A short batch in the middle: the batches shaped like the first run D at a time in their
    # order (indices 0-2 and 4-8), the short one (index 3) alone on the first device.
    mixed = batches[:3] + [jnp.asarray(rng.normal(size=(3, 3)))] + batches[3:]
    one = fisherlib.fisher(model, params, mixed, **kw)
    many = fd.jax_fisher(model, params, mixed, **kw)
    out["mixed"] = [gap(one, many), many.n_inputs, many.draws]
    # Stacked (B, N, D) inputs sharded over a mesh: each device scans its 2 batches.
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    shard = NamedSharding(mesh, PartitionSpec("batch"))
    xs = jax.device_put(jnp.stack(batches), shard)
    one = fisherlib.fisher(model, params, batches, method="exact", first_batch=0)
    many = fd.jax_fisher(model, params, xs, stacked=True, method="exact")
    out["stacked"] = [gap(one, many), many.n_inputs, many.draws]
    # Labels travel with their batches (stacked and sharded alike). ignore_index=None: a traced
    # label array cannot say whether it holds the ignored index, and fisher() then counts the
    # kept outputs eagerly (see the report of issue 15).
    ys = jax.device_put(jnp.stack(labels), shard)
    pairs = list(zip(batches, labels))
    one = fisherlib.fisher(model, params, pairs, method="empirical", first_batch=0, ignore_index=None)
    many = fd.jax_fisher(model, params, (xs, ys), stacked=True, method="empirical", ignore_index=None)
    out["labels"] = [gap(one, many), many.n_inputs, many.draws]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
