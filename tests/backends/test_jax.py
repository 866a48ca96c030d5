"""The JAX adapter beyond the conformance suite: jit, compile caching, x64, chunks, keys."""

from __future__ import annotations

import numpy as np
import pytest
from backend_cases import HAS

from fisherlib.backends import get, testing
from fisherlib.models import MLP

pytestmark = pytest.mark.skipif(not HAS["jax"], reason="jax is not installed")


@pytest.fixture
def jax():
    import jax

    return jax


def _setup(jnp, dtype=None):
    model = MLP([4, 6, 3], "tanh")
    params = model.init(0, xp=jnp, dtype=dtype)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), dtype=dtype)
    return model, params, x


def test_works_inside_the_callers_jit(jax):
    import jax.numpy as jnp

    be = get("jax")
    model, params, x = _setup(jnp, jnp.float64)
    f = model.forward

    def step(p, x, seed):
        z, vjp = be.linearize(f, p, x)
        xi = be.probes(seed, (3, *z.shape), "rademacher", z)
        return vjp(xi), be.per_example_vjp(f, p, x, xi)

    eager = step(params, x, 5)
    jitted = jax.jit(step)(params, x, 5)  # the seed is traced here
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_forward_is_compiled_once_per_model_and_shape(jax):
    import jax.numpy as jnp

    be = get("jax", jit=True)
    traces = []
    model, params, x = _setup(jnp, jnp.float64)

    def f(p, x):
        traces.append(1)
        return model.forward(p, x)

    for _ in range(3):
        z, vjp = be.linearize(f, params, x)
        vjp(jnp.ones((2, *z.shape)))
    assert len(traces) == 1


def test_bound_methods_hit_the_cache(jax):
    import jax.numpy as jnp

    class Net:
        traces = 0

        def apply(self, p, x):
            Net.traces += 1
            return x @ p["w"]

    net, be = Net(), get("jax", jit=True)
    for _ in range(3):
        be.linearize(net.apply, {"w": jnp.ones((2, 2))}, jnp.ones((3, 2)))  # a new bound method each time
    assert Net.traces == 1


def test_without_jit_same_results(jax):
    import jax.numpy as jnp

    model, params, x = _setup(jnp, jnp.float64)
    case = testing.Case(model.forward, params, x, np.asarray, jnp.asarray)
    testing.check_vjp_batched(get("jax", jit=False), case)
    testing.check_per_example(get("jax", jit=False), case)
    a = get("jax", jit=False).linearize(model.forward, params, x)[1](jnp.ones((5, 3)))
    b = get("jax").linearize(model.forward, params, x)[1](jnp.ones((5, 3)))
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-12)


def test_float32_without_x64(jax):
    import jax.numpy as jnp

    with jax.enable_x64(False):
        model, params, x = _setup(jnp)
        be = get("jax")
        z, vjp = be.linearize(model.forward, params, x)
        g = vjp(be.probes(0, (2, *z.shape), "gaussian", z))
        assert z.dtype == jnp.float32 and all(a.dtype == jnp.float32 for _, a in be.leaves(g))


def test_per_example_chunks_agree(jax):
    import jax.numpy as jnp

    model, params, x = _setup(jnp, jnp.float64)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 3)))
    whole = get("jax").per_example_vjp(model.forward, params, x, ct)
    for rows in (get("jax").per_example_vjp(model.forward, params, x, ct, chunk_size=2),
                 get("jax", chunk_size=3).per_example_vjp(model.forward, params, x, ct)):
        for k in whole:
            np.testing.assert_allclose(np.asarray(rows[k]), np.asarray(whole[k]), rtol=1e-12, atol=1e-14)


def test_probes_accept_keys_and_are_reproducible(jax):
    import jax.numpy as jnp

    be = get("jax")
    like = jnp.zeros(2, dtype=jnp.float32)
    key = jax.random.key(11)
    assert jnp.array_equal(be.probes(key, (3,), "gaussian", like), be.probes(11, (3,), "gaussian", like))
    assert be.probes(0, (2, 2), "uniform", jnp.zeros(1, dtype=jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="like: expected a floating dtype"):
        be.probes(0, (2,), "gaussian", jnp.zeros(2, dtype=jnp.int32))


def test_leaf_names_of_flax_and_equinox_trees(jax):
    import jax.numpy as jnp

    be = get("jax")
    tree = {"params": {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}}
    assert [n for n, _ in be.leaves(tree)] == ["params.Dense_0.bias", "params.Dense_0.kernel"]
    back = be.unflatten(tree, [a + 1 for _, a in be.leaves(tree)])
    assert float(back["params"]["Dense_0"]["kernel"][0, 0]) == 2.0
    if HAS["equinox"]:
        import equinox as eqx

        mlp = eqx.nn.MLP(2, 2, 3, 1, key=jax.random.key(0))
        p, _ = eqx.partition(mlp, eqx.is_array)
        assert [n for n, _ in be.leaves(p)][:2] == ["layers.0.weight", "layers.0.bias"]
    with pytest.raises(ValueError, match="leaves: the tree has 2 leaves"):
        be.unflatten(tree, [jnp.ones(1)])


def test_bad_cotangent_shape(jax):
    import jax.numpy as jnp

    model, params, x = _setup(jnp, jnp.float64)
    z, vjp = get("jax").linearize(model.forward, params, x)
    with pytest.raises(ValueError, match=r"ct: expected the logits' shape \(5, 3\)"):
        vjp(jnp.ones((5, 4)))
    with pytest.raises(TypeError, match="model: expected a function"):
        get("jax").linearize(3, params, x)


def test_looping_over_probes_gives_the_batched_result(jax):
    import jax.numpy as jnp

    model, params, x = _setup(jnp, jnp.float64)
    loop = get("jax", batch_probes=False)
    testing.check_vjp_batched(loop, testing.Case(model.forward, params, x, np.asarray, jnp.asarray))
    ct = jnp.asarray(np.random.default_rng(2).standard_normal((4, 5, 3)))
    a = loop.linearize(model.forward, params, x)[1](ct)
    b = get("jax").linearize(model.forward, params, x)[1](ct)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-12, atol=1e-14)
