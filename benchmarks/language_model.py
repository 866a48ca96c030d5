"""The Fisher of a causal language model against its training step: time and peak memory.

GPT-2 small (12 layers, 768 wide, 50,257-token vocabulary, 124 M parameters, random weights
from its config: :func:`fisherlib.demo.lm.gpt2`) on random token ids, per batch of N sequences
of T tokens:

- ``train step``: forward, the LM loss (mean cross-entropy over the N·(T − 1) positions with a
  next token), backward into ``.grad`` (set to None between steps), no optimizer update;
- ``hutchinson K=1``: ``fisher(model, None, [batch], probes=1)``, diag F over every parameter;
- ``mc K=1``: ``method="mc"``, one sampled label per position;
- ``exact head (closed form)``: ``method="exact"`` on the output projection alone,
  Σ_nt diag(p(1 − p)) ⊗ h² in one matrix product (the layer I/O's head shortcut);
- ``exact/empirical/hutchinson per-ex. (last block + head)``: per-example methods on the
  parameters of the last transformer block, the final layer norm and the head. Exact needs a
  column per (position, vocabulary entry) through them, V·T backward passes: run it on the
  tiny twin (``--size tiny``), not at V = 50,257.

The rows on a parameter subset use a copy of the model whose output projection is untied from
the input embedding (``tie=False``, 38.6 M more parameters at GPT-2 small's size): the tied
matrix's Fisher includes its use as the input embedding, which no closed form gives.

Times are medians of interleaved repeats within one run; ``× train`` divides by the training
step's median. Peak memory (CPU): in a fresh subprocess per row, after a warm-up call, the
peak resident set during one more call minus the resident set before it (``VmHWM`` reset
through ``/proc/self/clear_refs``, ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed blocks
leave it). On CUDA: ``torch.cuda.max_memory_allocated`` over one call minus the allocation
before it, in this process.

    python benchmarks/language_model.py                       # GPT-2 small, N=2, T=128, CPU
    python benchmarks/language_model.py --n 4 --length 512    # longer and larger
    python benchmarks/language_model.py --quick               # the tiny twin (a smoke test)
    python benchmarks/language_model.py --device cuda --tokens 1000000   # a GPU, 10^6 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from _measure import median_times, reset_peak, status_kb  # benchmarks/ is the script's directory

ROWS = ("train step", "hutchinson K=1", "mc K=1", "exact head (closed form)",
        "exact (last block + head)", "empirical (last block + head)", "hutchinson per-ex. (last block + head)")
FAST = ROWS[:4]


def untied(row: str) -> bool:
    """Rows on a parameter subset use an untied output projection (see the module docstring)."""
    return row.startswith("exact head") or "last block" in row


def build(spec: dict, tie: bool = True):
    """(model, batch, subset names) on the spec's device and dtype."""
    import torch

    from fisherlib.demo import lm

    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec["dtype"]]
    model = lm.gpt2(spec["size"], seed=0, attn=spec["attn"], dtype=dtype, tie=tie).to(spec["device"])
    if spec.get("checkpointing"):
        model.gradient_checkpointing_enable()
        model.train()  # HF checkpoints only in training mode; dropout is 0
    V = model.config.vocab_size
    ids = lm.random_ids(spec["n"] * spec["length"] + 1, V, seed=1)
    batch = next(lm.lm_batches(ids, spec["n"], spec["length"], device=spec["device"]))
    last = model.config.n_layer - 1
    subset = [n for n, _ in model.named_parameters()
              if n.startswith((f"transformer.h.{last}.", "transformer.ln_f.", "lm_head."))]
    return model, batch, subset


def make_call(name: str, model, batch, subset):
    import torch

    import fisherlib
    from fisherlib.demo import lm

    params = dict(model.named_parameters())
    head = {n: params[n] for n in subset if n.startswith("lm_head.")}
    sub = {n: params[n] for n in subset}

    if name == "train step":
        def call(i=0):
            out = model(input_ids=batch["input_ids"])
            lm.lm_loss(out.logits, batch["labels"]).backward()
            model.zero_grad(set_to_none=True)
        return call
    kw = {"hutchinson K=1": dict(params=None, probes=1),
          "mc K=1": dict(params=None, method="mc"),
          "exact head (closed form)": dict(params=head, method="exact"),
          "exact (last block + head)": dict(params=sub, method="exact"),
          "empirical (last block + head)": dict(params=sub, method="empirical"),
          "hutchinson per-ex. (last block + head)": dict(params=sub, per_example=True)}[name]
    p = kw.pop("params")

    seeds = iter(range(1 << 30))

    def call(i=None):
        est = fisherlib.fisher(model, p, [batch], seed=next(seeds) if i is None else i, **kw)
        if batch["input_ids"].device.type == "cuda":
            torch.cuda.synchronize()
        return est
    return call


