"""Block structure: how parameter leaves are grouped or split into dense Fisher blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

Array = Any

# Largest block size (side of a dense block) that "blocks" will hold.
MAX_BLOCK = 4096
# Largest number of entries of one leaf's blocks (units x size x size): 512 MB in float64.
MAX_ENTRIES = 1 << 26


@dataclass(frozen=True)
class Block:
    """One dense block family: ``leaves`` concatenated, optionally split per output unit.

    ``units`` > 1 means a block per unit (row of the first leaf, with the matching bias entry):
    the block array then has shape (units, size, size).
    """

    name: str
    leaves: tuple[int, ...]
    units: int
    size: int
    axis: int = 0  # the unit axis of the first leaf: 0 (torch's (out, in)) or -1 (flax's (in, out))


def plan(names: list[str], shapes: list[tuple[int, ...]], blocks) -> list[Block]:
    """Turn the user's ``blocks=`` argument into a list of :class:`Block`.

    ``None``: one block per leaf; a leaf larger than ``MAX_BLOCK`` gets a block per output
    unit instead (per row: a convolution's output channel, a linear layer's output), when
    those fit; otherwise a ValueError names the leaf. ``"unitwise"``: per output unit, a row of each weight matrix
    with its bias entry (Amari, Karakida & Oizumi's unit-wise Fisher). A sequence of groups of
    leaf names, or a dict {block name: group}: each group becomes one block, and every leaf not
    named stays a block of its own.
    """
    index = {n: i for i, n in enumerate(names)}
    if blocks is None:
        out = [_leaf_block(i, n, shapes[i]) for i, n in enumerate(names)]
    elif isinstance(blocks, str):
        if blocks != "unitwise":
            raise ValueError(f"blocks: expected None, 'unitwise', or groups of leaf names, got {blocks!r}")
        out = _unitwise(names, shapes)
    else:
        groups = blocks.items() if isinstance(blocks, dict) else ((None, g) for g in blocks)
        out, used = [], set()
        for label, group in groups:
            if isinstance(group, str):
                group = [group]
            group = list(group)
            for n in group:
                if n not in index:
                    raise ValueError(f"blocks: unknown parameter leaf {n!r}; the leaves are {names}")
                if n in used:
                    raise ValueError(f"blocks: leaf {n!r} appears in two blocks")
                used.add(n)
            ids = tuple(index[n] for n in group)
            out.append(Block(label or "+".join(group), ids, 1, sum(math.prod(shapes[i]) for i in ids)))
        out += [Block(n, (i,), 1, math.prod(shapes[i])) for i, n in enumerate(names) if n not in used]
    for b in out:
        if b.size > MAX_BLOCK or b.units * b.size ** 2 > MAX_ENTRIES:
            what = f"{b.units} blocks of size {b.size}" if b.units > 1 else f"size {b.size}"
            advice = ("name smaller groups in blocks=" if len(b.leaves) > 1 else
                      "its rows are too long for dense blocks" if b.units > 1 else
                      "a vector this long has no smaller units")
            raise ValueError(
                f"blocks: block {b.name!r} has {what} ({b.units * b.size ** 2} entries); blocks larger "
                f"than {MAX_BLOCK} or {MAX_ENTRIES} entries per leaf are refused ({advice}). Use "
                "structure='diag' for it, or leave it out: a dict params= of the other leaves"
            )
    return out


def _leaf_block(i: int, name: str, shape: tuple[int, ...]) -> Block:
    """The default block of a leaf: whole, or per output unit when whole is too large."""
    size = math.prod(shape)
    if size <= MAX_BLOCK or len(shape) < 2:
        return Block(name, (i,), 1, size)
    return Block(name, (i,), shape[0], math.prod(shape[1:]))


def _unitwise(names, shapes):
    from ._units import units  # the one rule that splits weights into units and finds their bias

    out, taken = [], set()
    for u in units(names, shapes):
        ids = (u.weight,) if u.bias is None else (u.weight, u.bias)
        taken.update(ids)
        out.append(Block(u.name, ids, u.units, u.size, u.axis))
    out += [Block(n, (i,), 1, math.prod(shapes[i])) for i, n in enumerate(names) if i not in taken]
    return out


def vectors(block: Block, grads: Sequence[Array], *, xp) -> Array:
    """Block vectors (K, M, units, size) from leaf gradients (K, M, *leaf.shape)."""
    parts = []
    for n, i in enumerate(block.leaves):
        g = grads[i]
        K, M = g.shape[0], g.shape[1]
        if n == 0 and block.axis != 0:  # a flax kernel's units are its last axis
            g = xp.moveaxis(g, -1, 2)
        parts.append(xp.reshape(g, (K, M, block.units, -1)))
    return xp.concat(parts, axis=-1) if len(parts) > 1 else parts[0]


def shapes_of(blocks: list[Block]) -> dict[str, tuple[int, ...]]:
    return {b.name: ((b.units,) if b.units > 1 else ()) + (b.size, b.size) for b in blocks}
