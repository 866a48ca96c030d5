"""Command-line interface: ``fisherlib`` / ``python -m fisherlib``."""

from __future__ import annotations

import argparse
import sys


def _tour(args: argparse.Namespace) -> int:
    import numpy as np

    from . import hypercube, simplex

    rng = np.random.default_rng(args.seed)
    z = rng.normal(size=(args.rows, args.classes)) * args.scale
    lam, _ = simplex.eigh(z)
    lo, hi = simplex.lambda_max_bounds(z)
    tr = simplex.trace(z)
    trim = simplex.trimmed_norm(z)
    p = simplex.probs(z)
    print(f"softmax core space: {args.rows} rows of C={args.classes} logits (scale {args.scale})")
    print(f"{'row':>3} {'max p':>8} {'λ_max':>10} {'lower':>10} {'upper':>10} {'trace':>8} {'trimmed':>8}")
    for i in range(args.rows):
        print(
            f"{i:>3} {p[i].max():8.4f} {lam[i, -1]:10.6f} {lo[i]:10.6f} {hi[i]:10.6f} "
            f"{tr[i]:8.4f} {trim[i]:8.4f}"
        )
    ok = bool(np.all(lo <= lam[:, -1] + 1e-12) and np.all(lam[:, -1] <= hi + 1e-12))
    print(f"Theorem-1 bounds hold on every row: {ok}")
    print(f"sigmoid core space: trace of diag(σ') per row = {np.round(hypercube.trace(z), 4)}")
    return 0 if ok else 1


def _demo(args: argparse.Namespace) -> int:
    if args.model == "minilm":
        if args.backend not in (None, "torch"):
            raise SystemExit("fisherlib demo: --model minilm runs on torch only")
        from .demo import minilm

        minilm.run(out=args.out, probes=args.probes, seed=args.seed, quick=args.quick,
                   progress=not args.no_progress)
        return 0
    from .demo import run

    run(backend=args.backend, out=args.out, probes=args.probes, seed=args.seed, quick=args.quick,
        progress=not args.no_progress)
    return 0


def _fisher(args: argparse.Namespace) -> int:
    from .integrations.command import run

    return run(args)


def _info(args: argparse.Namespace) -> int:
    from .info import report

    print(report())
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisherlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tour = sub.add_parser("tour", help="print the core-space geometry of a few random logits")
    tour.add_argument("--rows", type=int, default=5, help="number of logit rows (default 5)")
    tour.add_argument("--classes", type=int, default=10, help="number of classes C (default 10)")
    tour.add_argument("--scale", type=float, default=2.0, help="logit scale (default 2)")
    tour.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tour.set_defaults(func=_tour)

    demo = sub.add_parser(
        "demo", help="train a small MLP on real digits and report its Fisher geometry",
        description="Train a small MLP for a few seconds on scikit-learn's 8x8 digits, then compute "
                    "on held-out images the core-space spectrum of every output, the exact Fisher "
                    "diagonal, Hutchinson / Monte-Carlo / empirical estimates and the bounds F_LB, "
                    "F_UB, with timings. Prints a table; writes report.md, PNG figures, report.json "
                    "and fisher.npz to --out.")
    demo.add_argument("--backend", choices=("torch", "jax", "numpy"), default=None,
                      help="framework (default: the first installed of torch, jax, numpy)")
    demo.add_argument("--out", default="fisherlib-report",
                      help="report directory (default ./fisherlib-report)")
    demo.add_argument("--model", choices=("mlp", "minilm"), default="mlp",
                      help="mlp: the digits MLP (default); minilm: the pretrained all-MiniLM-L6-v2 "
                           "transformer on the VADER lexicon, per-layer Fisher densities as in the "
                           "paper (pip install 'fisherlib[minilm]')")
    demo.add_argument("--probes", type=_positive, default=16,
                      help="probes K of each random estimator in the table (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data split, weights and probes")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run (a smoke test)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.set_defaults(func=_demo)

    fis = sub.add_parser(
        "fisher", help="compute the Fisher diagonal (or K-FAC) of a model over a dataset and write it to a file",
        description="Compute diag F (or its K-FAC factors) of a HuggingFace model directory or an importable torch module over "
                    "a dataset, with a progress bar, and write it to a .safetensors file (tensors named "
                    "as the model's parameters, value and stderr/<name>, the provenance in the header) "
                    "or a .npz file. Nothing is downloaded.")
    fis.add_argument("model", help="a HuggingFace model directory (config.json, weights, tokenizer), or "
                                   "package.module:name for a torch.nn.Module or a callable returning one")
    fis.add_argument("--data", required=True,
                     help="HuggingFace: a .txt (one text a line), .jsonl, .csv or .tsv file; torch module: a "
                          ".npz or .safetensors file with arrays x (and y); either: package.module:name, an "
                          "iterable of batches or a callable returning one")
    fis.add_argument("--out", default="fisher.safetensors", help="output file (default fisher.safetensors)")
    fis.add_argument("--method", choices=("hutchinson", "exact", "mc", "empirical"), default="hutchinson",
                     help="estimator (default hutchinson; empirical needs labels)")
    fis.add_argument("--structure", choices=("diag", "kfac", "ekfac"), default="diag",
                     help="the Fisher's diagonal (default), or its Kronecker factors per layer (K-FAC, EK-FAC: "
                          "kron/<layer>/A and kron/<layer>/G in the file)")
    fis.add_argument("--kfac-approx", choices=("expand", "reduce"), default="expand",
                     help="K-FAC's treatment of positions (default expand)")
    fis.add_argument("--probes", type=_positive, default=1, help="probes K per batch (default 1)")
    fis.add_argument("--batch-size", type=_positive, default=32, help="inputs per batch (default 32)")
    fis.add_argument("--max-inputs", type=_positive, default=None, help="use only the first N inputs")
    fis.add_argument("--max-length", type=_positive, default=128, help="tokens per text (default 128)")
    fis.add_argument("--text-column", default="text", help="text column of a table (default text)")
    fis.add_argument("--label-column", default="label", help="label column of a table, if any (default label)")
    fis.add_argument("--reduction", choices=("sum", "mean"), default="sum",
                     help="F as a sum over inputs (default) or their mean")
    fis.add_argument("--dtype", choices=("model", "float64"), default="model",
                     help="compute in the model's dtype (default) or in float64")
    fis.add_argument("--seed", type=int, default=0, help="seed of the probes (default 0)")
    fis.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    fis.set_defaults(func=_fisher)

    info = sub.add_parser("info", help="installed backends, devices and versions")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
