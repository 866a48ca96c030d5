"""core.layers.diag through an adapter's ``scan`` over inputs (one 2-D product per input) equals
the chunked batched products, for grouped and ungrouped shared-position dense layers, per
probe and summed, on NumPy (a Python loop) and under JAX's ``lax.scan``."""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib.core.layers import Layer, diag


def _python_scan(step, init, arrays):
    acc = init
    for n in range(arrays[0].shape[0]):
        acc = step(acc, *(a[n, ...] for a in arrays))
    return acc


def _layer(G, rng, scan=None, bias=True):
    V, N, S, O, I = 3, 5, 4, 2, 6
    x, g = rng.normal(size=(N, S, G, I)), rng.normal(size=(V, N, S, G, O))
    leaves = {"weight": "w", "bias": "b"} if bias else {"weight": "w"}
    shapes = {"weight": (G * O, I), "bias": (G * O,)} if bias else {"weight": (G * O, I)}
    return Layer("dense", leaves, shapes, x, g, scan=scan)


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("sum_probes", [False, True])
def test_scan_diag_equals_the_chunked_products(G, sum_probes):
    rng = np.random.default_rng(G)
    plain = _layer(G, rng)
    looped = _layer(G, np.random.default_rng(G), scan=_python_scan)
    # by hand: the per-example gradients, squared and summed over inputs
    per = np.einsum("vnsgo,nsgi->vngoi", plain.g, plain.x)
    want_w = (per ** 2).sum(1).reshape(3, -1, 6)
    want_b = (plain.g.sum(2) ** 2).sum(1).reshape(3, -1)
    if sum_probes:
        want_w, want_b = want_w.sum(0, keepdims=True), want_b.sum(0, keepdims=True)
    for layer in (plain, looped):
        got = diag(layer, sum_probes=sum_probes)
        np.testing.assert_allclose(got["weight"], want_w, rtol=1e-12)
        np.testing.assert_allclose(got["bias"], want_b, rtol=1e-12)


def test_scan_diag_under_jax_lax_scan():
    jax = pytest.importorskip("jax")
    from fisherlib.backends.jax_layers import _scan

    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        ref = _layer(2, rng, bias=False)
        lay = Layer("dense", ref.leaves, ref.shapes, jax.numpy.asarray(ref.x), jax.numpy.asarray(ref.g), scan=_scan)
        got = jax.jit(lambda x, g: diag(Layer("dense", lay.leaves, lay.shapes, x, g, scan=_scan),
                                        sum_probes=False)["weight"])(lay.x, lay.g)
        np.testing.assert_allclose(np.asarray(got), diag(ref, sum_probes=False)["weight"], rtol=1e-12)
