"""Small torch models and data shared by the peer agreement tests and ``benchmarks/peers``.

Every peer is called through one wrapper in :mod:`tests.peers.peer_calls`, so the benchmark
times exactly the calls whose numbers the agreement tests check.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(sizes=(6, 8, 5), *, seed=0, dtype=torch.float64) -> nn.Sequential:
    """Linear-Tanh-...-Linear; ``sizes`` = (inputs, hidden..., classes)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers).to(dtype).eval()


def cnn(in_shape=(2, 6, 6), channels=(3,), classes=5, *, seed=0, dtype=torch.float64) -> nn.Sequential:
    """(Conv 3x3 pad 1, ReLU, MaxPool 2) per entry of ``channels``, then Flatten and Linear."""
    torch.manual_seed(seed)
    c, h, w = in_shape
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, classes)]
    return nn.Sequential(*layers).to(dtype).eval()


def inputs(shape, n, *, seed=1, dtype=torch.float64, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn((n, *shape), generator=g, dtype=dtype)


def labels(n, classes, *, seed=2, multilabel=False, dtype=torch.float64) -> torch.Tensor:
    """Class indices (CrossEntropyLoss) or 0/1 targets (BCEWithLogitsLoss); curvature ignores them."""
    g = torch.Generator().manual_seed(seed)
    if multilabel:
        return torch.randint(0, 2, (n, classes), generator=g).to(dtype)
    return torch.randint(0, classes, (n,), generator=g)


def flat(tree_or_list) -> torch.Tensor:
    """One vector from a {name: tensor} dict (in insertion order) or a list of tensors."""
    items = tree_or_list.values() if isinstance(tree_or_list, dict) else tree_or_list
    return torch.cat([t.reshape(-1) for t in items])
