"""The Fisher of a causal language model against its training step: time and peak memory.

GPT-2 small (12 layers, 768 wide, 50,257-token vocabulary, 124 M parameters, random weights
from its config: :func:`fisherlib.demo.lm.gpt2`) on random token ids, per batch of N sequences
of T tokens:

- ``train step``: forward, the LM loss (mean cross-entropy over the N·(T − 1) positions with a
  next token), backward into ``.grad`` (set to None between steps), no optimizer update;
- ``hutchinson K=1``: ``fisher(model, None, [batch], probes=1)``, diag F over every parameter;
- ``mc K=1``: ``method="mc"``, one sampled label per position;
- ``kfac reduce K=1`` / ``kfac expand K=1``: ``structure="kfac"`` with ``kfac_approx`` reduce or
  expand, one Hutchinson probe: Kronecker factors of every recognised layer (the 48 Conv1D
  layers, the position embedding); the tied embedding/output matrix (and the layer norms) on
  their diagonal (one more forward and backward for the tied matrix: ``docs/kfac.md``);
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
step's median. On a CPU the table also gives the median process CPU time (one torch thread:
the work done, which a shared machine's load inflates far less than the wall time) and its
ratio. Peak memory (CPU): in a fresh subprocess per row, after a warm-up call, the
peak resident set during one more call minus the resident set before it (``VmHWM`` reset
through ``/proc/self/clear_refs``, ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed blocks
leave it). On CUDA: every call ends with ``torch.cuda.synchronize()`` (its time is the
device's), and the peak is ``torch.cuda.max_memory_allocated`` over one call minus the
allocation before it, in this process.

``--tokens M`` streams: ``fisher`` (Hutchinson K=1, or ``--stream-method mc``) over M tokens of
random ids in batches of N × T, one batch at a time as a DataLoader would give them, with its
time, tokens per second and peak memory (CUDA: ``max_memory_allocated``; CPU: the resident
set's growth), then training steps over the same batches for the ratio (``--no-stream-train``
skips them), and the time 10^6 tokens take at that rate. The issue's GPU run is
``--device cuda --n 8 --length 1024 --tokens 1000000`` (122 batches); on a CPU run fewer tokens
and read the projected figure.

    python benchmarks/language_model.py                       # GPT-2 small, N=2, T=128, CPU
    python benchmarks/language_model.py --n 4 --length 512    # longer and larger
    python benchmarks/language_model.py --rows kfac           # K-FAC reduce and expand
    python benchmarks/language_model.py --quick               # the tiny twin (a smoke test)
    python benchmarks/language_model.py --device cuda --n 8 --length 1024 --tokens 1000000 --rows none
    python benchmarks/language_model.py --n 2 --length 512 --tokens 8192 --rows none   # CPU, projected
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from _measure import reset_peak, status_kb  # benchmarks/ is the script's directory

ROWS = ("train step", "hutchinson K=1", "mc K=1", "kfac reduce K=1", "kfac expand K=1", "exact head (closed form)",
        "exact (last block + head)", "empirical (last block + head)", "hutchinson per-ex. (last block + head)")
GROUPS = {"fast": ("train step", "hutchinson K=1", "mc K=1", "exact head (closed form)"),
          "kfac": ("train step", "kfac reduce K=1", "kfac expand K=1"),
          "all": ROWS, "none": ()}  # none: no table, the stream (--tokens) alone


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


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA), so that a call's time is the device's."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, batch) -> None:
    """Forward, the LM loss, backward into ``.grad`` (then set to None): no optimizer update."""
    from fisherlib.demo import lm

    out = model(input_ids=batch["input_ids"])
    lm.lm_loss(out.logits, batch["labels"]).backward()
    model.zero_grad(set_to_none=True)


def make_call(name: str, model, batch, subset):
    import warnings

    import fisherlib

    params = dict(model.named_parameters())
    head = {n: params[n] for n in subset if n.startswith("lm_head.")}
    sub = {n: params[n] for n in subset}
    device = batch["input_ids"].device

    if name == "train step":
        def call(i=0):
            train_step(model, batch)
            synchronize(device)
        return call
    kw = {"hutchinson K=1": dict(params=None, probes=1),
          "mc K=1": dict(params=None, method="mc"),
          "kfac reduce K=1": dict(params=None, probes=1, structure="kfac", kfac_approx="reduce"),
          "kfac expand K=1": dict(params=None, probes=1, structure="kfac", kfac_approx="expand"),
          "exact head (closed form)": dict(params=head, method="exact"),
          "exact (last block + head)": dict(params=sub, method="exact"),
          "empirical (last block + head)": dict(params=sub, method="empirical"),
          "hutchinson per-ex. (last block + head)": dict(params=sub, per_example=True)}[name]
    p = kw.pop("params")

    seeds = iter(range(1 << 30))

    def call(i=None):
        with warnings.catch_warnings():  # K-FAC names its diagonal leaves (the tied matrix, norms) once
            warnings.simplefilter("ignore", fisherlib.KroneckerFallbackWarning)
            est = fisherlib.fisher(model, p, [batch], seed=next(seeds) if i is None else i, **kw)
        synchronize(device)
        return est
    return call


def median_times(fns: dict, repeats: dict, warmup: int = 1) -> tuple[dict, dict]:
    """Medians of wall and process CPU time per function, the repeats interleaved in a rotating
    order (as ``_measure.median_times``), so that load affects all alike."""
    import statistics

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for r in range(max(repeats.values())):
        for name in list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]:
            if len(wall[name]) < repeats[name]:
                c0, t0 = time.process_time(), time.perf_counter()
                fns[name]()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return ({n: statistics.median(v) for n, v in wall.items()}, {n: statistics.median(v) for n, v in cpu.items()})


def child(spec: dict) -> None:
    """One row's peak extra memory (MB) in this fresh process, printed as JSON (CPU); or, with
    ``spec["stream"]``, one part of the stream (:func:`stream_part`)."""
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    if "stream" in spec:
        job = spec["stream"]
        print(json.dumps(stream_part(spec, job["tokens"], job["what"], job["method"])))
        return
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


def stream_part(spec: dict, tokens: int, what: str, method: str = "hutchinson") -> dict:
    """``what`` = "fisher" (``fisher`` over the stream) or "train" (training steps over it), over
    ``tokens`` tokens of random ids in batches of N × T, after one warm-up batch: its time and
    peak memory over the allocation before it (CUDA: ``max_memory_allocated``; CPU: the resident
    set's growth, ``VmHWM``, in a fresh process: :func:`stream`)."""
    import gc
    import warnings

    import torch

    import fisherlib
    from fisherlib.demo import lm

    model, _, _ = build(spec)
    n, T, device = spec["n"], spec["length"], spec["device"]
    ids = lm.random_ids(tokens + 1, model.config.vocab_size, seed=2)
    cuda = torch.device(device).type == "cuda"
    kw = dict(probes=1) if method == "hutchinson" else dict(method="mc")
    warm = next(lm.lm_batches(ids, n, T, device=device))  # the allocator's and kernels' first use
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_step(model, warm) if what == "train" else fisherlib.fisher(model, None, [warm], **kw)
    synchronize(device)
    gc.collect()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = status_kb("VmRSS")
        ok = base is not None and reset_peak()
    t0 = time.perf_counter()
    batches = counted = 0
    if what == "train":
        for batch in lm.lm_batches(ids, n, T, device=device):
            train_step(model, batch)
            batches += 1
    else:
        est = fisherlib.fisher(model, None, lm.lm_batches(ids, n, T, device=device), **kw)
        batches, counted = est.n_inputs // n, est.n_outputs
    synchronize(device)
    dt = time.perf_counter() - t0
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (status_kb("VmHWM") - base) / 1024 if ok else float("nan")
    return dict(seconds=dt, peak_mb=peak, batches=batches, counted=counted, tokens=batches * n * T)


def stream(spec: dict, tokens: int, method: str = "hutchinson", train: bool = True) -> dict:
    """``fisher`` over ``tokens`` tokens, then training steps over the same batches: times, tokens
    per second, peak memory, the 10^6-token projection. On a CPU each part runs in a fresh process
    whose allocator returns freed blocks (``MALLOC_MMAP_THRESHOLD_``, as :func:`peak_cpu`), so
    that one part's freed memory does not hide the other's peak."""
    import torch

    n, T = spec["n"], spec["length"]
    if tokens < n * T:
        raise SystemExit(f"--tokens: at least one batch of {n} x {T} = {n * T} tokens, got {tokens}")
    cuda = torch.device(spec["device"]).type == "cuda"

    def part(what):
        if cuda:
            return stream_part(spec, tokens, what, method)
        job = dict(spec, stream=dict(tokens=tokens, what=what, method=method))
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    f = part("fisher")
    out = dict(method=method, batches=f["batches"], tokens=f["tokens"], counted=f["counted"], seconds=f["seconds"],
               tokens_per_s=f["tokens"] / f["seconds"], peak_mb=f["peak_mb"], projected_s=f["seconds"] * 1e6 / f["tokens"])
    if train:
        t = part("train")
        out.update(train_seconds=t["seconds"], train_peak_mb=t["peak_mb"])
    return out


def report_stream(r: dict, device: str, projected: bool) -> None:
    print(f"\nStream ({r['method']} K=1, {device}): {r['tokens']:,} tokens in {r['batches']} batches "
          f"({r['counted']:,} with a next token) in {r['seconds']:.1f} s = {r['tokens_per_s']:,.0f} tokens/s; "
          f"peak memory {r['peak_mb']:,.0f} MB over the model's (the running sums included)")
    if "train_seconds" in r:
        print(f"Training steps over the same batches: {r['train_seconds']:.1f} s, peak {r['train_peak_mb']:,.0f} MB; "
              f"fisher / training: time {r['seconds'] / r['train_seconds']:.2f}, "
              f"memory {r['peak_mb'] / r['train_peak_mb'] if r['train_peak_mb'] > 0 else float('nan'):.2f}")
    word = "projected from this rate" if projected else "at this rate"
    print(f"10^6 tokens: {r['projected_s']:,.0f} s ({r['projected_s'] / 60:.1f} min), {word}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=("small", "mini", "tiny"))
    ap.add_argument("--n", type=int, default=2, help="sequences per batch")
    ap.add_argument("--length", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", default="fast",
                    help="'fast' (the batch methods), 'kfac', 'all', 'none' (the training step), or comma-separated rows")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index>")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    ap.add_argument("--tokens", type=int, default=0, help="also stream fisher over this many tokens (10^6: the GPU run)")
    ap.add_argument("--stream-method", default="hutchinson", choices=("hutchinson", "mc"))
    ap.add_argument("--no-stream-train", action="store_true", help="skip the training steps beside the stream")
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
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device: expected cpu, cuda or cuda:<index>, got {args.device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu, cuda or cuda:<index>, got {args.device!r}")
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device "
                         f"(built with CUDA {torch.version.cuda}); run on a machine with a GPU, or use --device cpu")
    if cuda and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if cuda:
        torch.cuda.set_device(device)
    rows = GROUPS[args.rows] if args.rows in GROUPS else tuple(r.strip() for r in args.rows.split(","))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; rows are {ROWS} or the groups {tuple(GROUPS)}")
    if "train step" not in rows:
        rows = ("train step",) + tuple(rows)
    spec = dict(size=args.size, n=args.n, length=args.length, dtype=args.dtype, attn=args.attn,
                device=str(device), threads=torch.get_num_threads())
    dev = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    if args.rows == "none":  # the stream alone
        if not args.tokens:
            raise SystemExit("--rows none: give --tokens for the stream")
        print(f"GPT-2 {args.size}; batch {args.n} × {args.length} tokens; {args.dtype}, {args.attn} attention; "
              f"{device} ({dev}), {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
              f"load {os.getloadavg()[0]:.2f}")
        r = stream(spec, args.tokens, args.stream_method, train=not args.no_stream_train)
        report_stream(r, f"{device} ({dev})", projected=args.tokens < 10**6)
        return
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
    t, c = median_times(calls, slow)
    peaks = {}
    if not args.no_memory:
        for r in rows:
            peaks[r] = peak_cuda(calls[r]) if cuda else peak_cpu(spec, r)

    print(f"GPT-2 {args.size}: {P:,} parameters (last block + head: {Psub:,}), vocabulary "
          f"{model.config.vocab_size:,}; batch {args.n} × {args.length} tokens; {args.dtype}, {args.attn} "
          f"attention; {device} ({dev}), {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
          f"load {os.getloadavg()[0]:.2f}")
    print()
    cpu_head = "" if cuda else " CPU time (ms) | × train |"
    print(f"| method | time / batch (ms) | × train step (aim ≤ 1.05) |{cpu_head} peak memory (MB) | × train step (aim ≤ 1.1) |")
    print("|---|---|---|" + ("" if cuda else "---|---|") + "---|---|")
    for r in rows:
        pk = peaks.get(r, float("nan"))
        cpu_cols = "" if cuda else f" {1e3 * c[r]:,.1f} | {c[r] / c['train step']:.2f} |"
        print(f"| {r} | {1e3 * t[r]:,.1f} | {t[r] / t['train step']:.2f} |{cpu_cols} {pk:,.0f} | "
              f"{pk / peaks.get('train step', float('nan')):.2f} |")
    if args.tokens:
        del calls, model, batch
        r = stream(spec, args.tokens, args.stream_method, train=not args.no_stream_train)
        report_stream(r, f"{device} ({dev})", projected=args.tokens < 10**6)


if __name__ == "__main__":
    main()
