"""fisher() and RunningFisher on JAX against a jitted training step: first call and steady state.

    python benchmarks/jax_compiled.py [--models mlp,cnn,bert] [--n 64] [--batches 8] [--repeats 5]

For each model (float32, JAX's default configuration), one batch of N inputs:

* ``train step``: ``jax.jit(jax.value_and_grad(cross-entropy))`` on each of B batches, the floor
  a user compares with;
* ``hutchinson``: ``fisher(f, params, batches, probes=1)`` over the B batches, one probe (one
  VJP) per batch, and its ``.value``;
* ``exact``: ``fisher(..., method="exact")`` through the layer I/O (C cotangent columns to every
  layer output, per-example squared sums);
* ``hutchinson K=C`` (not by default: ``--methods``): C probes, C batch VJPs and no per-example
  products, the part of ``exact``'s cost that the C columns' backward passes set;
* ``running``: ``RunningFisher("diag", probes=1).step`` on each batch, the training step with
  its probe;
* ``kfac`` (not by default: ``--methods``): ``fisher(..., structure="kfac", probes=1)`` and its
  ``.factors`` (A and G of every dense or embedding layer, one probe per batch);
* ``... eager``: the same through a copy of the JAX backend without its ``compile`` capability
  (what fisherlib did before: the model's VJP compiled, everything else op by op).

``first call`` is the first call on a new model function (trace, compile and run the B
batches), ``per batch`` the median over repeats divided by B. Each method also runs over 4B
batches: ``steady`` is the marginal cost of a batch, (T(4B) − T(B)) / 3B, what a long pass over
a dataset pays per batch, and ``/ step`` its ratio to the training steps' marginal cost;
``per call`` is what is left, T(B) − B·steady: a call's fixed cost (``fisher()``'s set-up, the
sync that checks the batches, the estimate), paid once however many batches it takes. All timings come from one run, interleaved (benchmarks/_measure.py);
the machine may be shared: quote the ratios and the load printed with them. Models: an MLP
784-256-256-10 (tanh), a CNN (two 3×3 convolutions, 16 and 32 channels, on 28×28×1, a dense
head, 10 classes) and a BERT-tiny in flax.linen (vocabulary 30522, 2 layers, hidden 128, 2
heads, intermediate 512, T = 32 tokens, 2 classes; random weights: nothing is downloaded).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
from _measure import median_times


def mlp_model(jnp, rng, n):
    sizes = [784, 256, 256, 10]
    params = [{"w": jnp.asarray(rng.standard_normal((i, o)) / np.sqrt(i), jnp.float32),
               "b": jnp.zeros(o, jnp.float32)} for i, o in zip(sizes, sizes[1:])]

    def f(p, x):
        for layer in p[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return x @ p[-1]["w"] + p[-1]["b"]

    return f, params, jnp.asarray(rng.standard_normal((n, 784)), jnp.float32), 10


def cnn_model(jnp, rng, n):
    import flax.linen as nn

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
            x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    net = CNN()
    x = jnp.asarray(rng.standard_normal((n, 28, 28, 1)), jnp.float32)
    return net.apply, _init(net, x), x, 10


class _Bert:
    """A BERT-tiny encoder and classification head (post-norm, GELU, [CLS] pooler), flax.linen."""

    def __new__(cls, vocab=30522, hidden=128, layers=2, heads=2, inter=512, T=32, classes=2):
        import flax.linen as nn
        import jax.numpy as jnp

        class Bert(nn.Module):
            @nn.compact
            def __call__(self, ids):
                pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)  # as HF's FlaxBertEmbeddings
                h = nn.Embed(vocab, hidden)(ids) + nn.Embed(T, hidden)(pos)
                h = nn.LayerNorm()(h)
                for _ in range(layers):
                    a = nn.MultiHeadDotProductAttention(num_heads=heads)(h, h)
                    h = nn.LayerNorm()(h + nn.Dense(hidden)(a))
                    m = nn.Dense(hidden)(nn.gelu(nn.Dense(inter)(h)))
                    h = nn.LayerNorm()(h + m)
                pooled = jnp.tanh(nn.Dense(hidden)(h[:, 0]))
                return nn.Dense(classes)(pooled)

        return Bert()


def bert_model(jnp, rng, n, T=32):
    net = _Bert(T=T)
    ids = jnp.asarray(rng.integers(0, 30522, (n, T)), jnp.int32)
    return net.apply, _init(net, ids), ids, 2


def _init(net, x):
    """Random weights without flax's initialisers (compiling those takes seconds)."""
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(net.init, jax.random.key(0), x)
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(max(s.shape[0] if len(s.shape) > 1 else 1, 1)),
                              s.dtype) * (0.5 if len(s.shape) > 1 else 0.1), shapes)


