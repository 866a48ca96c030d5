"""fisher_spectrum's paths on a small CNN: F's side against the Gram side, auto's choice, λ_max alone.

A torch CNN on the 8×8 digits (scikit-learn's, 1,297 training inputs, C = 10) with P ≈ 1,900
parameters: R = C·N = 12,970 factor rows, so the exact spectrum can decompose F (P × P) or its
Gram matrix (R × R). Rows, all measured in this run:

- exact, F's side (what ``method="exact"`` does now when P ≤ R), on all inputs;
- exact, the Gram side (what it did before), on the first N' inputs only, for N' doubling: its
  time grows as R³, and the table extrapolates it to all inputs (the run on all inputs took over
  20 minutes before this change);
- the estimate with and without the density (``density=False``: λ_max alone), bounds off;
- what ``method="auto"`` predicted and chose.

    python benchmarks/spectrum_paths.py            # all 1,297 inputs
    python benchmarks/spectrum_paths.py --quick    # 300 inputs, a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fisherlib.spectral import fisher_operator, fisher_spectrum  # noqa: E402
from fisherlib.spectral._exact import gram_spectrum  # noqa: E402


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()


def digits(n: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = load_digits().data[:n] / 16.0
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1, 1, 8, 8)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    n = 300 if args.quick else 1297
    model, x = cnn(), digits(n)
    batches = list(x.split(256))
    P = sum(p.numel() for p in model.parameters())
    R = 10 * n
    print(f"CNN on the 8x8 digits: P = {P:,} parameters, N = {n:,} inputs, R = C·N = {R:,}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}\n")

    exact, t_exact = timed(lambda: fisher_spectrum(model, None, batches, k=3, method="exact", bounds=False))
    print("| path | inputs | matrix decomposed | time (s) | λ_max |")
    print("|---|---|---|---|---|")
    print(f"| exact, F's side (now) | {n:,} | {P:,} × {P:,} | {t_exact:.2f} | {exact.lambda_max:.6g} |")
    gram_times = []
    for m in ((25, 50) if args.quick else (50, 100, 200)):
        op = fisher_operator(model, None, list(x[:m].split(256)))
        assert op.n_params > 10 * m  # the Gram side is the smaller one here: the old path
        _, t = timed(lambda: gram_spectrum(op))
        gram_times.append((10 * m, t))
        print(f"| exact, Gram side (before) | {m:,} | {10 * m:,} × {10 * m:,} | {t:.2f} | (subset) |")
    # The old path on all inputs: the O(R³) eigendecomposition from the largest measured point.
    r0, t0 = gram_times[-1]
    big = np.random.default_rng(0).normal(size=(r0, r0))
    _, t_eigh = timed(lambda: np.linalg.eigh(big @ big.T))
    print(f"| exact, Gram side (before), extrapolated | {n:,} | {R:,} × {R:,} | "
          f"≈ {t_eigh * (R / r0) ** 3:,.0f} (eigh alone) | |")

    full, t_full = timed(lambda: fisher_spectrum(model, None, batches, method="estimate", bounds=False))
    alone, t_alone = timed(lambda: fisher_spectrum(model, None, batches, method="estimate", bounds=False,
                                                   density=False))
    auto, t_auto = timed(lambda: fisher_spectrum(model, None, batches, bounds=False))
    print("\n| call | passes | time (s) | × λ_max alone | λ_max | rel. err. |")
    print("|---|---|---|---|---|---|")
    for name, s, t in (("estimate, density and moments", full, t_full),
                       ("estimate, density=False (λ_max alone)", alone, t_alone),
                       (f"auto ({auto.method})", auto, t_auto)):
        err = abs(s.lambda_max - exact.lambda_max) / exact.lambda_max
        print(f"| {name} | {s.passes} | {t:.2f} | {t / t_alone:.1f} | {s.lambda_max:.6g} | {err:.1e} |")
    print(f"\nauto: {auto.plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
