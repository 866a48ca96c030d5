"""blocks="unitwise" finds output units in either weight layout: torch's (out, in) rows and
flax's (in, out) kernel columns, each with its bias entry (one rule, estimators/_units.py)."""

from __future__ import annotations

import numpy as np
import pytest

import fisherlib

I, O, C, N = 3, 5, 4, 6


def _dense_units(full, W, b, axis):
    """Unit blocks cut from the dense block over [W.ravel(), b]: unit u's weights, then b_u."""
    idx = np.arange(W.size).reshape(W.shape)
    out = []
    for u in range(O):
        w_ids = idx[u] if axis == 0 else idx[:, u]
        ids = np.concatenate([w_ids.ravel(), [W.size + u]])
        out.append(full[np.ix_(ids, ids)])
    return np.stack(out)


def test_flax_kernels_are_split_by_output_column():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    params = {"Dense_0": {"bias": jnp.asarray(rng.normal(size=O)), "kernel": jnp.asarray(rng.normal(size=(I, O)))},
              "head": jnp.asarray(rng.normal(size=(O, C)))}
    x = jnp.asarray(rng.normal(size=(N, I)))

    def f(p, x):
        return jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) @ p["head"]

    unit = fisherlib.fisher(f, params, x, method="exact", structure="blocks", blocks="unitwise").to_numpy()
    full = fisherlib.fisher(f, params, x, method="exact", structure="blocks",
                            blocks={"layer": ["Dense_0.kernel", "Dense_0.bias"]}).to_numpy()
    got = unit.value["Dense_0.kernel"]
    assert got.shape == (O, I + 1, I + 1)
    # the dense block lists the kernel first, then the bias
    want = _dense_units(full.value["layer"], np.zeros((I, O)), None, axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


def test_torch_rows_and_a_bias_free_conv_before_batch_norm():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(I, O), torch.nn.Tanh(), torch.nn.Linear(O, C)).double()
    x = torch.randn(N, I, dtype=torch.float64)
    unit = fisherlib.fisher(net, None, x, method="exact", structure="blocks", blocks="unitwise").to_numpy()
    full = fisherlib.fisher(net, None, x, method="exact", structure="blocks",
                            blocks={"layer": ["0.weight", "0.bias"]}).to_numpy()
    want = _dense_units(full.value["layer"], np.zeros((O, I)), None, axis=0)
    np.testing.assert_allclose(unit.value["0.weight"], want, rtol=1e-10, atol=1e-14)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 2, bias=False), torch.nn.BatchNorm2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(8, 3)).double().eval()
    est = fisherlib.fisher(conv, None, torch.randn(3, 1, 3, 3, dtype=torch.float64), method="exact",
                           structure="blocks", blocks="unitwise")
    assert est.block_shapes["0.weight"] == (2, 4, 4)  # no bias: the batch norm's weight is not one
    assert est.block_shapes["1.weight"] == (2, 2)
