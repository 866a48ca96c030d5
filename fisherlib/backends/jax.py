"""The JAX adapter: a pure ``f(params, x)`` over any pytree (plain dicts, flax, equinox, haiku).

``linearize`` is ``jax.vjp`` of ``p -> f(p, x)``, compiled with ``jax.jit``; the pullback it
returns is a pytree of residuals, so ``vjp(ct)`` reuses the forward pass instead of repeating
it, and a stack of K cotangents is one ``jax.vmap`` of the pullback. Everything traces, so the
adapter also works inside the caller's own ``jax.jit``. Dtypes follow the parameters and inputs:
float64 when ``jax_enable_x64`` is on.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._common import check_ct, check_dist, check_per_example_ct, check_seed, check_shape, logits_of

Tree = Any

__all__ = ["JaxBackend"]


def _fwd(model, params, inputs):
    out, pullback = jax.vjp(lambda p: model(p, inputs), params)
    return jax.lax.stop_gradient(out), pullback  # detached, inside jit: no extra dispatch


def _pull(pullback, ct):
    return pullback(ct)[0]


# Stacks of at most this many rows are pulled back row by row on a CPU (inside the same compiled
# call, sharing the forward): XLA's CPU runs the batched products of a vmap over a few rows
# slower than the plain ones (RunningFisher's loss row + one probe: 1.55 -> 1.24x a training
# step on the benchmarks' CNN, 3.1 -> 2.3x on the MLP), and a vmap over one row transposes
# every weight gradient. GPUs keep the vmap.
_ROWS_UNBATCHED = 4


def _pull_k(pullback, cts):
    K = cts.shape[0]
    if K == 1 or (K <= _ROWS_UNBATCHED and jax.default_backend() == "cpu"):
        rows = [pullback(cts[k])[0] for k in range(K)]
        return jax.tree_util.tree_map(lambda *r: jnp.stack(r), *rows)
    return jax.vmap(pullback)(cts)[0]


def _per_example(model, params, inputs, cts, chunk_size):
    def one(x_n, ct_n):  # one input as a batch of one; all K cotangents through one pullback
        x1 = jax.tree_util.tree_map(lambda a: a[None], x_n)
        _, pullback = jax.vjp(lambda p: model(p, x1), params)
        return jax.vmap(pullback)(ct_n[:, None])[0]

    if chunk_size is None:
        return jax.vmap(one, in_axes=(0, 1), out_axes=1)(inputs, cts)
    rows = jax.lax.map(lambda a: one(*a), (inputs, jnp.moveaxis(cts, 1, 0)), batch_size=chunk_size)
    return jax.tree_util.tree_map(lambda r: jnp.moveaxis(r, 0, 1), rows)


_GOLDEN = 0x9E3779B9


def _mix(h: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons): a bijection of uint32 with near-ideal avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _seed_words(seed: Any) -> list | np.ndarray:
    """The seed as uint32 words: (high, low) of an int below 2⁶⁴ or of a traced integer, the key
    data of a typed PRNG key (threefry's key(s) holds (high, low) of s)."""
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        data = jnp.ravel(jax.random.key_data(seed)).astype(jnp.uint32)
        return [data[i] for i in range(data.shape[0])]  # (traced or not: stacked again by _draw)
    if isinstance(seed, jax.Array):  # a traced (or concrete) integer scalar
        if not jnp.issubdtype(seed.dtype, jnp.integer) or seed.ndim != 0:
            raise TypeError(f"seed: expected an integer scalar, got {seed.dtype}{list(seed.shape)}")
        return [jnp.uint32(0), seed.astype(jnp.uint32)]
    s = check_seed(seed)
    if s >= 1 << 64:
        raise ValueError(f"seed: expected an int below 2**64, got {s}")
    return np.asarray([s >> 32, s & 0xFFFFFFFF], dtype=np.uint32)  # host words: no device op


def _bits(words: list, shape: tuple[int, ...], stream: int) -> jax.Array:
    """uint32 bits for every entry of ``shape``: row r (first axis) maps position i to
    mix(mix(i ⊕ k_r) + k'_r), a bijection of i keyed by the seed words, the stream and r."""
    key = jnp.uint32(stream * 2 + 1)
    for w in words:
        key = _mix(key ^ (w + jnp.uint32(_GOLDEN)))
    lead, rest = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    row = _mix(key ^ (jax.lax.broadcasted_iota(jnp.uint32, (lead, 1), 0) + jnp.uint32(_GOLDEN)))
    row2 = _mix(row ^ jnp.uint32(0x5BD1E995))
    h = _mix(_mix(jax.lax.broadcasted_iota(jnp.uint32, (1, rest), 1) ^ row) + row2)
    return h.reshape(shape)


def _uniform(words: list, shape: tuple[int, ...], stream: int, dtype) -> jax.Array:
    """Uniforms in [0, 1): 24 random bits (53 in float64, from streams ``stream`` and ``stream + 1``)."""
    a = _bits(words, shape, stream)
    if dtype == jnp.float64:
        b = _bits(words, shape, stream + 1)
        return ((a >> 6).astype(jnp.float64) * 2.0 ** 27 + (b >> 5).astype(jnp.float64)) * 2.0 ** -53
    u = (a >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)
    if dtype == jnp.float32:
        return u
    u = u.astype(dtype)  # float16 / bfloat16: rounding may reach 1
    return jnp.minimum(u, jnp.nextafter(jnp.asarray(1, dtype), jnp.asarray(0, dtype)))


def _draw_impl(words: jax.Array, shape: tuple[int, ...], dist: str, dtype) -> jax.Array:
    words = [words[i] for i in range(words.shape[0])]
    if math.prod(shape[1:]) >= 1 << 32:
        return _threefry(words, shape, dist, dtype)
    if dist == "rademacher":
        return (1 - 2 * (_bits(words, shape, 0) >> 31).astype(jnp.int32)).astype(dtype)
    if dist == "uniform":
        return _uniform(words, shape, 0, dtype)
    # Box–Muller: √(−2 log u₁) cos(2π u₂), u₁ in (0, 1]
    wide = jnp.float64 if dtype == jnp.float64 else jnp.float32
    u1, u2 = 1 - _uniform(words, shape, 2, wide), _uniform(words, shape, 4, wide)
    return (jnp.sqrt(-2 * jnp.log(u1)) * jnp.cos(2 * jnp.pi * u2)).astype(dtype)


_draw = jax.jit(_draw_impl, static_argnums=(1, 2, 3))  # one dispatch when called eagerly


def _threefry(words: list, shape: tuple[int, ...], dist: str, dtype) -> jax.Array:
    """``jax.random``'s draw, for rows too long for the 32-bit positions of :func:`_bits`."""
    key = jax.random.wrap_key_data(jnp.stack(words[-2:]).astype(jnp.uint32))
    if dist == "rademacher":
        return jax.random.rademacher(key, shape, dtype=dtype)
    if dist == "gaussian":
        return jax.random.normal(key, shape, dtype=dtype)
    return jax.random.uniform(key, shape, dtype=dtype)


def _same_method(a, b) -> bool:
    return (getattr(a, "__func__", None) is not None and getattr(a, "__func__", None) is getattr(b, "__func__", None)
            and getattr(a, "__self__", None) is getattr(b, "__self__", None))


_pull_jit = jax.jit(_pull)
_pull_k_jit = jax.jit(_pull_k)


class JaxBackend:
    """JAX models: a pure function ``f(params, x)`` of a pytree ``params``.

    Parameters
    ----------
    jit : bool
        Compile the forward pass (with its pullback) and the products with ``jax.jit``, cached
        per model function: pass the same function object each time. Turn off for models that
        do not trace (Python control flow on values).
    chunk_size : int, optional
        Default number of inputs :meth:`per_example_vjp` processes at once (``jax.lax.map``
        with ``batch_size``); ``None`` vmaps over all of them.
    batch_probes : bool
        Pull a stack of K cotangents back with one ``vmap`` of the pullback (default). ``False``
        applies the pullback K times and stacks the results: on a CPU, convolution-heavy models
        can be faster that way (``docs/benchmarks.md``); the results are the same.
    layer_io : bool
        Offer :meth:`layer_io` (default), so that per-example methods work from each layer's
        input and output cotangents, found in the jaxpr (``docs/per-example.md``); ``False``
        leaves the generic per-example VJP (a ``vmap`` of whole-model VJPs) for every leaf.

    Notes
    -----
    For flax, pass ``lambda p, x: module.apply(p, x)`` (or ``module.apply``) and the variables;
    for equinox, split the module with ``params, static = eqx.partition(model, eqx.is_array)``
    and pass ``lambda p, x: eqx.combine(p, static)(x)``. Leaves are named by
    ``jax.tree_util.keystr`` with ``"."`` separators (``"params.Dense_0.kernel"``).
    """

    name = "jax"
    _CACHE_SIZE = 32
    output: Callable | None = None  # where the logits are in the model's output (with_output)

    def __init__(self, *, jit: bool = True, chunk_size: int | None = None, batch_probes: bool = True,
                 layer_io: bool = True):
        self.jit = jit
        self.chunk_size = chunk_size
        self.batch_probes = batch_probes
        if not layer_io:  # the capability is absent: the estimators take the generic per-example VJP
            self.layer_io = None
        self._cache: OrderedDict[tuple[int, int, int], tuple[Any, Callable, Callable, Any]] = OrderedDict()
        self._steps: OrderedDict[Any, Callable] = OrderedDict()  # compile(fn, key=...)
        self._outputs: dict[Any, JaxBackend] = {}  # with_output(fn) -> its copy

    def with_output(self, output: Callable[[Any], jax.Array]) -> JaxBackend:
        """A copy of this backend (sharing its compiled cache) that takes the logits as
        ``output(model_output)``; pass the same function each time to reuse compilations (the
        same function gives the same copy)."""
        new = self._outputs.get(output)
        if new is None:
            new = self._outputs[output] = copy.copy(self)
            new.output = output
            if len(self._outputs) > self._CACHE_SIZE:
                self._outputs.pop(next(iter(self._outputs)))
        return new

    def _compiled(self, model: Callable) -> tuple[Callable, Callable]:
        # Keyed by identity, holding the model so that the id cannot be reused while cached; a
        # bound method (flax's module.apply) is a new object per access, so key on its parts.
        output = self.output
        key = (id(getattr(model, "__self__", None)), id(getattr(model, "__func__", model)), id(output))
        hit = self._cache.get(key)
        if hit is not None and (hit[0] is model or _same_method(hit[0], model)) and hit[3] is output:
            self._cache.move_to_end(key)
            return hit[1], hit[2]

        def f(params, inputs):  # the logits inside the traced function: any output object works
            return logits_of(model(params, inputs), output)

        def fwd(params, inputs):
            return _fwd(f, params, inputs)

        def per_example(params, inputs, cts, chunk_size):
            return _per_example(f, params, inputs, cts, chunk_size)

        if self.jit:
            fwd, per_example = jax.jit(fwd), jax.jit(per_example, static_argnums=3)
        self._cache[key] = (model, fwd, per_example, output)
        if len(self._cache) > self._CACHE_SIZE:
            self._cache.popitem(last=False)
        return fwd, per_example

    def linearize(self, model: Callable, params: Tree, inputs: Any) -> tuple[jax.Array, Callable]:
        """Run ``model(params, inputs)`` once: (logits, ``vjp``).

        ``vjp(ct)`` with ``ct`` shaped like the logits returns a pytree shaped like ``params``;
        with ``ct`` (K, *logits.shape) it returns leaves with a leading K, from one ``vmap`` of
        the pullback.
        """
        if not callable(model):
            raise TypeError(f"model: expected a function f(params, x), got {type(model).__name__}")
        fwd, _ = self._compiled(model)
        out, pullback = fwd(params, inputs)
        shape = tuple(out.shape)
        pull, pull_k = (_pull_jit, _pull_k_jit) if self.jit else (_pull, _pull_k)

        def vjp(ct: jax.Array) -> Tree:
            if not check_ct(ct, shape):
                return pull(pullback, ct)
            if self.batch_probes:
                return pull_k(pullback, ct)
            rows = [pull(pullback, ct[k]) for k in range(ct.shape[0])]
            return jax.tree_util.tree_map(lambda *r: jnp.stack(r), *rows)

        return out, vjp

    def per_example_vjp(self, model: Callable, params: Tree, inputs: Any, cotangents: jax.Array, *,
                        chunk_size: int | None = None) -> Tree:
        """J_nᵀ ct[k, n] for every probe k and input n: leaves (K, N, *leaf.shape).

        ``jax.vmap`` over the inputs (each a batch of one) of the pullback ``vmap``-ed over K;
        with ``chunk_size`` (default: the backend's), ``jax.lax.map`` in batches of that many.
        """
        _, per_example = self._compiled(model)
        n = jax.tree_util.tree_leaves(inputs)[0].shape[0]
        check_per_example_ct(cotangents, n)
        return per_example(params, inputs, cotangents, chunk_size if chunk_size is not None else self.chunk_size)

    def layer_io(self, model: Callable, params: Tree, inputs: Any):
        """One forward: (logits, ``capture``), for layer-wise per-example products.

        The layers are found in the model's jaxpr (:mod:`fisherlib.backends.jax_layers`).
        ``capture(ct)`` pulls a stack ``ct`` (V, *logits.shape) back to every recognised layer's
        output in one ``vmap`` of one pullback and returns :class:`fisherlib.core.layers.Layer`
        records; ``capture.uncovered`` names the leaves no recognised layer owns.
        """
        from . import jax_layers

        return jax_layers.capture(self, model, params, inputs)

    def probes(self, seed: Any, shape: tuple[int, ...], dist: str, like: jax.Array) -> jax.Array:
        """Rademacher, Gaussian or uniform values from a counter-based hash of (seed, index).

        ``seed`` is an int, a traced integer scalar (under ``jit``) or a typed PRNG key (its key
        data are the seed: ``jax.random.key(s)`` draws what ``s`` draws). The result has
        ``like``'s dtype and, for a concrete single-device ``like``, its device.

        Each row along the first axis is a keyed bijection of the 32-bit position in the row
        (two rounds of the lowbias32 mixer, keyed by the seed and the row): no two entries of
        a row share their bits, values do not depend on ``jit``, ``vmap`` or the device, and
        the whole draw is a few integer operations per entry, which XLA compiles in
        milliseconds where ``jax.random``'s threefry took seconds (most of a first call's time
        on a small model). Uniforms take the top 24 bits (53 from two draws in float64);
        Gaussians come from two uniforms by Box–Muller. Rows of 2³² entries or more fall back
        to ``jax.random`` (threefry) with ``jax.random.key(seed)``.
        """
        shape, dist = check_shape(shape), check_dist(dist)
        if not jnp.issubdtype(like.dtype, jnp.floating):
            raise TypeError(f"like: expected a floating dtype, got {like.dtype}")
        words = _seed_words(seed)
        out = _draw(words if isinstance(words, np.ndarray) else jnp.stack(words), shape, dist, jnp.dtype(like.dtype))
        sharding = getattr(like, "sharding", None) if not isinstance(like, jax.core.Tracer) else None
        if isinstance(sharding, jax.sharding.SingleDeviceSharding):
            out = jax.device_put(out, sharding)
        return out

    def leaves(self, tree: Tree) -> list[tuple[str, jax.Array]]:
        """Named leaves in ``jax.tree_util`` order, keys joined with ``"."``."""
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        return [(jax.tree_util.keystr(path, simple=True, separator="."), leaf) for path, leaf in flat]

    def unflatten(self, tree: Tree, leaves: list[jax.Array]) -> Tree:
        """A pytree with ``tree``'s structure holding ``leaves``."""
        treedef = jax.tree_util.tree_structure(tree)
        leaves = list(leaves)
        if len(leaves) != treedef.num_leaves:
            raise ValueError(f"leaves: the tree has {treedef.num_leaves} leaves, got {len(leaves)}")
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def __repr__(self) -> str:
        return f"<fisherlib backend {self.name!r}>"

    # -- optional capability: Jacobian-vector products (fisherlib.spectral) --------------------

    def jvp(self, model: Callable, params: Tree, inputs: Any, tangents: Tree) -> jax.Array:
        """J t: the logits' change along ``tangents`` (a pytree like ``params``), by ``jax.jvp``.

        With a leading axis K on every leaf of ``tangents`` the result is (K, *logits.shape):
        ``jax.linearize`` once, then one ``vmap`` of the linear map. Compiled with ``jax.jit``
        (cached per model function) unless the backend was made with ``jit=False``.
        """
        if not callable(model):
            raise TypeError(f"model: expected a function f(params, x), got {type(model).__name__}")
        shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(params)]
        got = [tuple(x.shape) for x in jax.tree_util.tree_leaves(tangents)]
        if jax.tree_util.tree_structure(tangents) != jax.tree_util.tree_structure(params):
            raise ValueError("tangents: expected a pytree with the structure of params")
        if got == shapes:
            batched = False
        elif all(len(g) == len(s) + 1 and g[1:] == s for g, s in zip(got, shapes)) and len({g[0] for g in got}) == 1:
            batched = True
        else:
            raise ValueError(f"tangents: expected leaves shaped {shapes}, or all with one leading K, got {got}")
        return self._jvp_fn(model, batched)(params, inputs, tangents)

    def _jvp_fn(self, model: Callable, batched: bool) -> Callable:
        cache = self.__dict__.setdefault("_jvp_cache", OrderedDict())
        output = getattr(self, "output", None)  # where the logits are in the model's output
        key = (id(getattr(model, "__self__", None)), id(getattr(model, "__func__", model)), batched, id(output))
        hit = cache.get(key)
        if hit is not None and (hit[0] is model or _same_method(hit[0], model)) and hit[2] is output:
            return hit[1]

        def f(p, inputs):
            return logits_of(model(p, inputs), output)

        def one(params, inputs, t):
            return jax.jvp(lambda p: f(p, inputs), (params,), (t,))[1]

        def many(params, inputs, ts):
            if not self.batch_probes:
                k = jax.tree_util.tree_leaves(ts)[0].shape[0]
                return jnp.stack([one(params, inputs, jax.tree_util.tree_map(lambda a: a[i], ts)) for i in range(k)])
            _, lin = jax.linearize(lambda p: f(p, inputs), params)
            return jax.vmap(lin)(ts)

        fn = many if batched else one
        if self.jit:
            fn = jax.jit(fn)
        cache[key] = (model, fn, output)
        if len(cache) > self._CACHE_SIZE:
            cache.popitem(last=False)
        return fn

    # -- optional capability: training-loop reuse (fisherlib.estimators.RunningFisher) ----------

    def loss_linearize(self, model: Callable, params: Tree, inputs: Any, loss: Callable,
                       targets: Any) -> tuple[jax.Array, jax.Array, jax.Array, Callable]:
        """The training step's forward: (logits, loss value, ∂loss/∂logits, ``vjp``).

        ``loss(logits, targets)`` returns a scalar; its logit gradient is
        ``jax.value_and_grad`` of the loss alone (compiled, cached per loss function). The
        ``vjp`` is :meth:`linearize`'s, so that the loss cotangent and the probes' go back
        through the network in one ``vmap`` of the pullback.
        """
        logits, vjp = self.linearize(model, params, inputs)
        cache = self.__dict__.setdefault("_loss_cache", OrderedDict())
        hit = cache.get(id(loss))
        if hit is None or hit[0] is not loss:
            fn = jax.value_and_grad(loss)
            hit = cache[id(loss)] = (loss, jax.jit(fn) if self.jit else fn)
            if len(cache) > self._CACHE_SIZE:
                cache.popitem(last=False)
        value, ct = hit[1](logits, targets)
        return logits, value, ct, vjp

    def compile(self, fn: Callable, *, key: Any = None) -> Callable:
        """``jax.jit(fn)`` (``fn`` itself with ``jit=False``): lets framework-free code such as
        :func:`~fisherlib.fisher` and :class:`~fisherlib.estimators.RunningFisher` compile a
        whole step (forward, cotangents, pullback, reduction) once instead of dispatching (and
        compiling) it op by op.

        ``key`` (hashable: the model function, the options) caches the compiled function: a
        later call with an equal key (and this backend's ``output``) returns the first one's,
        whose compilations JAX keeps per shape and dtype; ``fn`` is then not used.
        """
        if key is None:
            return jax.jit(fn) if self.jit else fn
        key = (key, self.output, self.jit)
        hit = self._steps.get(key)
        if hit is None:
            hit = self._steps[key] = jax.jit(fn) if self.jit else fn
            if len(self._steps) > self._CACHE_SIZE:
                self._steps.popitem(last=False)
        else:
            self._steps.move_to_end(key)
        return hit


# -- classes that carry state arrays (fisherlib.backends._registry.state_class) ---------------------

_STATE_REGISTERED: set[type] = set()


def register_state_class(cls: type) -> None:
    """Make ``cls`` (e.g. :class:`~fisherlib.estimators.RunningFisher`) a pytree: its arrays are
    the children, everything else static, so that an instance passes in and out of ``jax.jit``."""
    if cls in _STATE_REGISTERED:
        return
    jax.tree_util.register_pytree_node(cls, lambda obj: obj._tree_flatten(), cls._tree_unflatten)
    _STATE_REGISTERED.add(cls)


def _register_recorded() -> None:
    from ._registry import STATE_CLASSES

    for cls in list(STATE_CLASSES):
        register_state_class(cls)


_register_recorded()
