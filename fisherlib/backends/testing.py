"""Conformance checks that every adapter must pass, reusable by third-party adapters.

Each ``check_*`` function takes a backend and a :class:`Case` (a tiny float64 model), and raises
``AssertionError`` with a message when the adapter breaks the protocol. fisherlib's own suite
(``tests/backends/test_conformance.py``) runs them on every installed adapter, and on any
registered adapter that opts in by providing ``conformance_case() -> Case``. A third-party
package can call :func:`check_all` from its own tests.

The references are dense float64 Jacobians (``Case.jacobian`` when given, central finite
differences otherwise) and directional finite differences; probes are checked against their
known first two moments within five standard errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Array = Any
Tree = Any

__all__ = [
    "Case",
    "check_all",
    "check_dtype_device",
    "check_per_example",
    "check_probes",
    "check_vjp_batched",
    "check_vjp_dense",
    "check_vjp_directional",
    "fd_jacobian",
]


@dataclass
class Case:
    """A small model, its float64 parameters and inputs, and conversions to and from NumPy.

    Attributes
    ----------
    model, params, inputs
        What ``backend.linearize(model, params, inputs)`` takes; ``params`` may be None where the
        adapter reads them from the model (a torch module), then ``backend.leaves(model)`` names
        them and ``backend.unflatten(model, leaves)`` gives a tree ``linearize`` accepts.
    to_numpy : callable
        Framework array -> ``numpy.ndarray``.
    from_numpy : callable
        ``numpy.ndarray`` -> framework array of the same dtype, on the case's device.
    jacobian : callable, optional
        Dense reference ``{leaf name: (N, *logits.shape[1:], *leaf.shape)}``, e.g. from the
        framework's ``jacrev``; central finite differences when None.
    per_example : bool
        Whether the adapter supports :meth:`per_example_vjp` for this model.
    """

    model: Any
    params: Tree
    inputs: Array
    to_numpy: Callable[[Array], np.ndarray] = np.asarray
    from_numpy: Callable[[np.ndarray], Array] = np.asarray
    jacobian: Callable[[], dict[str, np.ndarray]] | None = None
    per_example: bool = True


def _tree(case: Case) -> Tree:
    return case.model if case.params is None else case.params


def _named(backend, tree, case) -> dict[str, np.ndarray]:
    return {n: case.to_numpy(a) for n, a in backend.leaves(tree)}


def _logits(backend, case, params=None) -> np.ndarray:
    z, _ = backend.linearize(case.model, case.params if params is None else params, case.inputs)
    return case.to_numpy(z)


def fd_jacobian(backend, case: Case, h: float = 1e-6) -> dict[str, np.ndarray]:
    """Dense Jacobian of the logits by central differences: {name: (*logits.shape, *leaf.shape)}."""
    tree = _tree(case)
    named = backend.leaves(tree)
    values = [case.to_numpy(a).astype(np.float64) for _, a in named]
    out = {}
    for i, (name, _) in enumerate(named):
        cols = []
        for j in range(values[i].size):
            step = np.zeros(values[i].size)
            step[j] = h
            sides = []
            for sign in (1, -1):
                moved = [v + sign * step.reshape(v.shape) if k == i else v for k, v in enumerate(values)]
                params = backend.unflatten(tree, [case.from_numpy(m) for m in moved])
                sides.append(_logits(backend, case, params))
            cols.append((sides[0] - sides[1]) / (2 * h))
        out[name] = np.stack(cols, axis=-1).reshape(cols[0].shape + values[i].shape)
    return out


def _cotangents(case: Case, shape, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, *shape))


def _close(got, want, what, rtol, atol):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    err = np.max(np.abs(got - want)) if got.size else 0.0
    assert np.allclose(got, want, rtol=rtol, atol=atol), f"{what}: max abs error {err:.3g} (rtol {rtol}, atol {atol})"


def check_vjp_dense(backend, case: Case, *, k: int = 3, seed: int = 0) -> None:
    """vjp(ct) equals Σ_n J_nᵀ ct_n from a dense Jacobian, for single and K-stacked ct."""
    z, vjp = backend.linearize(case.model, case.params, case.inputs)
    zs = tuple(case.to_numpy(z).shape)
    jac = case.jacobian() if case.jacobian is not None else fd_jacobian(backend, case)
    rtol, atol = (1e-9, 1e-11) if case.jacobian is not None else (1e-5, 1e-7)
    ct = _cotangents(case, zs, k, seed)
    got = _named(backend, vjp(case.from_numpy(ct)), case)
    one = _named(backend, vjp(case.from_numpy(ct[0])), case)
    assert list(got) == list(jac), f"leaf names {list(got)} differ from the parameters' {list(jac)}"
    for name, j in jac.items():
        zaxes = len(zs)
        want = np.tensordot(ct, j, axes=(list(range(1, zaxes + 1)), list(range(zaxes))))
        _close(got[name], want, f"vjp of K={k} stacked cotangents, leaf {name!r}", rtol, atol)
        _close(one[name], want[0], f"vjp of one cotangent, leaf {name!r}", rtol, atol)


def check_vjp_directional(backend, case: Case, *, h: float = 1e-6, seed: int = 1) -> None:
    """⟨vjp(ct), v⟩ equals the central difference of ⟨ct, z(θ + t v)⟩ at t = 0."""
    tree = _tree(case)
    z, vjp = backend.linearize(case.model, case.params, case.inputs)
    rng = np.random.default_rng(seed)
    ct = rng.standard_normal(case.to_numpy(z).shape)
    grads = _named(backend, vjp(case.from_numpy(ct)), case)
    values = [case.to_numpy(a).astype(np.float64) for _, a in backend.leaves(tree)]
    direction = [rng.standard_normal(v.shape) for v in values]
    sides = []
    for sign in (1, -1):
        params = backend.unflatten(tree, [case.from_numpy(v + sign * h * d) for v, d in zip(values, direction)])
        sides.append(np.sum(ct * _logits(backend, case, params)))
    fd = (sides[0] - sides[1]) / (2 * h)
    ad = sum(np.sum(g * d) for g, d in zip(grads.values(), direction))
    assert abs(fd - ad) <= 1e-6 * (1 + abs(ad)), f"⟨vjp(ct), v⟩ = {ad!r}, finite differences give {fd!r}"


def check_vjp_batched(backend, case: Case, *, k: int = 4, seed: int = 2) -> None:
    """A stack of K cotangents gives the same K gradients as K separate calls."""
    z, vjp = backend.linearize(case.model, case.params, case.inputs)
    ct = _cotangents(case, case.to_numpy(z).shape, k, seed)
    stacked = _named(backend, vjp(case.from_numpy(ct)), case)
    for i in range(k):
        single = _named(backend, vjp(case.from_numpy(ct[i])), case)
        for name, g in single.items():
            _close(stacked[name][i], g, f"probe {i} of a K={k} stack, leaf {name!r}", 1e-10, 1e-12)


def check_per_example(backend, case: Case, *, k: int = 2, seed: int = 3) -> None:
    """Row n of per_example_vjp is the VJP through input n alone; the rows sum to the batch VJP."""
    z, vjp = backend.linearize(case.model, case.params, case.inputs)
    zn = case.to_numpy(z)
    n = zn.shape[0]
    ct = _cotangents(case, zn.shape, k, seed)
    rows = _named(backend, backend.per_example_vjp(case.model, case.params, case.inputs, case.from_numpy(ct)), case)
    total = _named(backend, vjp(case.from_numpy(ct)), case)
    for name, r in rows.items():
        assert r.shape[:2] == (k, n), f"per-example leaf {name!r}: shape {r.shape}, expected ({k}, {n}, ...)"
        _close(r.sum(axis=1), total[name], f"per-example rows summed, leaf {name!r}", 1e-9, 1e-11)
    for i in range(n):
        _, vjp_i = backend.linearize(case.model, case.params, case.inputs[i:i + 1, ...])
        single = _named(backend, vjp_i(case.from_numpy(ct[:, i:i + 1, ...])), case)
        for name, g in single.items():
            _close(rows[name][:, i], g, f"per-example row {i}, leaf {name!r}", 1e-9, 1e-11)


def check_dtype_device(backend, case: Case) -> None:
    """Logits and gradients keep the parameters' dtype (float64 and float32) and device."""
    tree = _tree(case)
    leaves = [a for _, a in backend.leaves(tree)]
    for dtype in (np.float64, np.float32):
        cast = [case.from_numpy(case.to_numpy(a).astype(dtype)) for a in leaves]
        params = backend.unflatten(tree, cast)
        x = case.inputs
        x = case.from_numpy(case.to_numpy(x).astype(dtype)) if np.issubdtype(case.to_numpy(x).dtype, np.floating) else x
        z, vjp = backend.linearize(case.model, params, x)
        assert case.to_numpy(z).dtype == dtype, f"logits: dtype {case.to_numpy(z).dtype}, parameters {np.dtype(dtype)}"
        ct = case.from_numpy(np.ones((2, *case.to_numpy(z).shape), dtype=dtype))
        grads = backend.leaves(vjp(ct))
        for (name, g), p in zip(grads, cast):
            got = case.to_numpy(g).dtype
            assert got == dtype, f"gradient {name!r}: dtype {got}, expected {np.dtype(dtype)}"
            assert getattr(g, "device", None) == getattr(p, "device", None), (
                f"gradient {name!r}: device {getattr(g, 'device', None)}, parameter on {getattr(p, 'device', None)}"
            )
        assert getattr(z, "device", None) == getattr(cast[0], "device", None), "logits: not on the parameters' device"


