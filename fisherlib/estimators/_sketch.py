"""Sketch: a low-rank Fisher estimate F̂ = G Gᵀ / K kept as its factor G."""

from __future__ import annotations

import math
from typing import Any

from ..core._compat import array_namespace

Array = Any

# Largest P for which to_dense() builds the P x P matrix.
DENSE_LIMIT = 8192


class Sketch:
    """F̂ = scale · G Gᵀ / K, where column k of G is the k-th probe gradient flattened over the
    parameter leaves (in leaf order) and summed over every batch.

    Summing probe gradients across batches before the outer product stays unbiased (the probes
    of different inputs are independent), so memory does not grow with the data.
    """

    def __init__(self, leaves: dict[str, Array], scale: float = 1.0):
        self.leaves = leaves
        self.scale = scale
        first = next(iter(leaves.values()))
        self.n_probes = first.shape[0]
        self.size = sum(math.prod(x.shape[1:]) for x in leaves.values())

    def factor(self) -> Array:
        """G √(scale / K), shape (P, K): F̂ = factor @ factorᵀ."""
        xp = array_namespace(*self.leaves.values())
        cols = [xp.reshape(x, (x.shape[0], -1)) for x in self.leaves.values()]
        G = xp.concat(cols, axis=1)
        return xp.matrix_transpose(G) * math.sqrt(self.scale / self.n_probes)

    def matvec(self, v: Array) -> Array:
        """F̂ v for a flat vector ``v`` of length P (leaves flattened in order)."""
        if v.shape != (self.size,):
            raise ValueError(f"v: expected shape ({self.size},), got {tuple(v.shape)}")
        xp = array_namespace(v)
        G = self.factor()
        return xp.matmul(G, xp.matmul(xp.matrix_transpose(G), v))

    def trace(self) -> Array:
        """tr F̂ = ‖G‖²_F · scale / K."""
        xp = array_namespace(*self.leaves.values())
        return sum(xp.sum(x * x) for x in self.leaves.values()) * (self.scale / self.n_probes)

    def to_dense(self) -> Array:
        """The P x P matrix (refused above P = 8192)."""
        if self.size > DENSE_LIMIT:
            raise ValueError(
                f"to_dense: the sketch has P={self.size} parameters; a dense P x P matrix is "
                f"refused above P={DENSE_LIMIT}; use matvec or factor instead"
            )
        xp = array_namespace(*self.leaves.values())
        G = self.factor()
        return xp.matmul(G, xp.matrix_transpose(G))
