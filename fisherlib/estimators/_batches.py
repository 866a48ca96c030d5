"""Batches as trees of arrays: reading what the user passes, counting and slicing inputs.

A batch's inputs are an array or a tree of arrays: a dict (what tokenizers and most
DataLoaders give, passed to an ``nn.Module`` as keyword arguments), a tuple (positional
arguments), a list, nested. Every array leaf has the inputs along its first axis; entries
that are not arrays (``None``, numbers, strings) are carried along unchanged. Nothing here
imports a framework: leaves are sliced with ``x[i:j, ...]``, which every Array API namespace
(array_api_strict included) supports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

Array = Any
Tree = Any

__all__ = ["batches", "is_array", "leaves_of", "map_tree", "n_of", "signature", "slice_tree"]


def is_array(x: Any) -> bool:
    """An array leaf: anything with a ``shape`` and a ``dtype`` (NumPy, torch, JAX, CuPy, ...)."""
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)


def map_tree(f: Callable[[Array], Array], tree: Tree) -> Tree:
    """``tree`` with ``f`` applied to every array leaf; dicts stay dicts (a mapping type without
    a plain constructor, such as a tokenizer's ``BatchEncoding``, becomes a ``dict``)."""
    if is_array(tree):
        return f(tree)
    if isinstance(tree, Mapping):
        items = [(k, map_tree(f, v)) for k, v in tree.items()]
        if type(tree) is dict:
            return dict(items)
        try:
            return type(tree)(items)
        except TypeError:
            return dict(items)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*[map_tree(f, v) for v in tree])
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tree(f, v) for v in tree)
    return tree


def leaves_of(tree: Tree) -> list[Array]:
    """The array leaves of ``tree``, depth first in container order."""
    out: list[Array] = []
    map_tree(lambda x: out.append(x) or x, tree)
    return out


def signature(tree: Tree) -> tuple | None:
    """What a compiled function's output shapes can depend on: the containers (types, keys) and
    every array leaf's shape and dtype, hashable; None when a leaf is not an array or ``None``
    (a number or a string may change what the function computes)."""
    if tree is None:
        return ("None",)
    if is_array(tree):
        return (tuple(tree.shape), str(tree.dtype))
    if isinstance(tree, Mapping):
        items = [(k, signature(v)) for k, v in tree.items()]
        ok = all(v is not None and isinstance(k, (str, int)) for k, v in items)
        return (type(tree).__name__, tuple(items)) if ok else None
    if isinstance(tree, (tuple, list)):
        items = [signature(v) for v in tree]
        return (type(tree).__name__, tuple(items)) if all(v is not None for v in items) else None
    return None


def n_of(tree: Tree, what: str = "inputs") -> int:
    """The number of inputs: the common length of the first axis of every array leaf.

    Raises ValueError when ``tree`` holds no array or its leaves disagree.
    """
    leaves = leaves_of(tree)
    if not leaves:
        raise ValueError(f"{what}: expected an array or a tree (dict, tuple, list) of arrays, "
                         f"got {_describe(tree)}")
    sizes = {tuple(x.shape)[:1] for x in leaves}
    if len(sizes) != 1 or () in sizes:
        shapes = [tuple(x.shape) for x in leaves]
        raise ValueError(f"{what}: every array must hold the inputs along its first axis; got shapes {shapes}")
    return int(leaves[0].shape[0])


def slice_tree(tree: Tree, i: int, j: int) -> Tree:
    """Inputs ``i..j-1`` of a batch: ``x[i:j, ...]`` on every array leaf of ``tree``."""
    return map_tree(lambda x: x[i:j, ...], tree)


def batches(items: Any, labels: str | None = "labels") -> Iterator[tuple[Tree, Any]]:
    """Yield ``(inputs, labels or None)`` for every batch of ``items``.

    ``items`` is one batch (an array, or a dict of arrays) or an iterable of batches, each an
    array, a dict, or an ``(inputs, labels)`` pair whose inputs may be a tree (``((x1, x2), y)``).
    From a dict the entry named ``labels`` (when not None) is taken out as the labels, so that
    the model does not receive it.
    """
    if labels is not None and not isinstance(labels, str):
        raise TypeError(f"labels: expected the name of the labels' entry in dict batches (a str) or None, "
                        f"got {type(labels).__name__}")
    if is_array(items) or isinstance(items, Mapping):
        items = [items]
    elif _is_one_pair(items):
        raise TypeError(
            "batches: got one (inputs, labels) pair, which would be read as two batches of inputs; "
            "pass a list of pairs, [(inputs, labels)], or an iterable of them (a DataLoader)")
    elif not isinstance(items, Iterable):
        raise TypeError(f"batches: expected an array, a dict of arrays or an iterable of batches, "
                        f"got {type(items).__name__}")
    for b, item in enumerate(items):
        if isinstance(item, Mapping):
            inputs, y = _pop(item, labels)
        elif isinstance(item, (tuple, list)) and not hasattr(item, "_fields"):
            if len(item) != 2:
                raise ValueError(f"batches: batch {b} is a {len(item)}-tuple; expected inputs or an "
                                 "(inputs, labels) pair (several inputs go in a tuple: ((x1, x2), labels))")
            inputs, y = item
            if isinstance(inputs, Mapping):
                inputs, found = _pop(inputs, labels)
                y = y if y is not None else found
        else:
            inputs, y = item, None
        n_of(inputs, f"batches: batch {b} inputs")
        yield inputs, y


def _pop(d: Mapping, key: str | None) -> tuple[dict, Any]:
    inputs = dict(d)  # a plain dict: a torch or JAX tree, whatever mapping type held it
    return inputs, (inputs.pop(key, None) if key is not None else None)


def _is_one_pair(items: Any) -> bool:
    """A tuple ``(inputs, labels)`` given where an iterable of batches was expected."""
    if not (isinstance(items, tuple) and len(items) == 2) or hasattr(items, "_fields"):
        return False
    x, y = items
    if not is_array(y) or not (is_array(x) or isinstance(x, (Mapping, tuple))):
        return False
    try:
        n = n_of(x)
    except ValueError:
        return False
    if isinstance(x, (Mapping, tuple)):
        return y.ndim >= 1 and y.shape[0] == n
    # Two arrays: labels have the inputs' length and fewer axes, or an integer dtype.
    integral = "int" in str(y.dtype) or "bool" in str(y.dtype)
    return y.ndim >= 1 and y.shape[0] == n and (y.ndim < x.ndim or integral)


def _describe(x: Any) -> str:
    if isinstance(x, Mapping):
        return f"a {type(x).__name__} with keys {list(x)[:8]} and no arrays"
    return f"a {type(x).__module__}.{type(x).__qualname__}"
