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

A Kronecker-factored estimate (:class:`~fisherlib.KroneckerEstimate`, ``structure="kfac"`` or
``"ekfac"``) is written with header ``type = "KroneckerEstimate"`` and, per layer ``<block>``
(the module's name), the factors of F_block ≈ A ⊗ G in the block's core layout (the bias as a
last input of A, see :mod:`fisherlib.core.kronecker`):

- ``kron/<block>/A`` (groups, Ĩ, Ĩ), or (1, num) for an embedding's diagonal A, and
  ``kron/<block>/G`` (groups, O, O), ``stderr/kron/<block>/G`` its standard error;
- EK-FAC: ``kron/<block>/S`` (groups, O, Ĩ), ``stderr/kron/<block>/S``, and the eigenbases
  ``kron/<block>/QA``, ``kron/<block>/QG`` it was fitted in;
- ``<leaf>`` and ``stderr/<leaf>``: the diagonal of each leaf no layer rule covers (``fallback``);
- header: as above (without ``bound``, ``per_example``, ``rank`` and ``block_shapes``) plus ``setting``, ``shapes``,
  ``fallback`` and ``blocks`` (JSON: each block's leaves, shapes, layout, groups, out, inputs).

Extension point: the header's ``type`` names the estimate type, and :data:`FORMATS` maps it to
the pair of functions that write and read that type's tensors; another estimate type registers
its own pair with :func:`register` and keeps this header.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

from ..estimators._estimate import FisherEstimate, _to_numpy
from ..estimators._kfac import KroneckerBlock
from ..estimators._kronecker import KroneckerEstimate

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
    header = _header_strings(est, _FIELDS)
    values = est._read("value")  # lists in the estimate's order, for any tree
    errors = est._read("stderr")
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
    kw = _header_values(header, _FIELDS)
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
        probes = kw["stderr_kind"] == "probes"
        kw["parts"] = [_stacked(np.asarray(tensors[n]) / scale,
                                np.asarray(tensors[f"stderr/{n}"]) / scale if probes else None,
                                stderr_kind=kw["stderr_kind"], moments=kw["moments"]) for n in names]
        kw["moments"] = kw["moments"] or kw["stderr_kind"] == "probes"
    return FisherEstimate(**kw)


def _header_strings(est: Any, fields: dict) -> dict[str, str]:
    header = {}
    for key, (attr, kind) in fields.items():
        v = getattr(est, attr)
        if attr == "draws":
            v = [list(t) for t in v]
        header[key] = str(int(v)) if kind == "int" else v if kind == "str" else json.dumps(v)
    return header


def _header_values(header: dict[str, str], fields: dict) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for key, (attr, kind) in fields.items():
        if key not in header:
            raise ValueError(f"path: the header has no {key!r} entry; not a {FORMAT} file")
        s = header[key]
        kw[attr] = int(s) if kind == "int" else s if kind == "str" else json.loads(s)
    kw["draws"] = tuple(tuple(t) for t in kw["draws"])
    return kw


def _stacked(total: np.ndarray, stderr: np.ndarray | None, *, stderr_kind: str, moments: bool) -> np.ndarray:
    """A part rebuilt from its value and standard error (both already divided by the scale):
    the running-moments form (sum, variance of the sum) where the error is the probes' spread."""
    if stderr_kind == "probes":
        return np.stack([total, (stderr ** 2).astype(total.dtype)])
    if moments:
        return np.stack([total, np.zeros_like(total)])
    return total[None, ...]


# --------------------------------------------------------------------------- KroneckerEstimate

_KRON_FIELDS = {k: v for k, v in _FIELDS.items() if k not in ("bound", "block_shapes", "per_example", "rank")}
_KRON_FIELDS.update({"setting": ("setting", "str"), "shapes": ("shapes", "json"), "fallback": ("fallback", "json")})


def _dump_kronecker(est: KroneckerEstimate, parts: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    header = _header_strings(est, _KRON_FIELDS)
    header["blocks"] = json.dumps([b.to_dict() for b in est.blocks])
    # A's weight in a merge: the inputs (positions, for "expand") its mean is over
    header["counts"] = json.dumps({b.name: float(_to_numpy(est._part("count", b.name))[0]) for b in est.blocks})
    tensors: dict[str, np.ndarray] = {}

    def put(name, x):
        if name in tensors:
            raise ValueError(f"est: two tensors would both be named {name!r}")
        tensors[name] = np.ascontiguousarray(_to_numpy(x))

    factors, errors = est.factors, est.factor_stderr
    for i, b in enumerate(est.blocks):
        if "/" in b.name:
            raise ValueError(f"est: block name {b.name!r} contains '/', which the format reserves")
        for role, x in factors[b.name].items():
            put(f"kron/{b.name}/{role}", x)
            if role != "A":
                put(f"stderr/kron/{b.name}/{role}", errors[b.name][role])
        if est.structure == "ekfac":
            QA, QG = est.basis[i]
            if QA is not None:
                put(f"kron/{b.name}/QA", QA)
            put(f"kron/{b.name}/QG", QG)
    values, stderr = est._fallback_values(), est.stderr
    for n in est.fallback:
        if "/" in n:
            raise ValueError(f"est: leaf name {n!r} contains '/', which the format reserves")
        put(n, values[n])
        put(f"stderr/{n}", stderr[n])
    if parts:
        for (role, name), i in est._index().items():
            put(f"parts/{role}/{name}", est.parts[i])
    return tensors, header


def _load_kronecker(tensors: dict[str, np.ndarray], header: dict[str, str]) -> KroneckerEstimate:
    kw = _header_values(header, _KRON_FIELDS)
    for key in ("blocks", "counts"):
        if key not in header:
            raise ValueError(f"path: the header has no {key!r} entry; not a {FORMAT} Kronecker file")
    counts = json.loads(header["counts"])
    kw["blocks"] = [KroneckerBlock.from_dict(b) for b in json.loads(header["blocks"])]
    kw["shapes"] = [tuple(s) for s in kw["shapes"]]
    est = KroneckerEstimate(parts=[], **kw)  # the roles' order, before the parts are known
    roles = sorted(est._index().items(), key=lambda r: r[1])
    scale = est._scale()

    def need(name):
        if name not in tensors:
            raise ValueError(f"path: the file lacks the tensor {name!r} that its header implies")
        return np.asarray(tensors[name])

    if all(f"parts/{r}/{n}" in tensors for (r, n), _ in roles):
        est.parts = [tensors[f"parts/{r}/{n}"] for (r, n), _ in roles]
    else:  # rebuilt from the factors and their errors (module notes)
        moments = est.moments or est.stderr_kind == "probes"
        built = []
        for (role, name), _ in roles:
            if role == "A":
                built.append(need(f"kron/{name}/A") * counts[name])
            elif role == "count":
                built.append(np.full((1,), counts[name], dtype=need(f"kron/{name}/A").dtype))
            else:
                key = f"kron/{name}/{role}" if role in ("G", "S") else name
                err = need(f"stderr/{key}") / scale if est.stderr_kind == "probes" else None
                built.append(_stacked(need(key) / scale, err, stderr_kind=est.stderr_kind, moments=moments))
        est.parts, est.moments = built, moments
    if est.structure == "ekfac":
        est.basis = [[tensors.get(f"kron/{b.name}/QA"), need(f"kron/{b.name}/QG")] for b in est.blocks]
    return est


# Estimate type name -> (dump(est, parts) -> (tensors, header), load(tensors, header) -> estimate).
FORMATS: dict[str, tuple[type, Callable, Callable]] = {
    "FisherEstimate": (FisherEstimate, _dump_estimate, _load_estimate),
    "KroneckerEstimate": (KroneckerEstimate, _dump_kronecker, _load_kronecker),
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
    est : FisherEstimate or KroneckerEstimate
        A "diag", "blocks" or "trace" estimate, or a K-FAC / EK-FAC one, from any framework
        (arrays are copied to host).
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
        raise TypeError(f"est: expected one of {sorted(FORMATS)}, got {type(est).__name__}")
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
    FisherEstimate or KroneckerEstimate
        As the header's ``type`` says; NumPy arrays; ``value`` and ``stderr`` are
        ``{name: array}`` dicts.
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
    """ValueError naming every difference between an estimate's leaves and ``model``'s.

    The leaves are the parameters that :func:`fisherlib.fisher` differentiates (a torch module's
    parameters that require grad; every leaf of a pytree). Diagonal and Kronecker-factored
    estimates are checked; they name every parameter.
    """
    from ..uses import _trees

    if isinstance(est, KroneckerEstimate):
        ours = dict(zip(est.names, (tuple(s) for s in est.shapes)))
    elif getattr(est, "structure", None) == "diag":
        ours = {n: tuple(p.shape[1:]) for n, p in zip(est.names, est.parts)}
    else:
        raise ValueError(f"{argname}: only a diagonal or Kronecker-factored estimate is checked against a "
                         f"model's parameters, got structure={getattr(est, 'structure', None)!r}")
    lv = _trees.split(model, backend, argname=argname)
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
