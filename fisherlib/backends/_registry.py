"""The backend registry: names to adapters, and arrays to names, without importing frameworks.

Built-in adapters are named by import path and loaded on first use; third parties add theirs
with :func:`register` or through the entry-point group ``"fisherlib.backends"``. :func:`infer`
names a backend from the type of the first array leaf of a parameter tree: the top-level module
of the type (or of a base class), with aliases (``jaxlib`` -> ``jax``), cached per type. A type
can only come from a framework that is already imported, so inferring never imports one.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from ._protocol import Backend

Tree = Any

__all__ = ["ENTRY_POINT_GROUP", "available", "get", "infer", "register", "unregister"]

ENTRY_POINT_GROUP = "fisherlib.backends"

_REQUIRED = ("linearize", "probes", "leaves", "unflatten")


@dataclass
class _Entry:
    name: str
    target: Any  # a factory, an instance, "module:attr", or an importlib.metadata.EntryPoint
    requires: str | None = None  # top-level module that must be importable
    extra: str | None = None  # pip extra of fisherlib that installs it
    modules: tuple[str, ...] = ()  # top-level modules whose arrays it handles
    source: str = "register"


# Aliases of a type's top-level module (and of names given to get): opt_einsum-style.
_ALIASES = {"jaxlib": "jax", "array_api_strict": "numpy", "pytorch": "torch"}

_BUILTINS = [
    _Entry("numpy", "fisherlib.backends.numpy:NumpyBackend", "numpy", None, ("numpy",), "builtin"),
    _Entry("torch", "fisherlib.backends.torch:TorchBackend", "torch", "torch", ("torch",), "builtin"),
    _Entry("jax", "fisherlib.backends.jax:JaxBackend", "jax", "jax", ("jax",), "builtin"),
    _Entry("cupy", "fisherlib.backends.cupy:CupyBackend", "cupy", "cupy", ("cupy",), "builtin"),
]

_ENTRIES: dict[str, _Entry] = {e.name: e for e in _BUILTINS}
_INSTANCES: dict[str, Backend] = {}
_TYPE_CACHE: dict[type, str] = {}
_SCANNED = False
_LOOKED_UP: set[str] = set()  # modules already searched for among the entry points


# -- registration ------------------------------------------------------------------------------


def register(name: str, factory: Callable[..., Backend] | Backend | str, *, modules: tuple[str, ...] = (),
             requires: str | None = None, extra: str | None = None, replace: bool = False) -> None:
    """Add a backend under ``name``.

    Parameters
    ----------
    name : str
        What users pass to :func:`get` (and to the estimators' ``backend=``).
    factory : callable, Backend instance or ``"module:attr"``
        Called with :func:`get`'s keyword options to make the adapter (a class works).
    modules : tuple of str
        Top-level modules whose array types this backend handles, for :func:`infer`
        (default: ``(name,)``).
    requires : str, optional
        A module that must be importable for the backend to count as installed.
    extra : str, optional
        The pip extra that installs it, quoted by the error for a missing backend.
    replace : bool
        Allow replacing an existing backend of the same name.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    if name in _ENTRIES and not replace:
        raise ValueError(f"name: a backend {name!r} is already registered; pass replace=True to replace it")
    _ENTRIES[name] = _Entry(name, factory, requires, extra, tuple(modules) or (name,), "register")
    _forget(name)


def unregister(name: str) -> None:
    """Remove a backend added by :func:`register` or an entry point (built-ins are restored)."""
    if name not in _ENTRIES:
        raise ValueError(f"name: no backend {name!r} is registered")
    del _ENTRIES[name]
    for e in _BUILTINS:
        if e.name == name:
            _ENTRIES[name] = e
    _forget(name)


def _forget(name: str) -> None:
    _INSTANCES.pop(name, None)
    _TYPE_CACHE.clear()
    _LOOKED_UP.clear()


def _scan_entry_points(force: bool = False) -> None:
    """Add the entry points of group ``fisherlib.backends`` (names only; nothing is loaded)."""
    global _SCANNED
    if _SCANNED and not force:
        return
    _SCANNED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        old = _ENTRIES.get(ep.name)
        if old is None or (old.source == "entry point" and old.target != ep):
            _ENTRIES[ep.name] = _Entry(ep.name, ep, None, None, (ep.name,), "entry point")
            _INSTANCES.pop(ep.name, None)
            _TYPE_CACHE.clear()


# -- lookup ------------------------------------------------------------------------------------


def _installed(entry: _Entry) -> bool:
    if entry.requires is None or entry.requires in sys.modules:
        return True
    try:
        return importlib.util.find_spec(entry.requires) is not None  # finds, does not import
    except (ImportError, ValueError):
        return False


def available(*, include_missing: bool = False) -> list[str]:
    """Names of the backends that can be used here (their framework is installed).

    With ``include_missing=True``, also the known backends whose framework is not installed.
    """
    _scan_entry_points(force=True)
    return sorted(n for n, e in _ENTRIES.items() if include_missing or _installed(e))


def _hint() -> str:
    missing = [e for e in _ENTRIES.values() if not _installed(e)]
    text = f"Installed backends: {', '.join(sorted(n for n, e in _ENTRIES.items() if _installed(e))) or 'none'}."
    if missing:
        text += " Not installed: " + ", ".join(
            f"{e.name} (pip install 'fisherlib[{e.extra}]')" if e.extra else e.name for e in missing
        ) + "."
    return text


def get(name: str, **options: Any) -> Backend:
    """The backend called ``name``; keyword ``options`` go to its constructor.

    Without options the instance is shared between calls.

    Raises
    ------
    ValueError
        ``name`` is not a known backend (the message lists the installed ones).
    ImportError
        The backend is known but its framework is not installed (the message gives the pip extra).
    """
    if not isinstance(name, str) and isinstance(name, Backend) and not isinstance(name, type):
        return name  # already an adapter: lets callers accept a name or an instance
    if not isinstance(name, str):  # (checked first: a runtime Protocol check costs ~30 µs)
        raise TypeError(f"backend: expected a backend name (str), got {type(name).__name__}")
    name = _ALIASES.get(name, name)
    if name not in _ENTRIES:
        _scan_entry_points(force=True)
    entry = _ENTRIES.get(name)
    if entry is None:
        raise ValueError(
            f"backend: {name!r} is unknown. {_hint()} Third-party backends register through the "
            f"entry-point group {ENTRY_POINT_GROUP!r} or fisherlib.backends.register(name, factory)."
        )
    if not _installed(entry):
        how = f"pip install 'fisherlib[{entry.extra}]'" if entry.extra else f"install {entry.requires}"
        raise ImportError(
            f"backend: {name!r} needs {entry.requires}, which is not installed; {how}. "
            f"Installed backends: {', '.join(sorted(n for n, e in _ENTRIES.items() if _installed(e)))}."
        )
    if not options and name in _INSTANCES:
        return _INSTANCES[name]
    backend = _make(entry, options)
    if not options:
        _INSTANCES[name] = backend
    return backend


def _make(entry: _Entry, options: dict) -> Backend:
    target = entry.target
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    elif hasattr(target, "load") and hasattr(target, "group"):  # an EntryPoint
        target = target.load()
    if isinstance(target, type) or not all(hasattr(target, m) for m in _REQUIRED):
        backend = target(**options)
    elif options:
        raise TypeError(f"backend {entry.name!r} is a ready-made instance and takes no options, got {sorted(options)}")
    else:
        backend = target
    lacking = [m for m in ("name", *_REQUIRED) if not hasattr(backend, m)]
    if lacking:
        raise TypeError(f"backend {entry.name!r}: its factory made {type(backend).__name__}, which lacks {lacking}")
    return backend


# -- classes that carry state through framework transformations -------------------------------

STATE_CLASSES: list[type] = []  # read by adapters on import (jax: registered as pytrees)


def state_class(cls: type) -> None:
    """Let the adapters of imported frameworks know ``cls``, a class whose instances carry arrays
    (``cls._tree_flatten()`` -> (children, static aux); ``cls._tree_unflatten(aux, children)``).

    An adapter module that defines ``register_state_class(cls)`` (JAX: a pytree node, so that the
    object passes in and out of ``jax.jit``) gets ``cls`` now if loaded, and every recorded class
    when it loads. Adapters of frameworks already in ``sys.modules`` are loaded here; nothing is
    imported otherwise. Cheap to repeat (RunningFisher calls it per instance).
    """
    new = cls not in STATE_CLASSES
    if new:
        STATE_CLASSES.append(cls)
    for entry in _BUILTINS:
        module = entry.target.partition(":")[0]
        loaded = sys.modules.get(module)
        if loaded is None and entry.requires in sys.modules:
            importlib.import_module(module)  # registers every recorded class on import
        elif loaded is not None and new and hasattr(loaded, "register_state_class"):
            loaded.register_state_class(cls)


# -- inference from arrays ---------------------------------------------------------------------


def _owner(cls: type) -> str | None:
    """Backend name for an array type: the top-level module of the type or of a base class."""
    if cls in _TYPE_CACHE:
        return _TYPE_CACHE[cls]
    top = _ALIASES.get(cls.__module__.split(".")[0], cls.__module__.split(".")[0])
    by_module = {m: e.name for e in _ENTRIES.values() for m in e.modules}
    if top not in by_module and top not in _LOOKED_UP:
        # An unregistered module may have an entry point installed since the last scan.
        _LOOKED_UP.add(top)
        _scan_entry_points(force=True)
        by_module = {m: e.name for e in _ENTRIES.values() for m in e.modules}
    for base in cls.__mro__:
        mod = base.__module__.split(".")[0]
        mod = _ALIASES.get(mod, mod)
        if mod in by_module:
            _TYPE_CACHE[cls] = by_module[mod]
            return by_module[mod]
    return None


def _find(tree: Tree, seen: list[type]) -> str | None:
    if tree is None or type(tree) in (bool, int, float, complex, str, bytes):
        return None
    name = _owner(type(tree))
    if name is not None:
        return name
    if isinstance(tree, Mapping):
        children = list(tree.values())
    elif isinstance(tree, (list, tuple)):
        children = list(tree)
    elif "jax" in sys.modules:  # any other pytree (equinox modules, flax structs): jax is loaded
        import jax

        children = [c for c in jax.tree_util.tree_leaves(tree) if c is not tree]
    else:
        children = []
    if not children:
        seen.append(type(tree))
    for child in children:
        name = _find(child, seen)
        if name is not None:
            return name
    return None


def infer(params: Tree) -> Backend:
    """The backend for a parameter tree (or a ``torch.nn.Module``), from its first array leaf.

    Raises
    ------
    TypeError
        No registered backend handles the leaves' type (the message names it).
    """
    seen: list[type] = []
    name = _find(params, seen)
    if name is None:
        kinds = ", ".join(sorted({f"{t.__module__}.{t.__qualname__}" for t in seen}))
        what = f"no backend handles {kinds}" if kinds else "found no array leaves"
        raise TypeError(
            f"params: {what}. Registered backends: "
            f"{', '.join(available(include_missing=True))}; name one with backend=... or register one"
        )
    return get(name)
