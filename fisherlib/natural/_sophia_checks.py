"""Argument checks shared by the torch and optax forms of the Sophia-schedule preconditioner (no framework)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["UNUSED", "check_hyper"]

# NaturalGradient's / natural_gradient's options that have no meaning for preconditioner="sophia", and why.
UNUSED = {
    "damping": "the floor of the denominator is eps",
    "relative_damping": "the denominator is max(gamma * h, eps)",
    "adapt_damping": "there is no damping to adapt",
    "decay": "the Fisher's EMA decay is betas[1]",
    "momentum": "the gradient's EMA decay is betas[0]",
    "kl_clip": "every coordinate's step is clipped to lr by the rule itself",
    "unit_solve": "the preconditioner is diagonal",
    "pinv": "the preconditioner is diagonal",
    "curvature": "the Fisher diagonal is estimated from the captured batch",
    "kfac": "the preconditioner is diagonal",
}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_hyper(where: str = "", **values: Any) -> None:
    """lr > 0, betas in [0, 1)², gamma > 0, eps > 0, weight_decay ≥ 0, with an error naming the argument."""
    pre = f"{where}: " if where else ""
    lr, betas = values["lr"], values["betas"]
    if not _number(lr) or not lr > 0:
        raise ValueError(f"{pre}lr: expected a positive number, got {lr!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"{pre}betas: expected two numbers in [0, 1), got {betas!r}")
    for name in ("gamma", "eps"):
        v = values[name]
        if not _number(v) or not v > 0:
            raise ValueError(f"{pre}{name}: expected a positive number, got {v!r}")
    wd = values["weight_decay"]
    if not _number(wd) or not wd >= 0:
        raise ValueError(f"{pre}weight_decay: expected a number >= 0, got {wd!r}")
