"""A slice of the estimator matrix on array_api_strict, torch and JAX (float64), and JAX in
float32 with x64 off; the same dense float64 reference as the NumPy matrix (test_matrix.py).

The slice covers every value of every option at least once (method, structure, bound with
rank 2, likelihood, reduction, per_example, dist), always over two batches with chunk_size=3.
On torch the backend object is a parameter: the per-example / exact / empirical cells also run
with ``layer_io=True`` and ``False`` where the adapter takes that option, and with an explicit
parameter dict as well as ``params=None``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fisherlib import backends

from fisher_reference import torch_mlp
from matrix_cases import (
    CHUNK, NP_NAMES, D, H, C, N, Cell, check, numpy_reference_data, reference, read, run, split,
)

K = 600

SLICE = [
    Cell("hutchinson", "diag", "softmax", None, 1, "sum", False, "rademacher"),
    Cell("hutchinson", "diag", "softmax", "lower", 1, "sum", True, "rademacher"),
    Cell("hutchinson", "blocks", "softmax", "lower", 2, "mean", True, "gaussian"),
    Cell("hutchinson", "trace", "softmax", "upper", 1, "sum", True, "rademacher"),
    Cell("hutchinson", "sketch", "sigmoid", None, 1, "mean", False, "gaussian"),
    Cell("mc", "diag", "sigmoid", None, 1, "mean", True, "none"),
    Cell("mc", "blocks", "softmax", None, 1, "sum", False, "none"),
    Cell("mc", "trace", "softmax", None, 1, "sum", True, "none"),
    Cell("exact", "blocks", "softmax", "lower", 2, "sum", True, "none"),
    Cell("exact", "diag", "sigmoid", None, 1, "mean", True, "none"),
    Cell("exact", "trace", "softmax", "upper", 1, "sum", True, "none"),
    Cell("empirical", "diag", "softmax", None, 1, "sum", True, "none"),
    Cell("empirical", "blocks", "sigmoid", None, 1, "mean", True, "none"),
]
PER_EXAMPLE = [c for c in SLICE if c.per_example]
# JAX compiles every operation anew for each new shape (two batch sizes, chunks, the secular
# solver's steps): 5-30 s per cell on a loaded 2-core machine. Its slice keeps every method,
# the structures diag/blocks/trace, both likelihoods, reductions and per_example settings and
# the upper bound; the lower bound (rank 1, exact) is in test_frameworks.py, and its rank-k and
# random paths are the same Array API code as on NumPy and torch (docs/testing.md).
JAX_SLICE = [SLICE[0], SLICE[5], SLICE[10], SLICE[12]]


def _slack(k: int) -> float:
    """Sampling error of a standard deviation from k probes (kurtosis <= 15), 4 sd."""
    return 1 + 4 * math.sqrt(14 / (4 * k))


@pytest.fixture(scope="module")
def data():
    return numpy_reference_data()


def _labels(cell, y, ymulti):
    return y if cell.likelihood == "softmax" else ymulti


def _batches(cell, x, y, ymulti, conv):
    if cell.method == "empirical":
        return [(conv(a), conv(b)) for a, b in split(x, _labels(cell, y, ymulti))]
    return [conv(a) for a in split(x)]


def _check(cell, est, data):
    params, x, y, ymulti, z, J = data
    check(cell, est, reference(cell, J, z, y, ymulti), K=K, rtol=1e-9, slack=_slack(K))


def test_slice_covers_every_option():
    for attr in ("method", "structure", "likelihood", "bound", "reduction", "per_example"):
        assert len({getattr(c, attr) for c in SLICE}) == {"method": 4, "structure": 4, "likelihood": 2,
                                                            "bound": 3, "reduction": 2, "per_example": 2}[attr]
    assert {c.rank for c in SLICE} == {1, 2} and {"rademacher", "gaussian"} <= {c.dist for c in SLICE}


# ------------------------------------------------------------------ array_api_strict


@pytest.mark.parametrize("cell", SLICE, ids=lambda c: c.id)
def test_array_api_strict(data, cell):
    xs = pytest.importorskip("array_api_strict")
    from fisherlib.models import MLP

    params = {k: xs.asarray(v) for k, v in data[0].items()}
    x, y, ymulti = data[1], data[2], data[3]
    est = run(MLP([D, H, C], activation="tanh"), params, _batches(cell, x, y, ymulti, xs.asarray), cell, K=K,
              backend="numpy")
    _check(cell, est, data)


# ------------------------------------------------------------------ torch


def _torch_backends():
    out = [pytest.param(None, id="default")]
    try:
        backends.get("torch", layer_io=True)
    except TypeError:  # the adapter has no layer-I/O option (yet)
        return out
    except ImportError:
        return out
    return [pytest.param(True, id="layer_io"), pytest.param(False, id="vmap")]


TORCH_NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("explicit", [False, True], ids=["params=None", "params=dict"])
@pytest.mark.parametrize("cell", SLICE, ids=lambda c: c.id)
def test_torch(data, cell, explicit):
    torch, net = torch_mlp(data[0])
    params = {n: p.detach().clone() for n, p in net.named_parameters()} if explicit else None
    x, y, ymulti = data[1], data[2], data[3]
    est = run(net, params, _batches(cell, x, y, ymulti, torch.as_tensor), cell, K=K, group=TORCH_NAMES)
    _check(cell, est, data)


@pytest.mark.parametrize("layer_io", _torch_backends())
@pytest.mark.parametrize("explicit", [False, True], ids=["params=None", "params=dict"])
@pytest.mark.parametrize("cell", PER_EXAMPLE, ids=lambda c: c.id)
def test_torch_per_example_routes(data, cell, explicit, layer_io):
    """Per-example products through layer I/O and through the generic vmap route agree with
    the reference (skipped as one 'default' case while the adapter has no layer_io option)."""
    if layer_io is None:
        pytest.skip("backends.get('torch', layer_io=...) is not available; test_torch covers the default")
    torch, net = torch_mlp(data[0])
    params = {n: p.detach().clone() for n, p in net.named_parameters()} if explicit else None
    x, y, ymulti = data[1], data[2], data[3]
    be = backends.get("torch", layer_io=layer_io)
    est = run(net, params, _batches(cell, x, y, ymulti, torch.as_tensor), cell, K=K, backend=be,
              group=TORCH_NAMES)
    _check(cell, est, data)


# ------------------------------------------------------------------ JAX


def _jax_model(params):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def f(p, x):
        return jnp.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["1.weight"].T + p["1.bias"]

    return jnp, f, {k: jnp.asarray(v) for k, v in params.items()}


@pytest.mark.parametrize("cell", JAX_SLICE, ids=lambda c: c.id)
def test_jax(data, cell):
    jnp, f, params = _jax_model(data[0])
    x, y, ymulti = data[1], data[2], data[3]
    est = run(f, params, _batches(cell, x, y, ymulti, jnp.asarray), cell, K=K)
    _check(cell, est, data)


_F32_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", False)
    import jax.numpy as jnp
    import numpy as np
    import fisherlib
    d = json.loads(sys.stdin.read())
    p = {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in d["params"].items()}
    x = jnp.asarray(np.asarray(d["x"], np.float32))
    y = jnp.asarray(np.asarray(d["y"], np.int32))
    def f(p, x):
        return jnp.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["1.weight"].T + p["1.bias"]
    out = {}
    order = ["0.weight", "0.bias", "1.weight", "1.bias"]
    for name, kw, data in [("exact", dict(method="exact"), [x[:6], x[6:]]),
                           ("empirical", dict(method="empirical"), [(x[:6], y[:6]), (x[6:], y[6:])]),
                           ("hutchinson", dict(probes=600, seed=2), [x[:6], x[6:]])]:
        e = fisherlib.fisher(f, p, data, **kw)
        assert all(v.dtype == jnp.float32 for v in e.value.values()), name
        v, s = e.to_numpy().value, e.to_numpy().stderr
        by = {n.strip("[]'\\\""): n for n in e.names}
        out[name] = [np.concatenate([np.ravel(v[by[n]]) for n in order]).tolist(),
                     np.concatenate([np.ravel(s[by[n]]) for n in order]).tolist()]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_jax_float32_without_x64(data):
    """float32 end to end with x64 off (as JAX users run it): the suite forces x64 on for the
    whole process (tests/conftest.py), so this runs in a fresh interpreter. Tolerance: float32
    rounding, 2^-23 relative per operation, through a network of depth 2 with P = 36: 1e-5 of
    the largest entry (about 100 ulp)."""
    pytest.importorskip("jax")
    params, x, y, ymulti, z, J = data
    f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)  # noqa: E731 - the rounded inputs
    from fisher_reference import jacobians
    from fisherlib.models import MLP

    p32 = {k: f32(v) for k, v in params.items()}
    z32, J32 = jacobians(backends.get("numpy"), MLP([D, H, C], activation="tanh"), p32, f32(x))
    payload = json.dumps({"params": {k: v.tolist() for k, v in p32.items()}, "x": f32(x).tolist(),
                          "y": y.tolist()})
    env = dict(os.environ, JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _F32_SCRIPT], input=payload, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, cell in (("exact", Cell("exact", "diag", "softmax", None, 1, "sum", True, "none")),
                       ("empirical", Cell("empirical", "diag", "softmax", None, 1, "sum", True, "none")),
                       ("hutchinson", Cell("hutchinson", "diag", "softmax", None, 1, "sum", False, "rademacher"))):
        F = np.diag(reference(cell, J32, z32, y, ymulti))
        value, se = (np.asarray(a) for a in out[name])
        scale = np.abs(F).max()
        if cell.method in ("exact", "empirical"):
            np.testing.assert_allclose(value, F, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
        else:
            from matrix_cases import sigmas

            assert np.all(np.abs(value - F) <= sigmas(F.size) * se + 1e-5 * scale), name
