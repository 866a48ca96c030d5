"""The diagonal of the Fisher / GGN from each peer library, as one flat vector.

Every function returns the diagonal in ``model.named_parameters()`` order, flattened, as a
**sum** over the inputs (fisherlib's convention, ``reduction="sum"``), whatever the peer's own
convention; docs/peers.md lists the conversions. Each peer is imported inside its function,
so a missing peer only fails the calls that need it (``available()`` says which are there).
"""

from __future__ import annotations

import copy
import importlib.util

import torch
from torch import nn

from .models import flat

PEERS = {"backpack": "backpack", "nngeometry": "nngeometry", "curvlinops": "curvlinops"}


def available(peer: str) -> bool:
    return importlib.util.find_spec(PEERS[peer]) is not None


def _loss(likelihood: str) -> nn.Module:
    return nn.CrossEntropyLoss(reduction="sum") if likelihood == "softmax" else nn.BCEWithLogitsLoss(reduction="sum")


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- BackPACK


def backpack_diag(model, x, y, *, likelihood="softmax", mc_samples=None, reduction="sum", seed=0):
    """BackPACK ``DiagGGNExact`` (``mc_samples=None``) or ``DiagGGNMC(mc_samples)``.

    BackPACK returns the GGN of the loss as given: with ``reduction="sum"`` that is fisherlib's
    sum; with ``"mean"`` it is divided by N (returned as BackPACK gives it, for the test of
    that factor). The model and loss are extended on a deep copy, so ``model`` keeps no hooks.
    """
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC

    m = extend(copy.deepcopy(model))
    loss_fn = nn.CrossEntropyLoss(reduction=reduction) if likelihood == "softmax" else nn.BCEWithLogitsLoss(reduction=reduction)
    loss_fn = extend(loss_fn)
    ext = DiagGGNExact() if mc_samples is None else DiagGGNMC(mc_samples=mc_samples)
    torch.manual_seed(seed)
    loss = loss_fn(m(x), y)
    with backpack(ext):
        loss.backward()
    attr = "diag_ggn_exact" if mc_samples is None else "diag_ggn_mc"
    return flat([getattr(p, attr) for p in _params(m)])


# --------------------------------------------------------------------------- nngeometry


def nngeometry_diag(model, x, *, likelihood="softmax", trials=None, seed=0, as_given=False):
    """nngeometry ``FIM`` (closed form, ``trials=None``) or ``FIM_MonteCarlo(trials)`` with ``PMatDiag``.

    nngeometry averages over the examples (divides by N); this returns the sum (times N) unless
    ``as_given``. Its closed form adds ``torch.finfo().eps`` of the *default* dtype to a
    denominator and builds a triangular matrix in the default dtype, so for a float64 model the
    default dtype is set to float64 for the call (float32's eps would perturb the result by
    ~1e-7 relative and the float32 matrix would not multiply a float64 one).
    """
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatDiag

    variant = "classif_logits" if likelihood == "softmax" else "classif_binary_logits"
    old = torch.get_default_dtype()
    torch.set_default_dtype(x.dtype)
    try:
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.clone()), batch_size=len(x))
        if trials is None:
            pm = FIM(model, loader, PMatDiag, variant=variant, device=str(x.device))
        else:
            if likelihood != "softmax":
                raise ValueError("nngeometry's FIM_MonteCarlo has no binary-logits variant")
            pm = FIM_MonteCarlo(model, loader, PMatDiag, variant=variant, trials=trials, device=str(x.device))
        d = pm.get_diag()
    finally:
        torch.set_default_dtype(old)
    # nngeometry orders its diagonal by layer (weight, then bias), which for nn.Sequential of
    # Linear/Conv2d layers is named_parameters() order; the agreement tests check it entry by entry.
    return d if as_given else d * len(x)


# --------------------------------------------------------------------------- curvlinops


def curvlinops_operator(model, x, y, *, likelihood="softmax", reduction="sum"):
    from curvlinops import GGNLinearOperator

    loss_fn = nn.CrossEntropyLoss(reduction=reduction) if likelihood == "softmax" else nn.BCEWithLogitsLoss(reduction=reduction)
    return GGNLinearOperator(model, loss_fn, _params(model), [(x, y)], check_deterministic=False)


def column_step(P: int) -> int:
    """Identity columns per ``G @ E`` call: at most 256, and E (P × step) under 2^24 entries."""
    return max(1, min(256, (1 << 24) // P))


def curvlinops_exact_diag(model, x, y, *, likelihood="softmax", reduction="sum", columns=None):
    """The exact GGN diagonal from ``GGNLinearOperator`` applied to identity columns.

    curvlinops 3 has no dedicated exact-diagonal routine: the exact diagonal costs P matrix-
    vector products (each a JVP, a loss Hessian product and a VJP over the whole batch).
    ``columns`` (start indices of ``column_step(P)``-column chunks) lets the benchmark time a few.
    """
    G = curvlinops_operator(model, x, y, likelihood=likelihood, reduction=reduction)
    P = G.shape[0]
    out = torch.empty(P, dtype=x.dtype, device=x.device)
    step = column_step(P)
    for i in (columns if columns is not None else range(0, P, step)):
        j = min(i + step, P)
        E = torch.zeros(P, j - i, dtype=x.dtype, device=x.device)
        E[torch.arange(i, j), torch.arange(j - i)] = 1
        out[i:j] = (G @ E)[torch.arange(i, j), torch.arange(j - i)]
    return out


def curvlinops_hutchinson_diag(model, x, y, *, likelihood="softmax", num_matvecs=1, seed=0):
    """curvlinops ``hutchinson_diag(GGN, num_matvecs)``: Rademacher v ⊙ (G v), averaged."""
    from curvlinops import hutchinson_diag

    torch.manual_seed(seed)
    G = curvlinops_operator(model, x, y, likelihood=likelihood)
    return hutchinson_diag(G, num_matvecs=num_matvecs)



# --------------------------------------------------------------------------- Kronecker factors


def curvlinops_kfac_dense(model, x, y, *, fisher_type="type-2", kfac_approx="expand", ekfac=False,
                          batch_size=None):
    """curvlinops' ``KFACLinearOperator`` (or ``EKFACLinearOperator``) as a dense matrix, in
    ``model.parameters()`` order, weight and bias in one Kronecker block, summed over inputs."""
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    params = _params(model)
    n = batch_size or len(x)
    data = [(x[i:i + n], y[i:i + n]) for i in range(0, len(x), n)]
    op = (EKFACLinearOperator if ekfac else KFACLinearOperator)(
        model, _loss("softmax"), params, data, fisher_type=fisher_type, kfac_approx=kfac_approx,
        separate_weight_and_bias=False, check_deterministic=False)
    return op @ torch.eye(op.shape[0], dtype=x.dtype)


def nngeometry_kfac_dense(model, x, *, ekfac=False, batch_size=None):
    """nngeometry's ``PMatKFAC`` (or ``PMatEKFAC`` with its diagonal re-fitted) from the closed-form
    ``FIM``, as a dense matrix summed over inputs (nngeometry averages: times N)."""
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatEKFAC, PMatKFAC

    dtype = torch.get_default_dtype()
    torch.set_default_dtype(x.dtype)  # its closed form builds helper matrices in the default dtype
    try:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch_size or len(x))
        pm = FIM(model, loader, PMatEKFAC if ekfac else PMatKFAC, variant="classif_logits", device=str(x.device))
        if ekfac:
            pm.update_diag(loader)
        return pm.to_torch(split_weight_bias=True) * len(x)
    finally:
        torch.set_default_dtype(dtype)
