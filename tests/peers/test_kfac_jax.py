"""fisherlib's exact diagonal against kfac-jax's exact curvature on a JAX MLP (float64).

kfac-jax's ``BlockDiagonalCurvature`` with ``DenseDiagonal`` blocks and estimation mode
``ggn_exact`` / ``fisher_exact`` loops over the C one-hot columns of the loss's factor; its
statistics are divided by the batch size, so the wrapper multiplies by N (docs/peers.md).
Skipped with the reason when kfac-jax is missing or does not run on the installed JAX.
"""

from __future__ import annotations

import pytest

pytest.importorskip("jax")

import fisherlib  # noqa: E402

from . import kfac_calls as K  # noqa: E402

RTOL = 1e-8
N = 7


@pytest.fixture(scope="module")
def kfac():
    reason = K.kfac_jax_broken()
    if reason:
        pytest.skip(reason)
    import jax

    return jax


@pytest.mark.parametrize("likelihood", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mode", ["ggn_exact", "fisher_exact"])
def test_kfac_jax_exact_diag(kfac, likelihood, mode):
    import jax.numpy as jnp
    import numpy as np

    jax = kfac
    assert jax.config.jax_enable_x64  # tests/conftest.py turns float64 on
    if True:
        params = K.jax_mlp_init((6, 8, 5), dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (N, 6), jnp.float64)
        y = (jax.random.randint(jax.random.key(2), (N,), 0, 5) if likelihood == "softmax"
             else jax.random.bernoulli(jax.random.key(2), 0.5, (N, 5)).astype(jnp.float64))
        got = K.kfac_jax_diag(params, x, y, likelihood=likelihood, mode=mode)
        est = fisherlib.fisher(K.jax_mlp, params, x, method="exact", likelihood=likelihood)
    ref = np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(est.value)])
    assert np.abs(got - ref).max() / np.abs(ref).max() < RTOL
