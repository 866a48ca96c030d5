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
  Cramér–Rao argument, and the symmetric uniform quantizer they assume;
- :func:`fisher_merge`, :func:`average_merge`, :func:`task_arithmetic_merge`: merging models
  with per-parameter Fisher weights (Matena & Raffel 2022) and its two baselines.

The page docs/using-the-fisher.md measures, on real data, which estimator each use needs.
"""

from .ewc import EWC, ewc_gradient, ewc_penalty
from .merging import average_merge, fisher_merge, task_arithmetic_merge
from .pruning import apply_mask, magnitude_mask, prune_mask, sparsity_of
from .quantization import allocate_bits, distortion, quantize
from .scores import Sensitivity, saliency, sensitivity

__all__ = ["EWC", "Sensitivity", "allocate_bits", "apply_mask", "average_merge", "distortion",
           "ewc_gradient", "ewc_penalty", "fisher_merge", "magnitude_mask", "prune_mask", "quantize",
           "saliency", "sensitivity", "sparsity_of", "task_arithmetic_merge"]
