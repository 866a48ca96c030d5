"""A small GPT trained with AdamW, Sophia-G and fisherlib's Sophia-schedule Fisher preconditioner.

The workload of :mod:`fisherlib.demo.lm`: a GPT-2-architecture model with random initial
weights (:func:`~fisherlib.demo.lm.gpt2`) on CPython's ``pydoc_data.topics`` as UTF-8 bytes
(ids 0..255; the first 90 % trains, the last 10 % validates). Per step a batch of ``--n``
random windows of ``--length`` tokens (a seeded generator per seed, the same windows for every
optimizer), the LM loss, ``loss.backward()``, the gradient norm clipped to 1 (nanoGPT's and
Sophia's scripts), ``opt.step()``. The learning rate warms up linearly over the first 5 % of
the steps and decays by a cosine to a tenth (every optimizer alike). Weights of matrices decay;
biases, layer norms and (as nanoGPT) nothing else is exempt: two parameter groups.

- ``adamw``: ``torch.optim.AdamW``, betas (0.9, 0.95), weight decay 0.1 (nanoGPT's);
- ``sophia-g``: the published Sophia-G, written here from the authors' ``SophiaG`` (Liu et al.
  2023, github.com/Liuhong99/Sophia, ``sophia.py`` and the README's loop): every k = 10 steps,
  after the step, labels sampled from the model's softmax on the step's batch, the mean
  cross-entropy against them backpropagated, h ← β₂ h + (1 − β₂) g⊙g; the step
  θ ← θ(1 − η wd) − η sign(m) min(|m| / (ρ · bs · h + 1e-15), 1) with bs the batch's tokens;
  betas (0.965, 0.99), weight decay 0.1;
- ``fisherlib``: ``NaturalGradient(model, preconditioner="sophia", params=groups, ...)`` as a
  drop-in after ``loss.backward()`` (the batch captured by its forward hook), the same betas,
  decay and k, γ = ρ, the Fisher from ``--fisher-batch`` rows of the captured batch.

Reported per optimizer over ``--seeds``: the tokens seen when the validation loss (every
``--eval-every`` steps, on ``--val-windows`` fixed windows) first reaches ``--target``, the final
validation loss, and tokens/s. Throughput is measured twice: over each training run (under
whatever load the machine has), and in an interleaved timing phase (blocks of k consecutive
steps of each optimizer, so that each block holds one refresh, alternated so that load hits all
alike; median per block) whose ratio to AdamW is the headline ``throughput vs AdamW``.

    python benchmarks/lm_optimizer.py                       # the CPU default, ~15 min on 1 core
    python benchmarks/lm_optimizer.py --quick               # a smoke run (tiny model, few steps)
    python benchmarks/lm_optimizer.py --size mini --n 16 --length 256 --steps 3000 --device cuda
                                                            # the issue's 6 layers × 256 wide
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

from _measure import median_times  # benchmarks/ is the script's directory

OPTIMIZERS = ("adamw", "sophia-g", "fisherlib")
# (n_layer, n_embd, n_head): "bench" is the CPU default, "mini" the 6 × 256 (demo.lm's).
SIZES = {"tiny": (2, 32, 2), "bench": (4, 128, 4), "mini": (6, 256, 8)}
# Peak learning rates and ρ (γ) found on this workload (docs/benchmarks.md: 150-step pilot, seed 0).
DEFAULTS = {"adamw": dict(lr=2e-3), "sophia-g": dict(lr=5e-4, rho=0.04), "fisherlib": dict(lr=5e-4, rho=0.04)}


class SophiaG:
    """Sophia-G as published (``sophia.py`` of Liu et al.): a ``torch.optim.Optimizer`` built on demand.

    ``update_hessian()`` folds the current ``p.grad`` (the sampled-label gradient) into
    h ← β₂ h + (1 − β₂) g⊙g; ``step(bs=)`` is θ ← θ(1 − η wd), m ← β₁ m + (1 − β₁) g,
    θ ← θ − η sign(m) · min(|m| / (ρ · bs · h + 1e-15), 1).
    """

    def __new__(cls, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1):
        import torch

        class _SophiaG(torch.optim.Optimizer):
            def __init__(self):
                super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay))

            def _state(self, p):
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["hessian"] = torch.zeros_like(p)
                return st

            @torch.no_grad()
            def update_hessian(self):
                for group in self.param_groups:
                    b2 = group["betas"][1]
                    for p in group["params"]:
                        if p.grad is not None:
                            self._state(p)["hessian"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)

            @torch.no_grad()
            def step(self, closure=None, bs=5120):
                for group in self.param_groups:
                    b1 = group["betas"][0]
                    lr, rho, wd = group["lr"], group["rho"], group["weight_decay"]
                    for p in group["params"]:
                        if p.grad is None:
                            continue
                        st = self._state(p)
                        p.mul_(1 - lr * wd)
                        st["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                        ratio = (st["exp_avg"].abs() / (rho * bs * st["hessian"] + 1e-15)).clamp(None, 1)
                        p.addcmul_(st["exp_avg"].sign(), ratio, value=-lr)

        return _SophiaG()


def data(seq: int):
    """(train ids, val ids): the pydoc text as bytes, split 90 / 10."""
    from fisherlib.demo import lm

    ids = lm.token_ids("bytes")
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


def windows(ids, n: int, length: int, rng, device):
    """``n`` random windows: (input_ids, labels) with labels the next tokens (every position counts)."""
    import numpy as np
    import torch

    at = rng.integers(0, len(ids) - length - 1, size=n)
    w = np.stack([ids[a:a + length + 1] for a in at])
    t = torch.as_tensor(w, device=device)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def build(args, seed: int):
    from fisherlib.demo import lm

    L, d, h = SIZES[args.size]
    model = lm.gpt2("mini", seed=seed, vocab_size=256, n_layer=L, n_embd=d, n_head=h, n_positions=args.length)
    return model.to(args.device).train()


def groups(model, wd: float):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def make(name: str, model, args, lr: float, rho: float):
    import torch

    from fisherlib.natural import NaturalGradient

    if name == "adamw":
        return torch.optim.AdamW(groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    if name == "sophia-g":
        return SophiaG(groups(model, 0.1), lr=lr, betas=(0.965, 0.99), rho=rho)
    return NaturalGradient(model, lr, preconditioner="sophia", params=groups(model, 0.1), betas=(0.965, 0.99),
                           gamma=rho, refresh=args.k, fisher_batch=args.fisher_batch or None, seed=0)


def schedule(step: int, steps: int) -> float:
    """Linear warm-up over 5 % of the steps, then a cosine to 0.1."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))


