"""Plumbing the adapters share: nested-container trees, argument checks, the batch-norm warning.

Nothing here imports a framework or does mathematics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

Array = Any
Tree = Any

DISTS = ("rademacher", "gaussian", "uniform")


def draw(rng, shape, dist: str, dtype, int8):
    """Draw ``dist`` from a NumPy-style Generator (numpy's or CuPy's, which share the API)."""
    if dist == "rademacher":
        return (rng.integers(0, 2, size=shape, dtype=int8) * 2 - 1).astype(dtype)
    if dist == "gaussian":
        return rng.standard_normal(size=shape, dtype=dtype)
    return rng.random(size=shape, dtype=dtype)


class BatchNormWarning(UserWarning):
    """A model in training mode normalises with batch statistics, which couple its inputs."""

    __module__ = "fisherlib.backends"


# -- trees of nested dicts, lists and tuples ---------------------------------------------------


def flatten(tree: Tree, is_leaf: Callable[[Any], bool]) -> tuple[list[str], list[Array]]:
    """Names and leaves of a nested dict / list / tuple tree, depth first in container order.

    Names join the keys and indices with ``"."``: ``{"0": {"weight": w}}`` -> ``"0.weight"``,
    ``{"0.weight": w}`` -> ``"0.weight"``, ``[w, b]`` -> ``"0"``, ``"1"``. Entries that are not
    leaves (``None``, numbers, strings) are skipped and kept as they are by :func:`unflatten`.
    """
    names: list[str] = []
    leaves: list[Array] = []

    def walk(node, prefix):
        if is_leaf(node):
            names.append(prefix)
            leaves.append(node)
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}" if prefix else str(i))

    walk(tree, "")
    return names, leaves


def unflatten(tree: Tree, leaves: list[Array], is_leaf: Callable[[Any], bool]) -> Tree:
    """A tree shaped like ``tree`` with its leaves replaced, in :func:`flatten` order."""
    it = iter(leaves)

    def build(node):
        if is_leaf(node):
            return next(it)
        if isinstance(node, Mapping):
            items = [(k, build(v)) for k, v in node.items()]
            return dict(items) if type(node) is dict else _rebuild(node, items)
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # namedtuple
            return type(node)(*[build(v) for v in node])
        if isinstance(node, (list, tuple)):
            return type(node)(build(v) for v in node)
        return node

    out = build(tree)
    rest = sum(1 for _ in it)
    if rest:
        raise ValueError(f"leaves: {rest} more leaves than the tree has")
    return out


def _rebuild(node: Mapping, items):
    try:
        return type(node)(items)
    except TypeError:  # a mapping type without a plain constructor
        return dict(items)


# -- model outputs and inputs ------------------------------------------------------------------


def logits_of(out: Any, output: Callable[[Any], Array] | None = None) -> Array:
    """The logits in a model's output: ``output(out)`` when given; else ``out`` itself when it
    is an array, its ``.logits`` (a HuggingFace ``ModelOutput``), or its ``"logits"`` entry.

    Applied inside the differentiated function, so any output object works.
    """
    if output is not None:
        return output(out)
    if hasattr(out, "shape") and hasattr(out, "dtype"):
        return out
    found = getattr(out, "logits", None)
    if found is None and isinstance(out, Mapping):
        found = out.get("logits")
    if found is not None:
        return found
    raise TypeError(
        f"model: returned a {type(out).__module__}.{type(out).__qualname__}; expected logits, an "
        "output with a .logits attribute (HuggingFace) or a dict with a 'logits' entry. Pass "
        "fisher(..., logits=lambda out: ...) to say where the logits are"
    )


def call_args(inputs: Any) -> tuple[tuple, dict]:
    """How a module takes a batch: a dict as keyword arguments, a tuple as positional ones,
    anything else as its one argument."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple) and not hasattr(inputs, "_fields"):
        return inputs, {}
    return (inputs,), {}


# -- checks at the adapter boundary ------------------------------------------------------------


def check_ct(ct: Array, logits_shape: tuple[int, ...]) -> bool:
    """Validate a cotangent against the logits' shape; True when it has a leading probe axis."""
    shape = tuple(ct.shape)
    if shape == tuple(logits_shape):
        return False
    if len(shape) == len(logits_shape) + 1 and shape[1:] == tuple(logits_shape):
        return True
    raise ValueError(
        f"ct: expected the logits' shape {tuple(logits_shape)} or (K, *{tuple(logits_shape)}), got {shape}"
    )


def check_per_example_ct(cotangents: Array, n: int) -> None:
    shape = tuple(cotangents.shape)
    if len(shape) < 3 or shape[1] != n:
        raise ValueError(f"cotangents: expected shape (K, N={n}, ..., C), got {shape}")


def check_dist(dist: str) -> str:
    if dist not in DISTS:
        raise ValueError(f"dist: expected one of {DISTS}, got {dist!r}")
    return dist


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed}")
    return seed


def check_shape(shape: Any) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape: expected a tuple of ints, got {shape!r}") from None
