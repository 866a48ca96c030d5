"""JAX layer I/O (fisherlib.backends.jax_layers): the layers found in jaxprs, and the per-example
products they give agree with the generic per-example VJP to rounding, in float64.

Every model is tiny. ``_check`` compares each recognised layer's per-example gradients and
diagonal (core.layers on the captured x, g) with ``per_example_vjp``; ``_compare`` runs
``fisher()`` with the layer I/O and with ``backends.get("jax", layer_io=False)`` (compiling is
what costs here, so the full route matrix runs on one model mixing covered and uncovered leaves).
"""

from __future__ import annotations

import numpy as np
import pytest
from backend_cases import HAS

import fisherlib
from fisherlib.backends import get

pytestmark = pytest.mark.skipif(not HAS["jax"], reason="jax is not installed")

jax = pytest.importorskip("jax") if HAS["jax"] else None
jnp = jax.numpy if jax else None

N, C = 5, 3
# (method, structure, extra options): every per-example method and every structure of fisher()
ROUTES = [
    ("exact", "diag", {}),
    ("exact", "blocks", {"blocks": "unitwise"}),
    ("empirical", "trace", {}),
    ("hutchinson", "diag", {"per_example": True, "probes": 3, "seed": 0}),
    ("mc", "blocks", {"per_example": True, "probes": 2, "seed": 0, "blocks": None}),
]


def _normal(seed, *shape):
    # NumPy draws: an eager jax.random call compiles once per shape, which is most of a test's time
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _abstract(a):
    return isinstance(a, jax.ShapeDtypeStruct)


def _fill(tree, seed=0):
    """Random float64 leaves for a tree of arrays or ShapeDtypeStructs (``jax.eval_shape`` of an
    init: flax's and equinox's own initialisers take seconds to compile); variances positive."""
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, a in paths:
        if not jnp.issubdtype(a.dtype, jnp.floating):
            out.append(a)
            continue
        v = rng.standard_normal(a.shape)
        out.append(jnp.asarray(0.5 + np.abs(v) if "var" in jax.tree_util.keystr(path) else v))
    return jax.tree_util.tree_unflatten(treedef, out)


def _check(f, params, x, seed=0):
    """(owned, uncovered) of the capture; asserts per-example gradients and diagonals agree."""
    from fisherlib.core import layers as core_layers

    be = get("jax")
    logits, cap = be.layer_io(f, params, x)
    ct = _normal(seed, 2, *logits.shape)
    ref = dict(be.leaves(be.per_example_vjp(f, params, x, ct)))
    owned = {}
    assert cap.calls
    for layer in cap(ct):
        # The reductions are core's (tested there, on every namespace): run them on NumPy copies,
        # which compiles nothing.
        layer.x, layer.g = np.asarray(layer.x), np.asarray(layer.g)
        grads = core_layers.per_example_grads(layer, 0, x.shape[0])
        diag = core_layers.diag(layer, sum_probes=False)
        for role, name in layer.leaves.items():
            owned[name] = (layer.kind, role)
            r = np.asarray(ref[name])
            scale = np.abs(r).max()
            assert scale > 0, name
            np.testing.assert_allclose(np.asarray(grads[role]), r, rtol=1e-10, atol=1e-12 * scale, err_msg=name)
            np.testing.assert_allclose(np.asarray(diag[role]), (r * r).sum(axis=1), rtol=1e-10,
                                       atol=1e-12 * scale**2, err_msg=name)
    return owned, set(cap.uncovered)


def _compare(f, params, x, cases=ROUTES, labels=None):
    be, gen = get("jax"), get("jax", layer_io=False)
    labels = jnp.arange(N) % C if labels is None else labels
    for method, structure, kw in cases:
        data = [(x, labels)] if method == "empirical" else x
        a = fisherlib.fisher(f, params, data, method=method, structure=structure, backend=be, **kw)
        b = fisherlib.fisher(f, params, data, method=method, structure=structure, backend=gen, **kw)
        va, vb = jax.tree_util.tree_leaves(a.value), jax.tree_util.tree_leaves(b.value)
        assert len(va) == len(vb) > 0
        scale = max(float(jnp.max(jnp.abs(v))) for v in vb)
        assert scale > 0, (method, structure)
        for u, v in zip(va, vb):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-12 * scale,
                                       err_msg=f"{method} {structure} {kw}")


# --------------------------------------------------------------------------- hand-written functions


