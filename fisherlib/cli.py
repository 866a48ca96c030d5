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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisherlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tour = sub.add_parser("tour", help="print the core-space geometry of a few random logits")
    tour.add_argument("--rows", type=int, default=5, help="number of logit rows (default 5)")
    tour.add_argument("--classes", type=int, default=10, help="number of classes C (default 10)")
    tour.add_argument("--scale", type=float, default=2.0, help="logit scale (default 2)")
    tour.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tour.set_defaults(func=_tour)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
