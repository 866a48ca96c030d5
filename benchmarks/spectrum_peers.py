"""λ_max and tr F: fisherlib against curvlinops on the same torch network, timed side by side.

Both compute with the same F = Σ_x J_xᵀ (diag p − ppᵀ) J_x (curvlinops: the GGN of the summed
cross-entropy). Rows, all measured in one run (medians of interleaved repeats, after a warm-up):

- ``λ_max``: curvlinops' ``GGNLinearOperator.to_scipy()`` handed to ``scipy.sparse.linalg.eigsh``;
  fisherlib's operator handed to the same ``eigsh``; fisherlib's own Lanczos (full
  reorthogonalisation, stops at a relative residual estimate of ``tol``), with its residual.
- ``tr F``: curvlinops' ``hutchinson_trace`` with K GGN-vector products; fisherlib's
  ``fisher(structure="trace")`` with K probes (one VJP of K core-space probes per batch); both
  against the exact trace, with the relative error (one seed).

PyHessian is not installed here (and computes the Hessian, not F): not compared.

    python benchmarks/spectrum_peers.py            # MLP 64-256-256-10 on 512 inputs, float32
    python benchmarks/spectrum_peers.py --quick    # a smaller smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._measure import median_times  # noqa: E402
from fisherlib.spectral import fisher_spectrum  # noqa: E402
from tests.peers import models  # noqa: E402
from tests.spectral import _peers  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sizes, n, K = ((16, 32, 32, 10), 64, 8) if args.quick else ((64, 256, 256, 10), 512, 32)
    dtype = torch.float32
    model = models.mlp(sizes, dtype=dtype)
    x = models.inputs((sizes[0],), n, dtype=dtype)
    y = torch.randint(0, sizes[-1], (n,), generator=torch.Generator().manual_seed(0))
    P = sum(p.numel() for p in model.parameters())
    ref = fisher_spectrum(models.mlp(sizes), None, [x.double()], method="estimate", bounds=False,
                          probes=2, slq_steps=2, tol=1e-10)  # float64 references
    exact_trace = _exact_trace(models.mlp(sizes), x.double())
    tol = 1e-4
    out = {}
    fns = {
        "curvlinops: eigsh(GGN.to_scipy())": lambda: out.__setitem__("c_eig", _peers.curvlinops_lambda_max(model, x, y, tol=tol)),
        "fisherlib: eigsh(op.to_scipy())": lambda: out.__setitem__("f_eigsh", _peers.fisherlib_lambda_max_eigsh(model, x, tol=tol)),
        "fisherlib: Lanczos (top_eigenpairs)": lambda: out.__setitem__("f_lz", _peers.fisherlib_lambda_max(model, x, tol=tol)),
        f"curvlinops: hutchinson_trace, K = {K}": lambda: out.__setitem__("c_tr", _peers.curvlinops_trace(model, x, y, matvecs=K)),
        f"fisherlib: fisher(structure='trace'), K = {K}": lambda: out.__setitem__("f_tr", _peers.fisherlib_trace(model, x, probes=K)),
    }
    times = median_times(fns, args.repeats)
    lam = ref.lambda_max
    print(f"MLP {'-'.join(map(str, sizes))} (tanh), {n} inputs, P = {P:,}, float32, torch "
          f"{torch.__version__}, 1 thread, {platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print(f"float64 reference: λ_max = {lam:.6g} (Lanczos residual {ref.residuals[0]:.1e}), "
          f"exact tr F = {exact_trace:.6g}\n")
    print(f"{'method':<44} {'time (s)':>9} {'× curvlinops':>13} {'value':>12} {'rel. error':>11}")
    base = {"λ": times["curvlinops: eigsh(GGN.to_scipy())"], "tr": times[f"curvlinops: hutchinson_trace, K = {K}"]}
    vals = {"curvlinops: eigsh(GGN.to_scipy())": out["c_eig"], "fisherlib: eigsh(op.to_scipy())": out["f_eigsh"],
            "fisherlib: Lanczos (top_eigenpairs)": out["f_lz"][0],
            f"curvlinops: hutchinson_trace, K = {K}": out["c_tr"], f"fisherlib: fisher(structure='trace'), K = {K}": out["f_tr"][0]}
    for name, t in times.items():
        kind = "tr" if "trace" in name else "λ"
        target = exact_trace if kind == "tr" else lam
        print(f"{name:<44} {t:>9.3f} {t / base[kind]:>13.2f} {vals[name]:>12.6g} {abs(vals[name] - target) / target:>11.1e}")
    print(f"\nfisherlib Lanczos residual ‖Fv − λv‖ = {out['f_lz'][1]:.2e}; fisherlib trace standard error "
          f"{out['f_tr'][1]:.3g} ({out['f_tr'][1] / exact_trace:.1%})")
    return 0


def _exact_trace(model, x):
    import fisherlib

    return float(fisherlib.fisher(model, None, [x], structure="trace", method="exact").value)


if __name__ == "__main__":
    raise SystemExit(main())
