"""The jaxpr proof that a model keeps the inputs of a batch apart (fisherlib.backends._jax_rows):
proven for models that do (then the layer capture skips its numerical check), never for models
that mix inputs (batch statistics, attention across the batch, a scan, a permutation or a
cumulative sum over the batch), where the numerical check then warns as before.

The ground truth is the Jacobian of the logits with respect to the inputs: a model keeps its
inputs apart when it is block-diagonal (input n moves only output n).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from backend_cases import HAS

pytestmark = pytest.mark.skipif(not HAS["jax"], reason="jax is not installed")

jax = pytest.importorskip("jax") if HAS["jax"] else None
jnp = jax.numpy if jax else None

N, D, C = 5, 4, 3


def _normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _proven(f, p, x) -> bool:
    from fisherlib.backends import jax_layers

    leaves, treedef = jax.tree_util.tree_flatten(p)
    plan = jax_layers._plan(f, leaves, treedef, x)
    assert plan is not None
    return plan[4]


def _block_diagonal(f, p, x) -> bool:
    J = np.asarray(jax.jacobian(lambda x: f(p, x))(x)).reshape(N, C, N, -1)
    off = [J[n, :, m] for n in range(N) for m in range(N) if n != m]
    return all(np.all(b == 0) for b in off)


P = {"w": _normal(1, D, D) if jax else None, "v": _normal(2, D, C) if jax else None,
     "cls": _normal(3, 1, 1, D) if jax else None}


def _conv(p, x):  # NHWC convolution, relu (a custom_jvp), a flattening reshape
    k = jnp.reshape(p["w"], (2, 2, 1, D))
    h = jax.lax.conv_general_dilated(x[..., None], k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(h).reshape(x.shape[0], -1)[:, :D] @ p["v"]


APART = {
    "mlp": lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"],
    "layer norm and gelu": lambda p, x: jax.nn.gelu((x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
                                                     @ p["w"]) @ p["v"],
    "attention within an input": lambda p, x: (jax.nn.softmax(jnp.einsum("ntd,nsd->nts", x @ p["w"], x), -1)
                                               @ x).mean(1) @ p["v"],
    "a parameter token prepended": lambda p, x: jnp.concatenate(
        [jnp.broadcast_to(p["cls"], (x.shape[0], 1, D)), x], axis=1)[:, 0] @ p["w"] @ p["v"],
    "cumulative sum, sort and slices over positions": lambda p, x: (jnp.sort(jnp.cumsum(x, axis=1), axis=-1)[:, 1:]
                                                                   .max(1) @ p["w"]) @ p["v"],
    "convolution and relu": _conv,
}

def _then(mix):
    """The model mixing its inputs after its first layer (mixing before any parameter is harmless
    to per-example gradients, and the numerical check rightly passes it)."""
    return lambda p, x: mix(x @ p["w"]) @ p["v"]


MIXED = {
    "batch statistics": _then(lambda h: (h - h.mean(0)) / h.std(0)),
    "attention across the batch": _then(lambda h: jax.nn.softmax(h @ h.T, -1) @ h),
    "cumulative sum over the batch": _then(lambda h: jnp.cumsum(h, axis=0)),
    "reversed batch": _then(lambda h: h[::-1]),
    "permuted batch": _then(lambda h: h[jnp.asarray([1, 0, 2, 4, 3])]),
    "rolled batch": _then(lambda h: jnp.roll(h, 1, axis=0)),
    "a scan over the batch": _then(lambda h: jax.lax.scan(lambda c, r: (c + r, c + r), jnp.zeros(D), h)[1]),
}


def _inputs(name):
    return _normal(9, N, 3, D) if name in ("attention within an input", "a parameter token prepended",
                                           "cumulative sum, sort and slices over positions") else \
        _normal(9, N, 3, 3) if name == "convolution and relu" else _normal(9, N, D)


@pytest.mark.parametrize("name", sorted(APART))
def test_models_that_keep_inputs_apart_are_proven(name):
    from fisherlib.backends import get

    f, x = APART[name], _inputs(name)
    assert _block_diagonal(f, P, x)
    assert _proven(f, P, x), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MixedInputsWarning, no other
        get("jax").layer_io(f, P, x)


@pytest.mark.parametrize("name", sorted(MIXED))
def test_models_that_mix_inputs_are_never_proven(name):
    from fisherlib.backends import get

    f, x = MIXED[name], _inputs(name)
    assert not _block_diagonal(f, P, x)
    assert not _proven(f, P, x), name
    with pytest.warns(UserWarning, match="mixes the inputs"):
        _, cap = get("jax").layer_io(f, P, x)
    assert not cap.calls


def test_custom_vjp_is_left_to_the_numerical_check():
    """A custom VJP's backward is its own: no proof, however row-wise its forward; the numerical
    check then finds the rows apart and the layers are captured."""
    from fisherlib.backends import get

    @jax.custom_vjp
    def ident(h):
        return h

    ident.defvjp(lambda h: (h, None), lambda _, g: (g,))

    def f(p, x):
        return ident(x @ p["w"]) @ p["v"]

    x = _inputs("mlp")
    assert not _proven(f, P, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, cap = get("jax").layer_io(f, P, x)
    assert cap.calls
