"""fisherlib.distributed.jax_fisher on 4 (host CPU) devices equals a single-device run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_four_devices_equal_one():
    # The device count is fixed when jax starts: a fresh process.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "tests.distributed._jax_devices"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    gap, n_inputs, draws = out["list"]
    assert gap < 1e-12 and n_inputs == 9 * 4 and draws == [[2, 0, 9]]
    assert out["n_outputs"] == [9 * 4, 9 * 4]
    gap, n_inputs, draws = out["mixed"]
    assert gap < 1e-12 and n_inputs == 8 * 4 + 3 and draws == [[2, 0, 9]]
    for case in ("stacked", "labels"):
        gap, n_inputs, draws = out[case]
        assert gap < 1e-12 and n_inputs == 8 * 4 and draws == [[None, 0, 8]], case


def test_one_device_in_process():
    """In this process jax has one CPU device: a mesh of one, and the argument checks."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import fisherlib
    import fisherlib.distributed as fd

    def model(p, x):
        return x @ p["w"]

    p = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)))}
    xs = [jnp.asarray(np.random.default_rng(b).normal(size=(2, 3))) for b in range(3)]
    one = fisherlib.fisher(model, p, xs, probes=2, seed=1)
    many = fd.jax_fisher(model, p, xs, probes=2, seed=1, devices=jax.devices()[:1])
    np.testing.assert_allclose(np.asarray(many.value["w"]), np.asarray(one.value["w"]), rtol=1e-6)
    with pytest.raises(TypeError, match="first_batch"):
        fd.jax_fisher(model, p, xs, first_batch=1)
    with pytest.raises(ValueError, match="batch_indices"):
        fd.jax_fisher(model, p, xs, batch_indices=[0, 0, 1])
    with pytest.raises(ValueError, match="no batch"):
        fd.jax_fisher(model, p, [])
