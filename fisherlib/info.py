"""``fisherlib info``: what fisherlib can run on here — backends, devices and versions."""

from __future__ import annotations

import importlib.metadata
import platform

from . import __version__, backends

# Distributions fisherlib uses or can use.
PACKAGES = ("numpy", "array-api-compat", "torch", "jax", "cupy", "matplotlib", "scikit-learn", "tqdm")


def versions() -> dict[str, str | None]:
    """Installed version of each package of :data:`PACKAGES` (None when missing)."""
    out: dict[str, str | None] = {}
    for dist in PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    if out["cupy"] is None:  # CuPy ships as cupy-cudaXXx wheels
        for dist in importlib.metadata.distributions():
            if dist.metadata["Name"] and dist.metadata["Name"].lower().startswith("cupy-"):
                out["cupy"] = dist.version
    return out


def devices(ver: dict[str, str | None] | None = None) -> dict[str, list[str]]:
    """Devices each installed framework sees (importing only what is installed).

    ``ver``: :func:`versions`, if already at hand.
    """
    found: dict[str, list[str]] = {"numpy": ["cpu"]}
    ver = versions() if ver is None else ver
    if ver["torch"]:
        import torch

        found["torch"] = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                                    for i in range(torch.cuda.device_count())]
    if ver["jax"]:
        import jax

        found["jax"] = [f"{d.platform}:{d.id}" for d in jax.devices()]
    if ver["cupy"]:
        try:
            import cupy

            found["cupy"] = [f"cuda:{i}" for i in range(cupy.cuda.runtime.getDeviceCount())]
        except Exception as e:  # noqa: BLE001 - no driver or no GPU: say why
            found["cupy"] = [f"none ({type(e).__name__}: {e})"]
    return found


def report() -> str:
    """The text ``fisherlib info`` prints."""
    lines = [f"fisherlib {__version__} on Python {platform.python_version()} ({platform.platform()})",
             "", "backends:"]
    installed = set(backends.available())
    for name in backends.available(include_missing=True):
        lines.append(f"  {name:<8} {'installed' if name in installed else 'not installed'}")
    ver = versions()
    lines += ["", "devices:"]
    lines += [f"  {fw:<8} {', '.join(devs) or 'none'}" for fw, devs in devices(ver).items()]
    lines += ["", "versions:"]
    lines += [f"  {dist:<17} {v or '-'}" for dist, v in ver.items()]
    return "\n".join(lines)
