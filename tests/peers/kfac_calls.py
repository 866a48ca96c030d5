"""kfac-jax's diagonal of the GGN / Fisher, and the small JAX MLP it is checked on.

Kept apart from :mod:`tests.peers.peer_calls` so that it needs JAX only, not torch.
"""

from __future__ import annotations

import importlib.util


def available() -> bool:
    return importlib.util.find_spec("kfac_jax") is not None


def jax_mlp_init(sizes=(6, 8, 5), *, seed=0, dtype=None):
    """Parameters of a JAX MLP ``[{"w": (a, b), "b": (b,)}, ...]`` (kfac-jax's dense pattern)."""
    import jax
    import numpy as np

    key = jax.random.key(seed)
    out = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        key, k1, k2 = jax.random.split(key, 3)
        out.append({"w": jax.random.normal(k1, (a, b), dtype) / np.sqrt(a),
                    "b": 0.1 * jax.random.normal(k2, (b,), dtype)})
    return out


def jax_mlp(params, x):
    import jax.numpy as jnp

    for i, layer in enumerate(params):
        if i:
            x = jnp.tanh(x)
        x = x @ layer["w"] + layer["b"]
    return x


def _kfac_loss(model, likelihood):
    import jax
    import jax.numpy as jnp
    import kfac_jax

    def loss(params, batch):
        x, y = batch
        z = model(params, x)
        if likelihood == "softmax":
            kfac_jax.register_softmax_cross_entropy_loss(z, y)
            return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))
        kfac_jax.register_sigmoid_cross_entropy_loss(z, y)
        return jnp.sum(jnp.logaddexp(0.0, z) - y * z)

    return loss


def kfac_jax_diag(params, x, y, *, model=jax_mlp, likelihood="softmax", mode="ggn_exact", num_samples=1, seed=0):
    """kfac-jax's diagonal: ``BlockDiagonalCurvature`` with ``DenseDiagonal`` blocks.

    ``mode``: "ggn_exact" / "fisher_exact" (one pass per class through the loss's factor
    one-hot columns) or "ggn_curvature_prop" / "fisher_curvature_prop" (Rademacher probes
    through the factor, ``num_samples`` of them). kfac-jax divides its statistics by
    ``batch_size``; this returns the sum (times N), flattened in ``jax.tree_util`` leaf order
    (per layer "b" before "w": dict keys are sorted).
    Only dense layers are covered here (the agreement test's MLP).
    """
    import jax
    import kfac_jax
    import numpy as np

    est = kfac_jax.BlockDiagonalCurvature(func=_kfac_loss(model, likelihood), default_estimation_mode=mode,
                                          layer_tag_to_block_ctor={"dense": kfac_jax.DenseDiagonal},
                                          num_samples=num_samples)
    n = x.shape[0]
    args = (params, (x, y))
    state = est.init(jax.random.key(seed), args, exact_powers_to_cache=None, approx_powers_to_cache=None,
                     cache_eigenvalues=False)
    state = est.update_curvature_matrix_estimate(state, ema_old=0.0, ema_new=1.0, identity_weight=0.0,
                                                 batch_size=n, rng=jax.random.key(seed + 1), func_args=args,
                                                 estimation_mode=mode)
    return np.diag(np.asarray(est.to_dense_matrix(state))) * n


def kfac_jax_broken() -> str | None:
    """Why kfac-jax cannot run with the installed JAX (None when it can)."""
    if not available():
        return "kfac-jax is not installed (pip install 'fisherlib[bench]')"
    import jax
    import jax.numpy as jnp

    try:
        kfac_jax_diag(jax_mlp_init((2, 2), dtype=jnp.float32), jnp.ones((1, 2)), jnp.zeros((1,), jnp.int32))
    except ValueError as e:  # jax >= 0.10 changed Primitive.get_bind_params, which kfac-jax 0.0.8 unpacks
        if "unpack" not in str(e):
            raise
        import kfac_jax

        return (f"kfac-jax {getattr(kfac_jax, '__version__', '?')} does not run on jax {jax.__version__}: "
                f"its tracer fails with ValueError({e})")
    return None