MODELS = {"mlp": mlp_model, "cnn": cnn_model, "bert": bert_model}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,bert")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batches", type=int, default=8, help="batches per fisher() call (B)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="hutchinson,exact,running")
    ap.add_argument("--no-eager", action="store_true", help="skip the op-by-op columns")
    args = ap.parse_args(argv)

    import copy

    import jax
    import jax.numpy as jnp
    import optax

    import fisherlib
    from fisherlib import backends
    from fisherlib.estimators import RunningFisher

    warnings.simplefilter("ignore", fisherlib.KroneckerFallbackWarning)  # K-FAC: BERT's LayerNorms, every call
    methods = args.methods.split(",")
    be = backends.get("jax")
    eager = copy.copy(be)
    eager.compile = None  # without the capability: fisher() and RunningFisher run op by op
    B = args.batches
    rows = []
    for name in args.models.split(","):
        rng = np.random.default_rng(0)
        f, params, x, C = MODELS[name](jnp, rng, args.n)
        y = jnp.asarray(rng.integers(0, C, args.n), jnp.int32)
        xs, xs_long = [x] * B, [x] * (4 * B)

        def block(tree):
            jax.block_until_ready(jax.tree_util.tree_leaves(tree))

        def make(method, f, backend, xs=xs):
            if method == "train step":
                fn = jax.jit(jax.value_and_grad(lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
                    f(p, x), y).mean()))
                return lambda: block([fn(params, x, y) for x in xs])
            if method == "running":
                rf = RunningFisher("diag", probes=1, decay=0.9, stderr=False, backend=backend)
                return lambda: block([rf.step(f, params, x, y) for x in xs])
            if method == "kfac":
                return lambda: block(fisherlib.fisher(f, params, xs, structure="kfac", probes=1, seed=0,
                                                      backend=backend).factors)
            kw = {"hutchinson": {"probes": 1}, "hutchinson K=C": {"probes": C}, "exact": {"method": "exact"}}[method]
            return lambda: block(fisherlib.fisher(f, params, xs, seed=0, backend=backend, **kw).value)

        first, calls = {}, {}
        for method in ["train step"] + methods:
            for label, backend in [("", be)] + ([] if args.no_eager or method == "train step" else [(" eager", eager)]):
                fresh = (lambda p, x, f=f: f(p, x))  # a new function object: nothing compiled for it yet
                run = make(method, fresh, backend)
                t0 = time.perf_counter()
                run()
                first[method + label] = time.perf_counter() - t0
                calls[method + label] = make(method, f, backend)
                calls[method + label + " long"] = make(method, f, backend, xs_long)
        times = median_times(calls, args.repeats, warmup=1)
        rows.append((name, first, times))

    print(f"jax {jax.__version__}, float32 (x64 off), B = {B} and {4 * B} batches of N = {args.n} per call; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'model':6s}{'':18s}{'first call (s)':>15s}{'per batch (ms)':>16s}{'steady (ms)':>13s}"
          f"{'/ step':>8s}{'per call (ms)':>15s}")
    for name, first, times in rows:
        def steady(m):  # the marginal cost of a batch
            return (times[m + " long"] - times[m]) / (3 * B)

        for method in first:
            print(f"{name:6s}{method:18s}{first[method]:15.3f}{1e3 * times[method] / B:16.2f}"
                  f"{1e3 * steady(method):13.2f}{steady(method) / steady('train step'):8.2f}"
                  f"{1e3 * (times[method] - B * steady(method)):15.2f}")


if __name__ == "__main__":
    main()