def train_step(name, model, opt, batch, it: int, args):
    """One training step of optimizer ``name`` (its Hessian/Fisher refresh included)."""
    import torch
    import torch.nn.functional as F

    x, y = batch
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if name == "sophia-g":
        opt.step(bs=x.numel())
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if name == "sophia-g" and it % args.k == args.k - 1:  # the published refresh: sampled labels
        logits = model(input_ids=x).logits
        sampled = torch.distributions.Categorical(logits=logits.float()).sample()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), sampled.reshape(-1)).backward()
        opt.update_hessian()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


def evaluate(model, val) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        x, y = val
        logits = model(input_ids=x).logits
        out = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)))
    model.train()
    return out


def run(name: str, seed: int, args, split, hyper: dict) -> dict:
    """Train one optimizer from seed ``seed``: validation curve, training time, tokens."""
    import numpy as np
    import torch

    train_ids, val_ids = split
    model = build(args, seed)
    opt = make(name, model, args, hyper["lr"], hyper.get("rho", 0.04))
    base = [g["lr"] for g in opt.param_groups]
    rng = np.random.default_rng(1000 + seed)
    val = windows(val_ids, args.val_windows, args.length, np.random.default_rng(7), args.device)
    tokens = args.n * args.length
    curve, spent = [(0, evaluate(model, val))], 0.0
    for it in range(args.steps):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * schedule(it, args.steps)
        batch = windows(train_ids, args.n, args.length, rng, args.device)
        t0 = time.perf_counter()
        loss = train_step(name, model, opt, batch, it, args)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        spent += time.perf_counter() - t0
        if (it + 1) % args.eval_every == 0 or it + 1 == args.steps:
            curve.append(((it + 1) * tokens, evaluate(model, val)))
            if not math.isfinite(float(loss)):
                break
    return {"curve": curve, "seconds": spent, "tokens_per_s": (it + 1) * tokens / spent}


def reach(curve, target: float):
    """Tokens at the first evaluation whose validation loss is ≤ target (None: never)."""
    return next((t for t, v in curve if v <= target), None)


def timing(args, split, repeats: int) -> dict:
    """Median seconds of a block of k consecutive steps per optimizer, blocks interleaved."""
    import numpy as np
    import torch

    train_ids, _ = split
    fns = {}
    for name in OPTIMIZERS:
        model = build(args, 0)
        opt = make(name, model, args, DEFAULTS[name]["lr"] * 0.1, DEFAULTS[name].get("rho", 0.04))
        rng = np.random.default_rng(5)
        batches = [windows(train_ids, args.n, args.length, rng, args.device) for _ in range(args.k)]
        counter = [0]

        def block(name=name, model=model, opt=opt, batches=batches, counter=counter):
            for b in batches:  # k steps: one refresh each for sophia-g and fisherlib
                train_step(name, model, opt, b, counter[0], args)
                counter[0] += 1
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        fns[name] = block
    return median_times(fns, repeats, warmup=1)


def to_target(runs: list, target: float) -> str:
    """Median tokens to ``target`` over the seeds (each seed's in brackets)."""
    hits = [reach(r["curve"], target) for r in runs]
    got = [h for h in hits if h is not None]
    med = f"{statistics.median(got):,.0f}" if len(got) == len(hits) else f"{len(got)}/{len(hits)} seeds reach it"
    return med + " (" + ", ".join("—" if h is None else f"{h:,}" for h in hits) + ")"