def _mlp(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"].T + p["b2"]  # (O, I) stored, as torch/equinox do


def test_plain_mlp():
    p = _fill({"w1": jnp.ones((4, 6)), "b1": jnp.ones(6), "w2": jnp.ones((C, 6)), "b2": jnp.ones(C)})
    x = _normal(1, N, 4)
    owned, uncovered = _check(_mlp, p, x)
    assert owned == {"w1": ("dense", "weight"), "b1": ("dense", "bias"), "w2": ("dense", "weight"),
                     "b2": ("dense", "bias")}
    assert not uncovered


def _mixed(p, x):
    h = jnp.take(p["emb"], x, axis=0)  # (N, T, D): "emb" is also the tied output projection below
    h = h + p["pos"]  # a positional embedding: a shift over (T, D)
    h = h * jnp.exp(p["t"])  # not a view: uncovered
    h = jnp.tanh(h @ p["w"] + p["b"]) * p["g"]  # a dense layer shared over positions, then a scale
    return jnp.mean(h, axis=1) @ p["emb"][:C].T


@pytest.mark.slow
def test_mixed_covered_and_uncovered_leaves_every_route():
    p = _fill({"emb": jnp.ones((7, 4)), "pos": jnp.ones((3, 4)), "t": jnp.ones(()), "w": jnp.ones((4, 4)),
               "b": jnp.ones(4), "g": jnp.ones(4), "unused": jnp.ones(2)})
    x = jnp.asarray(np.random.default_rng(1).integers(0, 7, (N, 3)))
    owned, uncovered = _check(_mixed, p, x)
    assert owned == {"pos": ("scale_shift", "shift"), "w": ("dense", "weight"), "b": ("dense", "bias"),
                     "g": ("scale_shift", "scale")}
    assert uncovered == {"emb", "t"}  # "unused" is neither: its products are zero
    _compare(_mixed, p, x)


def test_embedding_rows_and_sequence_kernels():
    def f(p, x):
        h = p["emb"][x]  # (N, T, D), rows repeated within an input
        h = jnp.einsum("ntd,dhk->nthk", h, p["k"])  # a DenseGeneral-style kernel (I, H, K)
        return jnp.tanh(h.reshape(*h.shape[:2], -1)) @ p["out"]  # logits per position (N, T, C)

    p = _fill({"emb": jnp.ones((6, 3)), "k": jnp.ones((3, 2, 2)), "out": jnp.ones((4, C))})
    x = jnp.asarray([[0, 1], [2, 2], [5, 0], [1, 1], [3, 4]])
    owned, uncovered = _check(f, p, x)
    assert owned == {"emb": ("embedding", "weight"), "k": ("dense", "weight"), "out": ("dense", "weight")}
    assert not uncovered


def test_capture_shapes_toggle_and_fallback():
    def f(p, x):
        return x @ p["w"]

    p = {"w": jnp.ones((2, C))}
    x = jnp.ones((N, 2))
    assert get("jax", layer_io=False).layer_io is None
    for be in (get("jax"), get("jax", jit=False, batch_probes=False)):
        logits, cap = be.layer_io(f, p, x)
        assert logits.shape == (N, C) and cap.calls and cap.elements == N * C and cap.uncovered == []
        (layer,) = cap(jnp.ones((4, N, C)))
        assert layer.g.shape == (4, N, 1, 1, C) and layer.x.shape == (N, 1, 1, 2) and layer.layout == "io"

    def g(p, x):  # weights multiplied together: no layer, so every leaf is generic
        return x @ (p["w"] @ p["v"])

    _, cap = get("jax").layer_io(g, {"w": jnp.ones((2, 2)), "v": jnp.ones((2, C))}, x)
    assert not cap.calls and cap(jnp.ones((1, N, C))) == []


# --------------------------------------------------------------------------- flax and equinox


def test_flax_linen_cnn():
    nn = pytest.importorskip("flax.linen")

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), strides=(2, 1), padding="SAME")(x)
            x = nn.GroupNorm(num_groups=2)(x)
            x = jax.nn.relu(x)
            x = nn.Conv(4, (2, 2), feature_group_count=2, kernel_dilation=(1, 2), padding="VALID")(x)
            x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
            return nn.Dense(C)(x)

    x = _normal(4, N, 6, 6, 2)
    m = CNN()
    p = _fill(jax.eval_shape(m.init, jax.random.key(0), x))
    owned, uncovered = _check(m.apply, p, x)
    assert not uncovered and len(owned) == 10
    assert owned["params.Conv_1.kernel"] == ("dense", "weight")
    assert owned["params.GroupNorm_0.scale"] == ("scale_shift", "scale")


