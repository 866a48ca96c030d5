r"""A Fisher estimate as a ``.safetensors`` file that any tool can read.

Layout of the file (format ``fisherlib.fisher/1``):

- tensor ``<name>``: the estimate's value, for every parameter leaf ``<name>`` as the model's
  ``state_dict`` names it (``"bert.encoder.layer.0.attention.self.query.weight"``), shaped like
  the parameter (structure "diag"); the dense block ``(..., S, S)`` of block ``<name>``
  ("blocks"); a 0-d ``trace`` ("trace");
- tensor ``stderr/<name>``: its standard error, same shape (what it rests on: ``stderr_kind``);
- tensor ``parts/<name>`` (only with ``parts=True``): the estimate's per-probe partial sums, so
  that :meth:`~fisherlib.FisherEstimate.first_probes` works after loading;
- header (``safe_open(path, "np").metadata()``, all strings): ``format``, ``fisherlib_version``,
  ``type``, ``method``, ``structure``, ``likelihood``, ``bound``, ``reduction``, ``probes``,
  ``inputs``, ``outputs``, ``seed``, ``draws`` (JSON ``[[seed, first, stop], ...]``), ``dist``,
  ``stderr_kind``, ``per_example``, ``rank``, ``moments``, ``names`` (JSON, in the estimate's
  order) and ``block_shapes`` (JSON).

Reading it needs only ``safetensors`` (and numpy or torch)::

    from safetensors import safe_open
    with safe_open("fisher.safetensors", framework="pt") as f:
        meta = f.metadata()                      # {"method": "hutchinson", "probes": "8", ...}
        F = {k: f.get_tensor(k) for k in f.keys() if "/" not in k}   # the Fisher diagonal

:func:`load` rebuilds a :class:`~fisherlib.FisherEstimate` whose value, standard error and merge
behave as the saved one's. Without ``parts`` an estimate with K >= 2 probes comes back in its
running-moments form (value and variance per entry, ``moments=True``): the same value and error
bar, merged by addition, but without ``first_probes``.

Extension point: the header's ``type`` names the estimate type, and :data:`FORMATS` maps it to
the pair of functions that write and read that type's tensors. An estimate type with other
tensors (the Kronecker factors of K-FAC, say ``kron/<layer>/A`` and ``kron/<layer>/G``) registers
its own pair with :func:`register` and keeps this header.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

from ..estimators._estimate import FisherEstimate, _to_numpy

__all__ = ["FORMAT", "FORMATS", "check_against", "load", "metadata", "register", "save"]

FORMAT = "fisherlib.fisher/1"

# Header keys of a FisherEstimate and how each is written as a string.
_FIELDS = {  # header key: (attribute, kind)
    "method": ("method", "str"), "structure": ("structure", "str"), "likelihood": ("likelihood", "str"),
    "bound": ("bound", "json"), "reduction": ("reduction", "str"), "probes": ("n_probes", "int"),
    "inputs": ("n_inputs", "int"), "outputs": ("n_outputs", "json"), "seed": ("seed", "json"),
    "draws": ("draws", "json"), "dist": ("dist", "str"), "stderr_kind": ("stderr_kind", "str"),
    "per_example": ("per_example", "json"), "rank": ("rank", "int"), "moments": ("moments", "json"),
    "names": ("names", "json"), "block_shapes": ("block_shapes", "json"),
}


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("fisherlib.integrations.safetensors needs the safetensors package: "
                          "pip install safetensors") from e
    return stn


def _version() -> str:
    from .. import __version__

    return __version__


# --------------------------------------------------------------------------- FisherEstimate


def _dump_estimate(est: FisherEstimate, parts: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if est.structure == "sketch":
        raise ValueError("est: a low-rank sketch has no per-parameter tensors to name; save it "
                         "with FisherEstimate.save to a .npz path")
    header = {}
    for key, (attr, kind) in _FIELDS.items():
        v = getattr(est, attr)
        if attr == "draws":
            v = [list(t) for t in v]
        header[key] = str(int(v)) if kind == "int" else v if kind == "str" else json.dumps(v)
    values = [est._mean(x) for x in est.parts]  # lists in the estimate's order, for any tree
    errors = [est._stderr(x) for x in est.parts]
    tensors: dict[str, np.ndarray] = {}
    for i, name in enumerate(est.names):
        if "/" in name:
            raise ValueError(f"est: leaf name {name!r} contains '/', which the format reserves")
        tensors[name] = np.ascontiguousarray(_to_numpy(values[i]))
        tensors[f"stderr/{name}"] = np.ascontiguousarray(_to_numpy(errors[i]))
        if parts:
            tensors[f"parts/{name}"] = np.ascontiguousarray(_to_numpy(est.parts[i]))
    return tensors, header


def _load_estimate(tensors: dict[str, np.ndarray], header: dict[str, str]) -> FisherEstimate:
    kw: dict[str, Any] = {}
    for key, (attr, kind) in _FIELDS.items():
        if key not in header:
            raise ValueError(f"path: the header has no {key!r} entry; not a {FORMAT} file")
        s = header[key]
        kw[attr] = int(s) if kind == "int" else s if kind == "str" else json.loads(s)
    kw["draws"] = tuple(tuple(t) for t in kw["draws"])
    kw["block_shapes"] = {k: tuple(v) for k, v in kw["block_shapes"].items()}
    names = kw["names"]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"path: the header names tensors the file lacks: {missing}")
    if kw["structure"] == "trace":  # safetensors' numpy writer stores a 0-d array as (1,)
        tensors = {k: np.reshape(v, ()) if k in ("trace", "stderr/trace") else v for k, v in tensors.items()}
    scale = (1.0 / kw["n_inputs"]) if kw["reduction"] == "mean" and kw["n_inputs"] else 1.0
    if all(f"parts/{n}" in tensors for n in names):
        kw["parts"] = [tensors[f"parts/{n}"] for n in names]
    else:  # rebuilt from value and standard error (module notes)
        parts = []
        for n in names:
            total = np.asarray(tensors[n]) / scale
            if kw["stderr_kind"] == "probes":
                var = (np.asarray(tensors[f"stderr/{n}"]) / scale) ** 2
                parts.append(np.stack([total, var.astype(total.dtype)]))
            elif kw["moments"]:
                parts.append(np.stack([total, np.zeros_like(total)]))
            else:
                parts.append(total[None, ...])
        kw["parts"] = parts
        kw["moments"] = kw["moments"] or kw["stderr_kind"] == "probes"
    return FisherEstimate(**kw)


# Estimate type name -> (dump(est, parts) -> (tensors, header), load(tensors, header) -> estimate).
FORMATS: dict[str, tuple[type, Callable, Callable]] = {
    "FisherEstimate": (FisherEstimate, _dump_estimate, _load_estimate),
}


def register(name: str, cls: type, dump: Callable, load: Callable) -> None:
    """Add an estimate type to the format: ``dump(est, parts)`` gives its tensors and header
    entries, ``load(tensors, header)`` rebuilds it (the header keeps ``format``, ``type`` and
    ``fisherlib_version``)."""
    FORMATS[name] = (cls, dump, load)


# --------------------------------------------------------------------------- public functions


def save(est: Any, path: str | os.PathLike, *, parts: bool = False) -> None:
    """Write ``est`` to ``path`` in the safetensors format (module notes).

    Parameters
    ----------
    est : FisherEstimate
        A "diag", "blocks" or "trace" estimate, from any framework (arrays are copied to host).
    path : str or path-like
        The file to write (conventionally ``*.safetensors``).
    parts : bool
        Also write the per-probe partial sums (``parts/<name>``, K times the size of the value),
        so that the loaded estimate supports ``first_probes``.
    """
    for name, (cls, dump, _) in FORMATS.items():
        if isinstance(est, cls):
            tensors, header = dump(est, bool(parts))
            break
    else:
        raise TypeError(f"est: expected a FisherEstimate, got {type(est).__name__}")
    header = {"format": FORMAT, "type": name, "fisherlib_version": _version(), **header}
    _safetensors_numpy().save_file(tensors, os.fspath(path), metadata=header)


def metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header of a file written by :func:`save` (strings, as ``safetensors`` gives them)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="np") as f:
        return dict(f.metadata() or {})


def load(path: str | os.PathLike, *, model: Any = None, backend: Any = None) -> Any:
    """Read an estimate written by :func:`save`; with ``model``, check it matches its parameters.

    Parameters
    ----------
    path : str or path-like
    model : optional
        A torch module, or a parameter tree of any backend: the file's tensors must be named
        and shaped as its parameter leaves (those that require grad), else ``ValueError``.
    backend : optional
        The backend of ``model`` (inferred from its type when None).

    Returns
    -------
    FisherEstimate
        NumPy arrays; ``value`` and ``stderr`` are ``{name: array}`` dicts.
    """
    meta = metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {os.fspath(path)!r} is not a {FORMAT} file (its header has "
                         f"format={meta.get('format')!r})")
    kind = meta.get("type", "FisherEstimate")
    if kind not in FORMATS:
        raise ValueError(f"path: estimate type {kind!r} is not registered; known: {sorted(FORMATS)}")
    tensors = _safetensors_numpy().load_file(os.fspath(path))
    est = FORMATS[kind][2](tensors, meta)
    if model is not None:
        check_against(est, model, backend=backend)
    return est


def check_against(est: Any, model: Any, *, backend: Any = None, argname: str = "model") -> None:
    """ValueError naming every difference between a diagonal estimate's leaves and ``model``'s.

    The leaves are the parameters that :func:`fisherlib.fisher` differentiates (a torch module's
    parameters that require grad; every leaf of a pytree).
    """
    from ..uses import _trees

    if getattr(est, "structure", None) != "diag":
        raise ValueError(f"{argname}: only a diagonal estimate is checked against a model's "
                         f"parameters, got structure={getattr(est, 'structure', None)!r}")
    lv = _trees.split(model, backend, argname=argname)
    ours = {n: tuple(p.shape[1:]) for n, p in zip(est.names, est.parts)}
    theirs = {n: tuple(a.shape) for n, a in zip(lv.names, lv.arrays)}
    problems = []
    extra = [n for n in ours if n not in theirs]
    lacking = [n for n in theirs if n not in ours]
    if extra:
        problems.append(f"the estimate has leaves the model lacks: {extra}")
    if lacking:
        problems.append(f"the model has parameters the estimate lacks: {lacking}")
    shapes = [f"{n}: estimate {ours[n]}, model {theirs[n]}" for n in ours if n in theirs and ours[n] != theirs[n]]
    if shapes:
        problems.append("shapes differ: " + "; ".join(shapes))
    if problems:
        raise ValueError(f"{argname}: the Fisher estimate does not match the model's parameters: "
                         + " | ".join(problems))
