r"""fisherlib as a curvature backend of laplace-torch (``pip install 'fisherlib[laplace]'``).

laplace-torch (Daxberger et al., "Laplace Redux", NeurIPS 2021) fits a Gaussian posterior
N(θ_MAP, (H + P₀)⁻¹) around a trained network; a *curvature backend* gives H over the training
data. For a classifier with a cross-entropy loss the generalised Gauss–Newton is the Fisher,
H = Σ_x J_xᵀ (diag p − ppᵀ) J_x, which :func:`fisherlib.fisher` computes exactly or estimates::

    from laplace import Laplace
    from fisherlib.integrations.laplace import FisherlibCurvature

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                 backend=FisherlibCurvature)                      # exact diag GGN
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                 backend=FisherlibCurvature, backend_kwargs={"method": "hutchinson", "probes": 8})

Supported: ``hessian_structure="diag"``, ``"kron"`` (K-FAC, :meth:`FisherlibCurvature.kron`)
and ``"full"`` (exact dense F, small models); all weights or the last layer
(``subset_of_weights="last_layer"``, laplace's default), or a subnetwork ("diag" and "full");
models that take tensors or, as laplace-torch's HuggingFace convention has it, one dict
(``model(batch)``), whose logits may have positions (N, T, C) with -100 labels ignored::

    la = Laplace(model, "classification", hessian_structure="kron", backend=FisherlibCurvature,
                 backend_kwargs={"method": "hutchinson", "probes": 4, "kfac_approx": "expand"})

The estimators' cost, bias and variance are those of :func:`fisherlib.fisher` (``method``):
"exact" is the GGN laplace's own backends compute (C per-example VJPs per input, or one forward
and one batched backward through recognised layers); "hutchinson" with K probes costs K VJPs per
batch and is unbiased for diag H with coefficient of variation <= √(2/K) per entry; "mc" is
laplace's ``stochastic=True`` (sampled labels); "empirical" is its EF backends' Σ g gᵀ.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
from collections.abc import MutableMapping
from typing import Any

import torch


@contextlib.contextmanager
def _placeholder_torchvision():
    """Where a distribution named torchvision is installed but no ``torchvision`` module imports
    (an empty placeholder standing in for it, as in fisherlib's CPU test environment), torchmetrics
    (a laplace-torch dependency) trusts the distribution's metadata and fails at import. For the
    import only, report that distribution as missing, as its module is; otherwise do nothing."""
    try:
        importlib.metadata.version("torchvision")
        placeholder = importlib.util.find_spec("torchvision") is None
    except importlib.metadata.PackageNotFoundError:
        placeholder = False
    if not placeholder:
        yield
        return
    import lightning_utilities.core.imports as lu

    original = lu._version

    def version(name):
        if name == "torchvision":
            raise importlib.metadata.PackageNotFoundError(name)
        return original(name)

    lu._version = version
    try:
        yield
    finally:
        lu._version = original


with _placeholder_torchvision():
    try:
        from laplace.curvature import CurvatureInterface, GGNInterface
        from laplace.utils import Kron
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("fisherlib.integrations.laplace needs laplace-torch: "
                          "pip install 'fisherlib[laplace]'") from e

import fisherlib  # noqa: E402

__all__ = ["FisherlibCurvature", "curvature", "laplace_kron"]

METHODS = ("exact", "hutchinson", "mc", "empirical")


class FisherlibCurvature(GGNInterface):
    """A laplace-torch curvature backend whose H is fisherlib's Fisher (= the GGN for softmax).

    Parameters
    ----------
    model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y
        As laplace-torch passes them to every backend (``likelihood="classification"`` only:
        fisherlib's core spaces are the softmax simplex and the sigmoid hypercube).
    method : {"exact", "hutchinson", "mc", "empirical"}
        The estimator of :func:`fisherlib.fisher`; "exact" is laplace's exact GGN.
    probes : int
        K, for "hutchinson" and "mc".
    seed : int
        Seed of the random methods; batch b of a fit draws from (seed, b).
    per_example : bool, optional
        Per-example random estimates (lower variance, N times the VJPs).
    kfac_approx : {"expand", "reduce"}
        K-FAC's treatment of weight sharing (positions) for ``hessian_structure="kron"``; a
        ``kfac_approx`` in laplace's ``asdl_fisher_kwargs`` takes precedence, as for its
        curvlinops backend.

    Notes
    -----
    Each batch costs what :func:`fisherlib.fisher` costs for it, plus one forward pass for the
    loss laplace records (Σ cross-entropy). "full" needs the dense P × P exact Fisher; "kron"
    costs what ``fisher(structure="kfac")`` does: one forward with the layers' inputs kept, and
    per probe (C for "exact") one backward, with the factors' Σ x̃x̃ᵀ and Σ ggᵀ.
    """

    def __init__(self, model: torch.nn.Module, likelihood: str, last_layer: bool = False,
                 subnetwork_indices: torch.LongTensor | None = None, dict_key_x: str = "input_ids",
                 dict_key_y: str = "labels", *, method: str = "exact", probes: int = 1, seed: int = 0,
                 per_example: bool | None = None, kfac_approx: str = "expand"):
        if likelihood != "classification":
            raise ValueError(f"likelihood: fisherlib's curvature covers 'classification' only, got {likelihood!r}")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        # A GGN interface (the Fisher is the GGN of the softmax likelihood); "mc" is its stochastic form.
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y,
                         stochastic=method == "mc", num_samples=probes)
        if kfac_approx not in ("expand", "reduce"):
            raise ValueError(f"kfac_approx: expected 'expand' or 'reduce', got {kfac_approx!r}")
        self.method, self.probes, self.seed, self.per_example = method, probes, seed, per_example
        self.kfac_approx = kfac_approx
        self._batch = 0  # global index of the next batch: fresh probes for every batch of a fit

    # -- laplace-torch's interface ---------------------------------------------------------------

    def diag(self, x: Any, y: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ loss over the batch, diag H as one vector in laplace's parameter order)."""
        est, loss, names = self._estimate(x, y, structure="diag")
        value = est.value
        H = torch.cat([value[n].reshape(-1) for n in names])
        if self.subnetwork_indices is not None:
            H = H[self.subnetwork_indices]
        return loss, H.detach()

    def full(self, x: Any, y: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ loss, the dense P × P Fisher in laplace's parameter order): one block of all leaves."""
        if self.method != "exact":
            raise ValueError(f"method: hessian_structure='full' takes the exact Fisher, got method={self.method!r}")
        est, loss, names = self._estimate(x, y, structure="blocks", blocks={"all": names_of(self)})
        H = est.value["all"]
        if self.subnetwork_indices is not None:
            H = H[self.subnetwork_indices][:, self.subnetwork_indices]
        return loss, H.detach()

    def kron(self, x: Any, y: torch.Tensor, N: int, **kwargs: Any) -> tuple[torch.Tensor, Kron]:
        r"""(Σ loss, laplace's ``Kron``): the batch's K-FAC factors from ``fisher(structure="kfac")``.

        laplace sums the batches' factors separately, H ≈ (Σ_b G_b) ⊗ (Σ_b A_b), so each batch
        gives G_b = Σ g gᵀ (its output cotangents' sum) and A_b = (M_b / N) · mean x xᵀ (its inputs'
        mean weighted by its share of the N training inputs), as laplace's curvlinops backend
        does; the totals are then K-FAC's (Σ g gᵀ) ⊗ (mean x xᵀ) over the data. A weight's entry
        is [G, A] in its own axis order (torch's (out, in...) or HuggingFace Conv1D's (in, out)),
        its bias's is [A_bias · G] (the weight-bias cross term is dropped, as laplace's
        ``separate_weight_and_bias``), an embedding's [diag A, G]; a 1-d leaf no layer rule covers
        gives its dense diagonal [diag F]. Grouped convolutions and other uncovered leaves have
        no laplace form: a ValueError names them.
        """
        if self.subnetwork_indices is not None:
            raise ValueError("subnetwork_indices: hessian_structure='kron' covers whole layers; use 'diag' "
                             "or 'full' for a subnetwork")
        approx = kwargs.get("kfac_approx", self.kfac_approx)
        if approx not in ("expand", "reduce"):
            raise ValueError(f"kfac_approx: expected 'expand' or 'reduce', got {approx!r}")
        est, loss, names = self._estimate(x, y, structure="kfac", kfac_approx=approx)
        like = next(p for p in self.model.parameters())
        kfacs = laplace_kron(est, names, share=est.n_inputs / N)
        kfacs = [[f.to(device=like.device, dtype=like.dtype) for f in entry] for entry in kfacs]
        return loss, Kron(kfacs)

    # -- the estimate ---------------------------------------------------------------------------

    def _estimate(self, x, y, *, structure, blocks=None, **options):
        model, inputs = self._model_and_inputs(x)
        names = names_of(self)
        with torch.no_grad():
            f = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            f = f.logits if hasattr(f, "logits") else f
            loss = self.factor * self.lossfunc(f.reshape(-1, f.shape[-1]), y.reshape(-1))
        est = fisherlib.fisher(model, None, [(inputs, y)], structure=structure, blocks=blocks,
                               method=self.method, probes=self.probes, seed=self.seed,
                               per_example=self.per_example, first_batch=self._batch, mask=None,
                               backend="torch", **options)
        self._batch += 1
        return est, loss.detach(), names

    def _model_and_inputs(self, x):
        if self.last_layer:  # the last layer on the features, which do not depend on its weights
            with torch.no_grad():
                _, phi = self.model.forward_with_features(x)
            return self.model.last_layer, phi.detach()
        if isinstance(x, MutableMapping):  # laplace's HuggingFace convention: model(batch)
            return self.model, (x,)
        return self.model, x


def laplace_kron(est: fisherlib.KroneckerEstimate, names: list[str], *, share: float = 1.0) -> list[list[torch.Tensor]]:
    """laplace's ``Kron.kfacs`` for ``names`` (its parameter order) from a K-FAC estimate, A
    scaled by ``share`` (:meth:`FisherlibCurvature.kron`)."""
    factors, values = est.factors, est.value
    by_leaf = {leaf: (b, role) for b in est.blocks for role, leaf in b.leaves.items()}
    kfacs = []
    for name in names:
        if name not in by_leaf:
            d = values[name]
            if d.ndim != 1:
                raise ValueError(f"est: parameter {name!r} {tuple(d.shape)} has no Kronecker rule (its Fisher is "
                                 "a diagonal), which laplace's Kron cannot hold; fit it with 'diag', or only "
                                 "the layers fisherlib factors (subset_of_weights='last_layer')")
            kfacs.append([torch.diag(d)])
            continue
        b, role = by_leaf[name]
        if b.groups != 1:
            raise ValueError(f"est: {b.name!r} is a grouped convolution ({b.groups} groups); laplace's Kron "
                             "holds one pair of factors per parameter")
        A, G = factors[b.name]["A"], factors[b.name]["G"][0]
        if b.kind == "embedding":
            kfacs.append([torch.diag(A[0] * share), G])
        elif role == "bias":  # a single matrix: laplace adds the batches' as they are
            kfacs.append([A[0, -1, -1] * G])
        else:
            I = b.inputs - int("bias" in b.leaves)
            A = A[0, :I, :I] * share
            kfacs.append([G, A] if b.layout == "oi" else [A, G])
    return kfacs


def names_of(curv: CurvatureInterface) -> list[str]:
    """The parameter names that laplace's vector runs over, in its order."""
    if curv.last_layer:
        return [n for n, p in curv.model.last_layer.named_parameters() if p.requires_grad]
    return list(curv.params_dict)


def curvature(**options: Any) -> type[FisherlibCurvature]:
    """A :class:`FisherlibCurvature` subclass with ``options`` as defaults (for a ``backend=`` that
    needs no ``backend_kwargs``): ``Laplace(..., backend=curvature(method="hutchinson", probes=8))``."""
    unknown = sorted(set(options) - {"method", "probes", "seed", "per_example", "kfac_approx"})
    if unknown:
        raise TypeError(f"options: unknown {unknown}; expected method, probes, seed, per_example, kfac_approx")
    if "method" in options and options["method"] not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {options['method']!r}")

    class _Bound(FisherlibCurvature):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**options, **kwargs})

    _Bound.__name__ = _Bound.__qualname__ = "FisherlibCurvature[" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + "]"
    return _Bound