def table(results: dict, targets: list, tokens_per_step: int, blocks: dict | None, k: int) -> str:
    lines = [f"validation loss in nats/byte; tokens per step {tokens_per_step}", "",
             "| optimizer | lr, ρ | " + " | ".join(f"tokens to {t} (median; per seed)" for t in targets)
             + " | final val loss | tokens/s in training (median) | step time vs AdamW (interleaved) | "
             "throughput vs AdamW |",
             "|---|---|" + "---|" * len(targets) + "---|---|---|---|"]
    base = blocks["adamw"] if blocks else None
    for name, (hyper, runs) in results.items():
        med = " | ".join(to_target(runs, t) for t in targets)
        finals = [r["curve"][-1][1] for r in runs]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        hp = f"{hyper['lr']:g}" + (f", {hyper['rho']:g}" if "rho" in hyper else "")
        if blocks and name in blocks:
            ratio = blocks[name] / base
            rel = f"{ratio:.3f}× ({blocks[name] / k * 1e3:.0f} ms/step)"
            thr = f"{1 / ratio - 1:+.1%}"
        else:
            rel = thr = "—"
        lines.append(f"| {name} | {hp} | {med} | {statistics.mean(finals):.3f} ± {sd:.3f} | {tps:,.0f} | "
                     f"{rel} | {thr} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=tuple(SIZES), default="bench")
    p.add_argument("--n", type=int, default=16, help="sequences per batch")
    p.add_argument("--length", type=int, default=64, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, default=10, help="refresh interval of both Sophia variants")
    p.add_argument("--fisher-batch", type=int, default=4, help="rows of the captured batch for fisherlib's refresh (0: all)")
    p.add_argument("--target", type=float, nargs="+", default=[2.5, 2.3])
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--timing-blocks", type=int, default=5, help="interleaved k-step blocks per optimizer (0: skip)")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p.add_argument("--lr", type=float, nargs="+", default=None, help="peak lr per optimizer (in --optimizers order)")
    p.add_argument("--rho", type=float, default=None, help="ρ = γ of both Sophia variants")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 20 steps, one seed")
    p.add_argument("--json", default=None, help="write the curves and figures here")
    p.add_argument("--timing-only", action="store_true", help="only the interleaved timing phase")
    p.add_argument("--label", default=None, help="the row's name (one optimizer): e.g. 'fisherlib γ=0.04'")
    p.add_argument("--merge", nargs="+", default=None, help="print one table from these --json files")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.n, args.length, args.steps, args.seeds = "tiny", 4, 32, 20, [0]
        args.eval_every, args.val_windows, args.timing_blocks, args.k = 5, 8, 1, 5
    if args.merge:  # runs made in separate processes (one optimizer each), and a --timing-only run
        results, blocks, meta = {}, None, None
        for path in args.merge:
            with open(path) as f:
                got = json.load(f)
            meta = meta or got["args"]
            for k, v in got["results"].items():  # the seeds of one row may come from several files
                results[k] = (v["hyper"], (results[k][1] if k in results else []) + v["runs"])
            blocks = got["blocks"] or blocks
        order = {k: results[k] for k in sorted(results, key=lambda k: (k.split(" ")[0] not in OPTIMIZERS,
                                                                       OPTIMIZERS.index(k.split(" ")[0])
                                                                       if k.split(" ")[0] in OPTIMIZERS else 0, k))}
        print(table(order, args.target, meta["n"] * meta["length"], blocks, meta["k"]))
        return
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    split = data(args.length)
    hypers = {}
    for i, name in enumerate(args.optimizers):
        h = dict(DEFAULTS[name])
        if args.lr is not None:
            h["lr"] = args.lr[i] if len(args.lr) > 1 else args.lr[0]
        if args.rho is not None and name != "adamw":
            h["rho"] = args.rho
        hypers[name] = h
    L, d, h = SIZES[args.size]
    print(f"# GPT-2 architecture {L} layers × {d} wide ({h} heads), byte vocabulary, {args.n}×{args.length} tokens "
          f"per step, {args.steps} steps, seeds {args.seeds}, k={args.k}, fisher_batch={args.fisher_batch or 'all'}, "
          f"device {args.device}, threads {torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}",
          flush=True)
    results = {}
    t_all = time.perf_counter()
    for name in ([] if args.timing_only else args.optimizers):
        runs = []
        for seed in args.seeds:
            r = run(name, seed, args, split, hypers[name])
            print(f"{name} seed {seed}: final val {r['curve'][-1][1]:.3f}, {r['tokens_per_s']:,.0f} tokens/s, "
                  f"to {args.target}: {[reach(r['curve'], t) for t in args.target]}", flush=True)
            runs.append(r)
        results[args.label or name] = (hypers[name], runs)
    blocks = None
    if args.timing_blocks and set(args.optimizers) == set(OPTIMIZERS):
        blocks = timing(args, split, args.timing_blocks)
        print("interleaved k-step blocks (s, median):", {k: round(v, 3) for k, v in blocks.items()})
    print()
    if results:
        print(table(results, args.target, args.n * args.length, blocks, args.k))
    print(f"\n(total {time.perf_counter() - t_all:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": {k: {"hyper": h, "runs": r} for k, (h, r) in results.items()},
                       "blocks": blocks}, f)


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    main()
