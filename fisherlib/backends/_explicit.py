"""Adapter base for models that state their own VJP (NumPy and CuPy have no autodiff).

The model is any object with ``forward(params, x)`` and ``vjp(params, x, ct)``, optionally
``per_example_vjp(params, x, ct)`` and ``linearize(params, x)`` (see :mod:`fisherlib.models`).
Parameter trees are nested dicts / lists / tuples of arrays.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, is_array_api_obj

from ._common import check_ct, check_per_example_ct, flatten, unflatten

Array = Any
Tree = Any

__all__ = ["ExplicitBackend", "check_explicit_model"]


def check_explicit_model(model: Any, backend: str) -> None:
    """TypeError unless ``model`` has ``forward`` and ``vjp`` methods."""
    if not (callable(getattr(model, "forward", None)) and callable(getattr(model, "vjp", None))):
        raise TypeError(
            f"model: the {backend} backend needs a model with forward(params, x) and "
            f"vjp(params, x, ct) (see fisherlib.models), got {type(model).__module__}."
            f"{type(model).__qualname__}; for a torch or JAX model use the 'torch' or 'jax' backend"
        )


def is_leaf(x: Any) -> bool:
    return is_array_api_obj(x)


class ExplicitBackend:
    """Explicit-VJP models over any Array API namespace; subclasses supply :meth:`probes`."""

    name = "explicit"

    def linearize(self, model: Any, params: Tree, inputs: Array):
        """Run ``model`` once: (logits, ``vjp``).

        Parameters
        ----------
        model : explicit-VJP model
            ``forward(params, x)`` and ``vjp(params, x, ct)``; a ``linearize(params, x)`` method,
            when present, is used so that the vjp reuses the forward pass's activations.
        params : tree of arrays
            Nested dicts / lists / tuples.
        inputs : array (N, ...)

        Returns
        -------
        logits : array (N, ..., C)
        vjp : callable
            ``vjp(ct)`` with ``ct`` shaped like the logits returns a tree shaped like ``params``;
            with a leading axis K, ``(K, *logits.shape)``, every leaf gains that axis and the
            model computes all K products in one call.
        """
        check_explicit_model(model, self.name)
        lin = getattr(model, "linearize", None)
        if callable(lin):
            logits, pull = lin(params, inputs)
        else:
            logits = model.forward(params, inputs)

            def pull(ct):
                return model.vjp(params, inputs, ct)

        shape = tuple(logits.shape)

        def vjp(ct: Array) -> Tree:
            check_ct(ct, shape)
            return pull(ct)

        return logits, vjp

    def per_example_vjp(self, model: Any, params: Tree, inputs: Array, cotangents: Array) -> Tree:
        """Per-input VJPs: ``cotangents`` (K, N, ..., C) -> leaves (K, N, *leaf.shape).

        Uses ``model.per_example_vjp`` when the model has one; otherwise one ``model.vjp`` per
        input (correct, but N calls).
        """
        check_explicit_model(model, self.name)
        n = inputs.shape[0]
        check_per_example_ct(cotangents, n)
        own = getattr(model, "per_example_vjp", None)
        if callable(own):
            return own(params, inputs, cotangents)
        rows = [flatten(model.vjp(params, inputs[i:i + 1, ...], cotangents[:, i:i + 1, ...]), is_leaf)[1]
                for i in range(n)]
        _, first = flatten(params, is_leaf)
        xp = array_namespace(*first)
        stacked = [xp.stack([r[j] for r in rows], axis=1) for j in range(len(first))]
        return unflatten(params, stacked, is_leaf)

    def leaves(self, tree: Tree) -> list[tuple[str, Array]]:
        """Named leaves: keys and indices joined by ``"."`` (``{"0.weight": w}`` -> ``"0.weight"``)."""
        names, leaves = flatten(tree, is_leaf)
        return list(zip(names, leaves))

    def unflatten(self, tree: Tree, leaves: list[Array]) -> Tree:
        """A tree shaped like ``tree`` (nested dicts / lists / tuples) holding ``leaves``."""
        leaves = list(leaves)
        n = len(flatten(tree, is_leaf)[1])
        if len(leaves) != n:
            raise ValueError(f"leaves: the tree has {n} leaves, got {len(leaves)}")
        return unflatten(tree, leaves, is_leaf)

    def __repr__(self) -> str:
        return f"<fisherlib backend {self.name!r}>"

    def jvp(self, model: Any, params: Tree, inputs: Array, tangents: Tree) -> Array:
        """J t: the logits' change along ``tangents`` (shaped like ``params``, or leaves (K, ...)).

        Uses the model's own ``jvp(params, x, tangent)``; a model without one raises
        NotImplementedError (:mod:`fisherlib.spectral` then falls back to pulling back the C
        one-hot cotangents of every input).

        Returns
        -------
        array shaped like the logits, or (K, *logits.shape) for stacked tangents
        """
        check_explicit_model(model, self.name)
        own = getattr(model, "jvp", None)
        if not callable(own):
            raise NotImplementedError(
                f"model: {type(model).__qualname__} states no jvp(params, x, tangent); add one for "
                "matrix-free Fisher-vector products (see fisherlib.models)"
            )
        return own(params, inputs, tangents)
