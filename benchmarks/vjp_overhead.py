"""What fisherlib's adapters cost against a plain training step, in torch and JAX.

For an MLP, a small CNN and a 2-layer transformer encoder, times (medians of repeats):

- ``train``: one training step without the optimizer update: forward, cross-entropy, backward;
- ``probe``: ``backend.linearize`` + one ``vjp`` (one Hutchinson probe per batch);
- ``loop8``: ``linearize`` + 8 separate ``vjp`` calls;
- ``batch8``: ``linearize`` + one ``vjp`` of a stack of K = 8 cotangents.

It prints ``probe / train`` (aim: <= 1.05) and ``batch8 / loop8`` (aim: <= 0.6), all measured in
one run, and the same ratio for the VJPs alone (without the shared ``linearize``).

    python benchmarks/vjp_overhead.py            # full sizes
    python benchmarks/vjp_overhead.py --quick    # small sizes, few repeats (a smoke test)
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np

from _measure import median_times  # benchmarks/ is the script's directory

K = 8


def sizes(quick: bool) -> dict:
    if quick:
        return dict(n=32, d_in=64, hidden=128, img=16, ch=8, seq=16, d_model=32, heads=2, classes=10)
    return dict(n=128, d_in=784, hidden=512, img=32, ch=32, seq=64, d_model=128, heads=4, classes=10)


# -- torch ------------------------------------------------------------------------------------


def torch_models(s):
    import torch
    from torch import nn

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, s["ch"], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(s["ch"], 2 * s["ch"], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(2 * s["ch"] * (s["img"] // 4) ** 2, s["classes"]),
            )

        def forward(self, x):
            return self.body(x)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(s["d_in"] // 8, s["d_model"])
            layer = nn.TransformerEncoderLayer(s["d_model"], s["heads"], 2 * s["d_model"], dropout=0.0,
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(s["d_model"], s["classes"])

        def forward(self, x):
            return self.head(self.encoder(self.embed(x)).mean(dim=1))

    torch.manual_seed(0)
    n = s["n"]
    mlp = nn.Sequential(nn.Linear(s["d_in"], s["hidden"]), nn.Tanh(), nn.Linear(s["hidden"], s["hidden"]),
                        nn.Tanh(), nn.Linear(s["hidden"], s["classes"]))
    return {
        "MLP": (mlp, torch.randn(n, s["d_in"])),
        "CNN": (CNN(), torch.randn(n, 3, s["img"], s["img"])),
        "Transformer": (Encoder(), torch.randn(n // 4, s["seq"], s["d_in"] // 8)),
    }


def bench_torch(s, repeats):
    import torch
    import torch.nn.functional as F

    from fisherlib import backends

    be = backends.get("torch", batch_probes=True)  # "batch8" is one is_grads_batched call, on any device
    rows = []
    for name, (model, x) in torch_models(s).items():
        model.eval()  # no dropout; the same graph in every variant
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            z0 = model(x)
        y = torch.randint(0, s["classes"], (z0.shape[0],))
        ct = torch.randn_like(z0)
        cts = torch.randn(K, *z0.shape)

        def train():
            loss = F.cross_entropy(model(x), y, reduction="sum")
            return torch.autograd.grad(loss, params)

        def probe():
            _, vjp = be.linearize(model, None, x)
            return vjp(ct)

        def loop8():
            _, vjp = be.linearize(model, None, x)
            return [vjp(cts[k]) for k in range(K)]

        def batch8():
            _, vjp = be.linearize(model, None, x)
            return vjp(cts)

        _, vjp = be.linearize(model, None, x)
        t = median_times({
            "train": train, "probe": probe, "loop8": loop8, "batch8": batch8,
            "vjp_loop8": lambda: [vjp(cts[k]) for k in range(K)], "vjp_batch8": lambda: vjp(cts),
        }, repeats, warmup=2)
        rows.append(("torch", name, sum(p.numel() for p in params), tuple(x.shape), t))
    return rows


# -- jax --------------------------------------------------------------------------------------


def jax_models(s):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)

    def dense(d_in, d_out):
        return {"w": jnp.asarray(rng.uniform(-1, 1, (d_in, d_out)) / np.sqrt(d_in), jnp.float32),
                "b": jnp.zeros(d_out, jnp.float32)}

    def conv(c_in, c_out):
        return {"w": jnp.asarray(rng.uniform(-1, 1, (c_out, c_in, 3, 3)) / np.sqrt(9 * c_in), jnp.float32),
                "b": jnp.zeros(c_out, jnp.float32)}

    def mlp_f(p, x):
        h = jnp.tanh(x @ p[0]["w"] + p[0]["b"])
        h = jnp.tanh(h @ p[1]["w"] + p[1]["b"])
        return h @ p[2]["w"] + p[2]["b"]

    def conv2d(p, x):
        y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return y + p["b"][None, :, None, None]

    def pool(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    def cnn_f(p, x):
        h = pool(jax.nn.relu(conv2d(p["c1"], x)))
        h = pool(jax.nn.relu(conv2d(p["c2"], h)))
        h = h.reshape(h.shape[0], -1)
        return h @ p["out"]["w"] + p["out"]["b"]

    d, heads = s["d_model"], s["heads"]

    def layer_norm(p, h):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / jnp.sqrt(var + 1e-5) * p["g"] + p["b"]

    def block(p, h):  # post-norm, as torch's TransformerEncoderLayer
        b, t, _ = h.shape
        qkv = h @ p["qkv"]["w"] + p["qkv"]["b"]
        q, k, v = jnp.split(qkv.reshape(b, t, 3, heads, d // heads), 3, axis=2)
        q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))
        att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads), axis=-1)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        h = layer_norm(p["ln1"], h + o @ p["proj"]["w"] + p["proj"]["b"])
        f = jax.nn.relu(h @ p["ff1"]["w"] + p["ff1"]["b"]) @ p["ff2"]["w"] + p["ff2"]["b"]
        return layer_norm(p["ln2"], h + f)

    def enc_f(p, x):
        h = x @ p["embed"]["w"] + p["embed"]["b"]
        for blk in p["blocks"]:
            h = block(blk, h)
        return h.mean(axis=1) @ p["head"]["w"] + p["head"]["b"]

    ln = lambda: {"g": jnp.ones(d, jnp.float32), "b": jnp.zeros(d, jnp.float32)}  # noqa: E731
    n = s["n"]
    return {
        "MLP": (mlp_f,
                [dense(s["d_in"], s["hidden"]), dense(s["hidden"], s["hidden"]), dense(s["hidden"], s["classes"])],
                jnp.asarray(rng.standard_normal((n, s["d_in"])), jnp.float32)),
        "CNN": (cnn_f, {"c1": conv(3, s["ch"]), "c2": conv(s["ch"], 2 * s["ch"]),
                        "out": dense(2 * s["ch"] * (s["img"] // 4) ** 2, s["classes"])},
                jnp.asarray(rng.standard_normal((n, 3, s["img"], s["img"])), jnp.float32)),
        "Transformer": (enc_f, {"embed": dense(s["d_in"] // 8, d), "head": dense(d, s["classes"]),
                                "blocks": [{"qkv": dense(d, 3 * d), "proj": dense(d, d), "ff1": dense(d, 2 * d),
                                            "ff2": dense(2 * d, d), "ln1": ln(), "ln2": ln()} for _ in range(2)]},
                        jnp.asarray(rng.standard_normal((n // 4, s["seq"], s["d_in"] // 8)), jnp.float32)),
    }


def bench_jax(s, repeats):
    import jax
    import jax.numpy as jnp

    from fisherlib import backends

    be = backends.get("jax")
    rows = []
    ready = jax.block_until_ready
    for name, (f, params, x) in jax_models(s).items():
        z0 = f(params, x)
        y = jnp.asarray(np.random.default_rng(1).integers(0, s["classes"], z0.shape[0]))
        ct = jnp.asarray(np.random.default_rng(2).standard_normal(z0.shape), jnp.float32)
        cts = jnp.asarray(np.random.default_rng(3).standard_normal((K, *z0.shape)), jnp.float32)

        def loss(p, x, y, f=f):
            logp = jax.nn.log_softmax(f(p, x))
            return -jnp.take_along_axis(logp, y[:, None], axis=1).sum()

        grad = jax.jit(jax.grad(loss))

        def train():
            return ready(grad(params, x, y))

        def probe():
            _, vjp = be.linearize(f, params, x)
            return ready(vjp(ct))

        def loop8():
            _, vjp = be.linearize(f, params, x)
            return ready([vjp(cts[k]) for k in range(K)])

        def batch8():
            _, vjp = be.linearize(f, params, x)
            return ready(vjp(cts))

        _, vjp = be.linearize(f, params, x)
        slices = [cts[k] for k in range(K)]
        t = median_times({
            "train": train, "probe": probe, "loop8": loop8, "batch8": batch8,
            "vjp_loop8": lambda: ready([vjp(c) for c in slices]), "vjp_batch8": lambda: ready(vjp(cts)),
        }, repeats, warmup=2)
        count = sum(a.size for a in jax.tree_util.tree_leaves(params))
        rows.append(("jax", name, count, tuple(x.shape), t))
    return rows


# -- report ------------------------------------------------------------------------------------


def table(rows) -> str:
    head = ("| framework | model | params | batch | train step (ms) | linearize + 1 vjp (ms) | ratio (aim ≤ 1.05) "
            "| 8 calls (ms) | K=8 batched (ms) | ratio (aim ≤ 0.6) | VJPs only: batched / 8 calls |")
    lines = [head, "|" + "---|" * 11]
    for fw, name, count, shape, t in rows:
        lines.append(
            f"| {fw} | {name} | {count:,} | {'×'.join(map(str, shape))} | {1e3 * t['train']:.2f} | "
            f"{1e3 * t['probe']:.2f} | {t['probe'] / t['train']:.2f} | {1e3 * t['loop8']:.2f} | "
            f"{1e3 * t['batch8']:.2f} | {t['batch8'] / t['loop8']:.2f} | {t['vjp_batch8'] / t['vjp_loop8']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--frameworks", default="torch,jax", help="comma-separated subset of torch,jax")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per framework (default 1: stable timings on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads > 0:  # before the frameworks start their thread pools
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={args.threads}").strip()
        import torch

        torch.set_num_threads(args.threads)
    s = sizes(args.quick)
    repeats = args.repeats or (3 if args.quick else 15)
    rows = []
    wanted = args.frameworks.split(",")
    if "torch" in wanted:
        rows += bench_torch(s, repeats)
    if "jax" in wanted:
        rows += bench_jax(s, repeats)
    import torch  # versions for the record

    jax_version = __import__("jax").__version__ if "jax" in wanted else "-"
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, jax {jax_version}, medians of {repeats} repeats, float32")
    print(table(rows))


if __name__ == "__main__":
    main()
