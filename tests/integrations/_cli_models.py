"""Importable objects for the ``fisherlib fisher`` command's tests (``module:name`` specs)."""

import torch


def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
