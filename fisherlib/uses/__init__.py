"""What the Fisher is for: sensitivity, pruning, continual learning (EWC) and quantization.

Framework-neutral functions on :class:`~fisherlib.FisherEstimate` objects (diagonal) and
parameter trees of any backend (a torch module or tree, a JAX pytree, NumPy dicts):

- :func:`sensitivity`, :func:`saliency`: F_ii and ½ F_ii θ_i² per parameter and per layer,
  with standard errors;
- :func:`prune_mask`, :func:`magnitude_mask`, :func:`apply_mask`: optimal-brain-damage
  pruning at a target sparsity, global or per layer, and the magnitude baseline;
- :class:`EWC`, :func:`ewc_penalty`, :func:`ewc_gradient`: elastic weight consolidation over
  several tasks, differentiable in torch and JAX losses;
- :func:`allocate_bits`, :func:`quantize`: per-layer bit widths for an average budget from the
  Cramér–Rao argument, and the symmetric uniform quantizer they assume.

The page docs/using-the-fisher.md measures, on real data, which estimator each use needs.
"""

from .ewc import EWC, ewc_gradient, ewc_penalty
from .pruning import apply_mask, magnitude_mask, prune_mask, sparsity_of
from .quantization import allocate_bits, distortion, quantize
from .scores import Sensitivity, saliency, sensitivity

__all__ = ["EWC", "Sensitivity", "allocate_bits", "apply_mask", "distortion", "ewc_gradient",
           "ewc_penalty", "magnitude_mask", "prune_mask", "quantize", "saliency", "sensitivity",
           "sparsity_of"]