def child(spec: dict) -> None:
    """One row's peak extra memory (MB) in this fresh process, printed as JSON (CPU)."""
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    model, batch, subset = build(spec, tie=not untied(spec["row"]))
    call = make_call(spec["row"], model, batch, subset)
    call(0)
    gc.collect()
    base = status_kb("VmRSS")
    if base is None or not reset_peak():
        print(json.dumps({"peak_mb": float("nan")}))
        return
    call(1)
    print(json.dumps({"peak_mb": (status_kb("VmHWM") - base) / 1024}))


def peak_cpu(spec: dict, row: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(dict(spec, row=row))],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def peak_cuda(call) -> float:
    import torch

    call(0)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call(1)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def stream(spec: dict, tokens: int) -> None:
    """Hutchinson K=1 over ``tokens`` tokens of random ids, one batch at a time: time, tokens/s."""
    import torch

    import fisherlib
    from fisherlib.demo import lm

    model, _, _ = build(spec)
    n, T = spec["n"], spec["length"]
    ids = lm.random_ids(tokens + 1, model.config.vocab_size, seed=2)
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    est = fisherlib.fisher(model, None, lm.lm_batches(ids, n, T, device=spec["device"]), probes=1)
    if spec["device"] == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if spec["device"] == "cuda" else float("nan")
    print(f"\nStream: hutchinson K=1 over {est.n_outputs:,} counted tokens ({est.n_inputs:,} sequences of {T}) "
          f"in {dt:.1f} s = {est.n_outputs / dt:,.0f} tokens/s; peak allocated {peak:.2f} GiB")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=("small", "mini", "tiny"))
    ap.add_argument("--n", type=int, default=2, help="sequences per batch")
    ap.add_argument("--length", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", default="fast", help="'fast' (the batch methods), 'all', or comma-separated rows")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    ap.add_argument("--tokens", type=int, default=0, help="also stream Hutchinson K=1 over this many tokens")
    ap.add_argument("--quick", action="store_true", help="the tiny twin, 2 repeats (a smoke test)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.size, args.repeats, args.length = "tiny", 2, min(args.length, 32)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    rows = {"fast": FAST, "all": ROWS}.get(args.rows) or tuple(r.strip() for r in args.rows.split(","))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; rows are {ROWS}")
    if "train step" not in rows:
        rows = ("train step",) + tuple(rows)
    spec = dict(size=args.size, n=args.n, length=args.length, dtype=args.dtype, attn=args.attn,
                device=args.device, threads=torch.get_num_threads())
    model, batch, _ = build(spec)
    P = sum(p.numel() for p in model.parameters())
    calls = {r: make_call(r, model, batch, []) for r in rows if not untied(r)}
    Psub = 0
    if any(untied(r) for r in rows):
        model2, batch, subset = build(spec, tie=False)
        Psub = sum(p.numel() for n, p in model2.named_parameters() if n in subset)
        calls.update({r: make_call(r, model2, batch, subset) for r in rows if untied(r)})
    calls = {r: calls[r] for r in rows}
    slow = {r: max(2, args.repeats // 3) if "last block" in r else args.repeats for r in rows}
    t = median_times(calls, slow)
    peaks = {}
    if not args.no_memory:
        for r in rows:
            peaks[r] = peak_cuda(calls[r]) if args.device.startswith("cuda") else peak_cpu(spec, r)

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"GPT-2 {args.size}: {P:,} parameters (last block + head: {Psub:,}), vocabulary "
          f"{model.config.vocab_size:,}; batch {args.n} × {args.length} tokens; {args.dtype}, {args.attn} "
          f"attention; {args.device} ({dev}), {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
          f"load {os.getloadavg()[0]:.2f}")
    print()
    print("| method | time / batch (ms) | × train step (aim ≤ 1.05) | peak memory (MB) | × train step (aim ≤ 1.1) |")
    print("|---|---|---|---|---|")
    for r in rows:
        pk = peaks.get(r, float("nan"))
        print(f"| {r} | {1e3 * t[r]:,.1f} | {t[r] / t['train step']:.2f} | {pk:,.0f} | "
              f"{pk / peaks.get('train step', float('nan')):.2f} |")
    if args.tokens:
        stream(spec, args.tokens)


if __name__ == "__main__":
    main()