def check_probes(backend, like: Array, to_numpy: Callable[[Array], np.ndarray] = np.asarray, *,
                 n: int = 20000, z_max: float = 5.0) -> None:
    """Probes: reproducible from the seed, ``like``'s dtype and device, right first two moments.

    Means and second moments must lie within ``z_max`` standard errors of their known values
    (Rademacher: ±1 exactly, mean 0; Gaussian: mean 0, E x² = 1, Var x² = 2; uniform: [0, 1),
    mean 1/2, variance 1/12), and neighbouring entries must be uncorrelated.
    """
    shape = (4, n // 4)
    dtype = to_numpy(like).dtype
    se = z_max / np.sqrt(n)
    for dist in ("rademacher", "gaussian", "uniform"):
        a = backend.probes(7, shape, dist, like)
        b = backend.probes(7, shape, dist, like)
        c = backend.probes(8, shape, dist, like)
        an = to_numpy(a).astype(np.float64)
        assert tuple(an.shape) == shape, f"{dist}: shape {an.shape}, expected {shape}"
        assert to_numpy(a).dtype == dtype, f"{dist}: dtype {to_numpy(a).dtype}, like has {dtype}"
        assert getattr(a, "device", None) == getattr(like, "device", None), f"{dist}: not on like's device"
        assert np.array_equal(an, to_numpy(b)), f"{dist}: the same seed gave different values"
        assert not np.array_equal(an, to_numpy(c)), f"{dist}: seeds 7 and 8 gave the same values"
        flat = an.ravel()
        if dist == "rademacher":
            assert np.all(np.abs(flat) == 1), f"rademacher: values other than ±1: {np.unique(flat)[:5]}"
            mean, var, sd_var = 0.0, 1.0, 0.0
        elif dist == "gaussian":
            mean, var, sd_var = 0.0, 1.0, np.sqrt(2.0)
        else:
            assert flat.min() >= 0 and flat.max() <= 1, "uniform: values outside [0, 1]"
            mean, var, sd_var = 0.5, 1 / 12, np.sqrt(1 / 180)
        sd = np.sqrt(var)
        assert abs(flat.mean() - mean) <= se * sd, f"{dist}: mean {flat.mean():.4g}, expected {mean} ± {se * sd:.2g}"
        m2 = np.mean((flat - mean) ** 2)
        assert abs(m2 - var) <= max(se * sd_var, 1e-3 * var), f"{dist}: variance {m2:.4g}, expected {var:.4g}"
        lag = np.mean((flat[:-1] - mean) * (flat[1:] - mean)) / var
        assert abs(lag) <= se, f"{dist}: neighbouring entries correlate ({lag:.3g})"


def check_all(backend, case: Case, like: Array | None = None) -> None:
    """Every check above; probes use the logits as ``like`` unless one is given."""
    check_vjp_dense(backend, case)
    check_vjp_directional(backend, case)
    check_vjp_batched(backend, case)
    if case.per_example:
        check_per_example(backend, case)
    check_dtype_device(backend, case)
    z, _ = backend.linearize(case.model, case.params, case.inputs)
    check_probes(backend, z if like is None else like, case.to_numpy)
