"""What happens when the adapter's compiled batch step cannot take a batch.

``fisher()``, ``RunningFisher.step`` and the Fisher operator's products run each batch as one
compiled call where the adapter offers ``compile`` (JAX), and fall back to the eager path, op
by op, when that call fails: the eager path then either raises the batch's own, precise,
error, or computes the same result several times slower. The second case must not pass
unseen: until 2026-12-06 every language model's exact diagonal ran op by op on JAX because
one core function did not trace, and nothing said so. :func:`warn_compile_fallback` says so.
"""

from __future__ import annotations

import warnings

__all__ = ["CompileFallbackWarning", "warn_compile_fallback"]


class CompileFallbackWarning(UserWarning):
    """A batch that the compiled step could not take ran op by op (same result, slower)."""

    __module__ = "fisherlib"


def warn_compile_fallback(error: BaseException | None, what: str, stacklevel: int = 3) -> None:
    """Warn that ``what`` ran op by op because its compiled step raised ``error`` (if any)."""
    if error is None:
        return
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    warnings.warn(
        f"{what}: the compiled step could not take this batch ({type(error).__name__}: {first}), so it ran "
        "op by op: the same result, several times slower. The compiled step should take every batch the "
        "eager path takes: this is a fisherlib bug worth reporting, with the model", CompileFallbackWarning,
        stacklevel=stacklevel)
