"""core.layers.diag of an embedding through an adapter's scatter-add (``add_rows``) equals the
rows-present one-hot path and the per-example gradients squared by hand, with repeated rows
within an input, a padding row, per probe and summed, eagerly and under ``jax.jit``."""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib.core.layers import Layer, diag

jax = pytest.importorskip("jax")


def _by_hand(idx, g, num, padding):
    V, N, S, D = g.shape
    per = np.zeros((V, N, num, D))
    for n in range(N):
        for s in range(S):
            if idx[n, s] != padding:
                per[:, n, idx[n, s]] += g[:, n, s]
    return (per ** 2).sum(1)


@pytest.mark.parametrize("sum_probes", [False, True])
@pytest.mark.parametrize("padding", [None, 2])
def test_embedding_diag_through_add_rows(sum_probes, padding):
    from fisherlib.backends.jax_layers import _add_rows

    rng = np.random.default_rng(3)
    num, D = 9, 4
    idx = np.array([[2, 5, 5, 0, 5], [1, 1, 2, 8, 1], [3, 3, 3, 3, 3]])
    g = rng.normal(size=(2, *idx.shape, D))
    want = _by_hand(idx, g, num, padding)
    want = want.sum(0, keepdims=True) if sum_probes else want

    def layer(x, gg, rows=None):
        return Layer("embedding", {"weight": "w"}, {"weight": (num, D)}, x, gg, num=num, padding=padding,
                     add_rows=rows)

    np.testing.assert_allclose(diag(layer(idx, g), sum_probes=sum_probes)["weight"], want, rtol=1e-12, atol=1e-14)
    with jax.enable_x64(True):
        x, gg = jax.numpy.asarray(idx), jax.numpy.asarray(g)
        eager = diag(layer(x, gg, _add_rows), sum_probes=sum_probes)["weight"]
        jitted = jax.jit(lambda x, gg: diag(layer(x, gg, _add_rows), sum_probes=sum_probes)["weight"])(x, gg)
        for got in (eager, jitted):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-14)
