"""The adapter protocol: all that fisherlib needs from an array framework.

An adapter runs the user's model, pulls cotangents back to parameter space (vector-Jacobian
products), draws seeded random probes, and walks parameter trees. It does no mathematics: no
softmax, no probe algebra, no accumulation (design.md, "The adapter protocol").
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

Array = Any
Tree = Any

__all__ = ["Backend", "VJP"]

VJP = Callable[[Array], Tree]
"""``vjp(ct)``: ct has the logits' shape (..., C), or a leading probe axis (K, ..., C).

Returns a gradient tree shaped like ``params``; with a leading probe axis, every leaf gains that
leading axis of size K, and all K products are computed in one framework call where possible.
"""


@runtime_checkable
class Backend(Protocol):
    """What an adapter provides. ``name`` is how users and the registry refer to it.

    An adapter whose models may own their parameters (called with ``params=None``, as a torch
    ``nn.Module``) can also define ``parameters(model, params) -> tree``: ``params``, or the
    model's own parameters. It is optional (not part of the ``isinstance`` check): without it,
    fisherlib learns the tree from one extra pull-back of zeros.

    Also optional: ``jvp(model, params, inputs, tangents) -> J t``, shaped like the logits (a
    leading K when every leaf of ``tangents`` has one), for the products F v of
    :mod:`fisherlib.spectral`, which falls back to per-example VJPs without it.

    Also optional: ``compile(fn, *, key=None) -> fn'``, a compiler for pure array functions
    (JAX: ``jax.jit``). With it :func:`~fisherlib.fisher` and
    :class:`~fisherlib.estimators.RunningFisher` run each batch's whole step (forward or layer
    I/O, cotangents, pullback, reduction) as one compiled call, and the estimate it returns
    reads its value and standard error in one; ``key`` (hashable: the model, the options)
    caches the compiled function, so that an equal key returns the first one's.
    Without it they run the same code eagerly. The step must trace: no values read on the host.

    Optional execution hints (no mathematics; estimators read them with ``getattr``):

    - ``vjp_fresh = True``: every array ``vjp`` returns is newly allocated, so an estimator may
      overwrite it (square a probe gradient in place instead of allocating g²). Absent or
      False for user-written models, whose VJPs may return arrays they keep;
    - ``vjp.frees_graph = True`` (an attribute of the returned ``vjp``): ``vjp(ct, last=True)``
      may free the forward's saved state as its backward passes it, after which ``vjp`` is
      not called again; an estimator's last pull-back of a batch asks for it, so that its
      peak memory is a training step's (the torch adapter: ``docs/language-models.md``);
    - ``probe_rows(seed, shape, dist, like) -> rows``: ``rows(a, b)`` gives
      ``probes(seed, shape, dist, like)[:, a:b]`` (the same values) and ``rows.shape`` is
      ``shape``, without holding the whole draw; the Hutchinson cotangent then forms its probes
      a chunk of rows at a time (a language model's (K, N·T, V) signs; the torch adapter keeps
      them as random bits). Used only where the class that defines it also defines ``probes``;
    - ``batched(like) -> bool``: whether K cotangents on ``like``'s device are faster pulled
      back in one call (True, the default when absent) or one call each
      (:class:`~fisherlib.estimators.RunningFisher` then never stacks the K + 1 gradients).
    """

    name: str

    def linearize(self, model: Any, params: Tree, inputs: Any) -> tuple[Array, VJP]:
        """Run the model once: (detached logits with a trailing class axis, vjp)."""
        ...

    def per_example_vjp(self, model: Any, params: Tree, inputs: Any, cotangents: Array) -> Tree:
        """Per-input VJPs: ``cotangents`` (K, N, C) for N inputs -> leaves (K, N, *leaf.shape).

        Row n of the result is J_nᵀ ct[:, n], the product through input n alone. Optional:
        adapters without it raise NotImplementedError. The caller chunks the inputs.
        """
        ...

    def probes(self, seed: int, shape: tuple[int, ...], dist: str, like: Array) -> Array:
        """Random array of ``shape`` with ``like``'s dtype and device, reproducible from ``seed``.

        ``dist``: "rademacher" (±1), "gaussian" (N(0, 1)) or "uniform" ([0, 1)).
        """
        ...

    def leaves(self, tree: Tree) -> list[tuple[str, Array]]:
        """Named array leaves of a parameter (or gradient) tree, in a fixed order."""
        ...

    def unflatten(self, tree: Tree, leaves: list[Array]) -> Tree:
        """A tree shaped like ``tree`` holding ``leaves`` (in the order of :meth:`leaves`)."""
        ...
