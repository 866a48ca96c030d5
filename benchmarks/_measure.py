"""Timing and memory helpers shared by the benchmark scripts (not a public module)."""

from __future__ import annotations

import statistics
import time


def median_times(fns: dict, repeats: dict | int, warmup: int = 1) -> dict:
    """Median wall time of each function, the repeats interleaved so that load affects all alike.

    ``repeats``: one count for all, or a count per function (slow ones take fewer; each round
    runs every function that still has repeats left, in a rotating order).
    """
    if isinstance(repeats, int):
        repeats = {name: repeats for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for r in range(max(repeats.values())):
        names = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
        for name in names:
            if len(times[name]) < repeats[name]:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``); None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
