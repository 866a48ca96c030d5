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

Supported: ``hessian_structure="diag"`` and ``"full"`` (exact dense F, small models), all
weights or the last layer (``subset_of_weights="last_layer"``, laplace's default) or a
subnetwork; models that take tensors or, as laplace-torch's HuggingFace convention has it, one
dict (``model(batch)``), whose logits may have positions (N, T, C) with -100 labels ignored.
``"kron"`` raises ``NotImplementedError``: the Kronecker factors are a separate estimate type
(K-FAC), and this class is where they plug in (:meth:`FisherlibCurvature.kron`).

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
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("fisherlib.integrations.laplace needs laplace-torch: "
                          "pip install 'fisherlib[laplace]'") from e

import fisherlib  # noqa: E402

__all__ = ["FisherlibCurvature", "curvature"]

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

    Notes
    -----
    Each batch costs what :func:`fisherlib.fisher` costs for it, plus one forward pass for the
    loss laplace records (Σ cross-entropy). "full" needs the dense P × P exact Fisher.
    """

    def __init__(self, model: torch.nn.Module, likelihood: str, last_layer: bool = False,
                 subnetwork_indices: torch.LongTensor | None = None, dict_key_x: str = "input_ids",
                 dict_key_y: str = "labels", *, method: str = "exact", probes: int = 1, seed: int = 0,
                 per_example: bool | None = None):
        if likelihood != "classification":
            raise ValueError(f"likelihood: fisherlib's curvature covers 'classification' only, got {likelihood!r}")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        # A GGN interface (the Fisher is the GGN of the softmax likelihood); "mc" is its stochastic form.
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y,
                         stochastic=method == "mc", num_samples=probes)
        self.method, self.probes, self.seed, self.per_example = method, probes, seed, per_example
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

    def kron(self, x: Any, y: torch.Tensor, N: int, **kwargs: Any):
        """Not yet: Kronecker factors are K-FAC's own estimate type; they plug in here."""
        raise NotImplementedError("hessian_structure='kron': fisherlib's Kronecker-factored Fisher is not "
                                  "available yet; use 'diag' or 'full' with this backend")

    # -- the estimate ---------------------------------------------------------------------------

    def _estimate(self, x, y, *, structure, blocks=None):
        model, inputs = self._model_and_inputs(x)
        names = names_of(self)
        with torch.no_grad():
            f = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            f = f.logits if hasattr(f, "logits") else f
            loss = self.factor * self.lossfunc(f.reshape(-1, f.shape[-1]), y.reshape(-1))
        est = fisherlib.fisher(model, None, [(inputs, y)], structure=structure, blocks=blocks,
                               method=self.method, probes=self.probes, seed=self.seed,
                               per_example=self.per_example, first_batch=self._batch, mask=None,
                               backend="torch")
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


def names_of(curv: CurvatureInterface) -> list[str]:
    """The parameter names that laplace's vector runs over, in its order."""
    if curv.last_layer:
        return [n for n, p in curv.model.last_layer.named_parameters() if p.requires_grad]
    return list(curv.params_dict)


def curvature(**options: Any) -> type[FisherlibCurvature]:
    """A :class:`FisherlibCurvature` subclass with ``options`` as defaults (for a ``backend=`` that
    needs no ``backend_kwargs``): ``Laplace(..., backend=curvature(method="hutchinson", probes=8))``."""
    unknown = sorted(set(options) - {"method", "probes", "seed", "per_example"})
    if unknown:
        raise TypeError(f"options: unknown {unknown}; expected method, probes, seed, per_example")
    if "method" in options and options["method"] not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {options['method']!r}")

    class _Bound(FisherlibCurvature):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**options, **kwargs})

    _Bound.__name__ = _Bound.__qualname__ = "FisherlibCurvature[" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + "]"
    return _Bound