def test_flax_linen_embed_and_batchnorm_eval():
    nn = pytest.importorskip("flax.linen")

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Embed(9, 4)(x)
            h = nn.BatchNorm(use_running_average=True)(h)
            h = nn.RMSNorm()(h)
            return nn.Dense(C)(h.mean(axis=1))

    x = jnp.asarray([[1, 2, 2], [0, 8, 3], [4, 4, 4], [7, 1, 0], [5, 6, 2]])
    m = M()
    v = _fill(jax.eval_shape(m.init, jax.random.key(0), x))
    f = lambda p, x: m.apply({**v, "params": p}, x)  # noqa: E731 -- the running statistics are constants
    owned, uncovered = _check(f, v["params"], x)
    assert owned["Embed_0.embedding"] == ("embedding", "weight")
    assert owned["BatchNorm_0.scale"] == ("scale_shift", "scale")  # rsqrt(var + eps) folded in
    assert not uncovered and len(owned) == 6


def test_flax_nnx_mlp():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 6, rngs=rngs)
            self.norm = nnx.LayerNorm(6, rngs=rngs)
            self.l2 = nnx.Linear(6, C, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.gelu(self.norm(self.l1(x))))

    graph, state = nnx.split(nnx.eval_shape(lambda: MLP(nnx.Rngs(0))))
    f = lambda s, x: nnx.merge(graph, s)(x)  # noqa: E731
    state = _fill(state)
    x = _normal(5, N, 4)
    owned, uncovered = _check(f, state, x)
    assert len(owned) == 6 and not uncovered


def test_equinox_models():
    eqx = pytest.importorskip("equinox")
    k = [jax.random.key(i) for i in range(4)]
    make = eqx.filter_eval_shape  # shapes only: the initialisers would compile for seconds

    class Net(eqx.Module):
        conv: eqx.nn.Conv2d
        norm: eqx.nn.LayerNorm
        lin: eqx.nn.Linear

        def __call__(self, x):  # one input; vmapped below
            h = jax.nn.tanh(self.conv(x)).reshape(-1)
            return self.lin(self.norm(h))

    net = make(lambda: Net(eqx.nn.Conv2d(2, 4, 3, padding=1, groups=2, key=k[0]), eqx.nn.LayerNorm(4 * 16),
                           eqx.nn.Linear(4 * 16, C, key=k[1])))
    params, static = eqx.partition(net, _abstract)
    f = lambda p, x: jax.vmap(eqx.combine(p, static))(x)  # noqa: E731
    x = _normal(6, N, 2, 4, 4)
    owned, uncovered = _check(f, _fill(params), x)
    assert len(owned) == 6 and not uncovered

    emb = make(lambda: eqx.nn.Embedding(6, C, key=k[3]))
    ep, es = eqx.partition(emb, _abstract)
    g = lambda p, x: jax.vmap(eqx.combine(p, es))(x)  # noqa: E731
    assert _check(g, _fill(ep), jnp.asarray([0, 3, 3, 5, 1]))[0] == {"weight": ("embedding", "weight")}


def test_inputs_mixed_by_batch_statistics_take_the_generic_path():
    def f(p, x):  # batch normalisation with the batch's own statistics, after a dense layer
        h = x @ p["w1"]
        h = (h - h.mean(axis=0)) / jnp.sqrt(h.var(axis=0) + 1e-3)
        return jnp.tanh(h) @ p["w2"]

    p = _fill({"w1": jnp.ones((4, 6)), "w2": jnp.ones((6, C))})
    x = _normal(7, N, 4)
    with pytest.warns(UserWarning, match="mixes the inputs"):
        logits, cap = get("jax").layer_io(f, p, x)
    assert not cap.calls and set(cap.uncovered) == {"w1", "w2"}
    np.testing.assert_allclose(np.asarray(logits), np.asarray(f(p, x)), rtol=1e-12)


def test_attention_projections_under_the_callers_jit():
    def attn(p, x):  # self-attention over the positions of each input
        q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
        a = jax.nn.softmax(jnp.einsum("ntd,nsd->nts", q, k) / 2.0, axis=-1)
        return jnp.einsum("nts,nsd->ntd", a, v).mean(axis=1) @ p["wo"]

    p = _fill({"wq": jnp.ones((4, 4)), "wk": jnp.ones((4, 4)), "wv": jnp.ones((4, 4)), "wo": jnp.ones((4, C))})
    owned, uncovered = _check(jax.jit(attn), p, _normal(8, N, 3, 4))  # one jit equation, inlined
    assert owned == {n: ("dense", "weight") for n in p} and not uncovered
