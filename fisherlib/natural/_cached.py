"""Cached factorizations: (F̃ + λI)⁻¹ prepared once per refresh, applied to every step's gradient.

Every structured solve of :func:`~fisherlib.natural.precondition` is linear in the gradient, so
what depends on F̃ and λ only can be computed once when F̃ is refreshed or λ changes, and each
step then only *applies* it:

===========================  ======================================  ==============================
kind                         prepared (per unit / leaf)              applied per step
===========================  ======================================  ==============================
``"diag"``                   D = F_ii + λ                            g / D
``"ollivier"``               a, r (shaped like the weight), β         δ_w = a⊙g_w − r g_b,
                                                                     δ_b = β g_b − ⟨r, g_w⟩
``"quasidiag"``,             a, r, and per unit σ_b, σ_h, β, η, μ     h = ⟨r, g_w⟩, s = σ_b g_b + σ_h h,
``"unitwise"`` (Woodbury)                                            δ_w = a⊙g_w − r s,
                                                                     δ_b = β g_b + η s + μ h
``"unitwise"`` (dense),      (F̃ + λI)⁻¹ (or its pseudo-inverse)      one batched mat-vec
``"blocks"``
===========================  ======================================  ==============================

The coefficients are those of the closed forms in :mod:`fisherlib.natural._solve`, rearranged
(e.g. Ollivier: a = D_b / (D_w D_b − c²), r = c / (D_w D_b − c²), β = (1 + Σ c r) / D_b), so the
result equals :func:`~fisherlib.natural.precondition`'s to rounding. Array API only.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from ..core._compat import array_namespace, device, is_eager
from ..estimators._running import from_units, to_units
from . import _solve
from ._precondition import Curvature, check_options, leaf_block, unit_term

Array = Any

__all__ = ["Preconditioner"]


class Preconditioner:
    """(F̃ + λI)⁻¹ of a :class:`Curvature`, factorised once; :meth:`apply` maps gradient leaves to steps.

    Parameters
    ----------
    curvature : Curvature
        The Fisher terms (e.g. ``Curvature.from_running(rf)``).
    kind, damping, unit_solve, pinv, rtol
        As in :func:`~fisherlib.natural.precondition`, whose result :meth:`apply` reproduces (to
        rounding) at a fraction of the per-step cost.
    inverse : callable, optional
        The inverse of a batch of symmetric positive definite matrices (..., S, S), for the dense
        kinds without ``pinv``: a framework's faster routine (the torch optimizer passes a
        Cholesky inverse, 2.4× faster than ``torch.linalg.inv`` on 64 blocks of 65²). Default:
        the namespace's ``linalg.inv``.
    factor : (make, solve), optional
        Instead of an inverse, keep ``make(A)`` (e.g. a Cholesky factor) of every dense block
        and apply ``solve(factor, v)`` (batched over (..., S)): the optax transformation's
        Cholesky factor and triangular solves, cheaper than an inverse at a refresh.
    static : bool
        Keep the arrays' structure independent of their values (``kind="quasidiag"`` then always
        keeps the per-unit choice between the arrowhead and Ollivier's step as arrays), so that
        :meth:`arrays` of two factorisations of one layout match: what a jitted optax state needs.
    relative_damping : bool
        Damp each leaf l by λ_l = ``damping`` · mean_i F̃_ii over the leaf (a leaf whose mean is
        0 takes the mean over all leaves) instead of by ``damping`` itself: (F̃ + Λ)⁻¹ g with
        Λ = diag(λ_l), the unit kinds damping a unit's weights by their leaf's λ and its bias by
        the bias leaf's. Scaling a layer's inputs by s scales its weights' Fisher by s² and their
        λ with it, so the step in function space does not change (exactly for "diag",
        "quasidiag", "ollivier", dense "unitwise" and "blocks"; with an absolute λ it does).

    Notes
    -----
    Cost: building does the solves' work that depends on F̃ and λ only (O(n) per unit for the
    diagonal, quasi-diagonal, Ollivier and Woodbury kinds; an O(S³) inverse per dense block);
    :meth:`apply` costs a few elementwise operations per leaf (O(P)), or one batched mat-vec
    (O(S²) per unit, O(P_l²) per block). Build a new one when F̃ is refreshed or λ changes
    (:meth:`matches` tells). A dense block is solved (as :func:`~fisherlib.natural.dense`) on
    the first :meth:`apply` and inverted on the second, so a factorisation used once costs no
    more than the fresh solve. The explicit inverse is as accurate as a solve up to a factor of
    the block's condition number, which λ bounds by (‖F̃‖ + λ) / λ.
    """

    def __init__(self, curvature: Curvature, kind: str = "diag", damping: float = 1e-3, *,
                 unit_solve: str = "auto", pinv: bool = False, rtol: float | None = None,
                 inverse: Callable[[Array], Array] | None = None,
                 factor: tuple[Callable[[Array], Any], Callable[[Any, Array], Array]] | None = None,
                 static: bool = False, relative_damping: bool = False):
        check_options(kind, unit_solve, curvature)
        lam = _solve._check_damping(damping)
        relative = bool(relative_damping)
        if relative and not lam > 0:
            raise ValueError(f"damping: relative damping needs a factor > 0, got {damping!r}")
        self.curvature, self.kind, self.damping, self.relative = curvature, kind, lam, relative
        self.unit_solve, self.pinv, self.rtol, self._inverse = unit_solve, pinv, rtol, inverse
        self._factor = None if pinv else factor
        lay = curvature.layout
        self.names = tuple(lay.names)
        self._xp = array_namespace(*curvature.terms.values())  # once: it costs µs per call
        lams = leaf_dampings(curvature, lam, self._xp) if relative else [lam] * len(lay.names)
        self.lambdas = lams
        # One entry per leaf or unit: (op, leaf indices, prepared arrays); leaves no op covers
        # get the diagonal.
        self._ops: list[tuple] = []
        covered: set[int] = set()
        if kind == "blocks":
            for gname, ids in curvature.groups.items():  # a layer's full block over several leaves
                block = curvature.terms[f"group:{gname}"]
                lam_vec = _group_damping(curvature, gname, ids, lams, block)
                self._ops.append(["group", ids, _damped(block, 0.0) + _diag_matrix(lam_vec), 0,
                                  [curvature.group_slice(gname, i) for i in ids]])
                covered.update(ids)
            for i, name in enumerate(lay.names):
                if i in covered:
                    continue
                self._ops.append(["block", i, _damped(leaf_block(curvature, name), lams[i]), 0])
                covered.add(i)
        elif kind != "diag":
            for u in lay.units:
                how, term = unit_term(curvature, u, kind, unit_solve)
                if how == "dense":
                    self._ops.append(["unit", u, _damped(term, lams[u.weight], None if u.bias is None else lams[u.bias]), 0])
                    covered.update(i for i in (u.weight, u.bias) if i is not None)
                    continue
                if how == "diagonal":
                    continue
                c = term
                dw = to_units(u, curvature.diag(u.weight), None)
                db = curvature.diag(u.bias)
                lw, lb = lams[u.weight], lams[u.bias]
                if kind == "quasidiag":
                    coef = _quasidiag(dw, db, c, lw, lb, static)
                else:
                    coef = {"ollivier": _ollivier, "unitwise": _woodbury}[kind](dw, db, c, lw, lb)
                self._ops.append(_unit_op(u, lay.shapes[u.weight], coef))
                covered.update((u.weight, u.bias))
        for i, name in enumerate(lay.names):
            if i not in covered:
                self._ops.append(("diag", i, curvature.diag(i) + lams[i]))

    def factorize(self) -> "Preconditioner":
        """Invert (or factor) the dense blocks now, instead of on the second :meth:`apply`; returns self."""
        for op in self._ops:
            if op[0] in ("unit", "block", "group") and op[3] < 2:
                op[2], op[3] = self._invert(op[2]), 2
        return self

    def arrays(self) -> list[Array]:
        """The prepared arrays (dense blocks inverted or factored), e.g. to keep in an optimizer's state."""
        self.factorize()
        out = []
        for op in self._ops:
            if op[0] == "diag":
                out.append(op[2])
            elif op[0] in ("unit", "block", "group"):
                out.append(op[2])
            else:
                out += [op[4], op[5]] + ([op[6]] if op[0] == "ollivier" else [v for v in op[6] if v is not None])
        return out

    def with_arrays(self, arrays: Sequence[Array]) -> "Preconditioner":
        """A copy that applies ``arrays`` (from :meth:`arrays` of a factorisation of the same layout,
        kind and options) instead of its own."""
        count = sum(1 if op[0] in ("diag", "unit", "block", "group") else
                    2 + (1 if op[0] == "ollivier" else sum(v is not None for v in op[6])) for op in self._ops)
        if len(arrays) != count:
            raise ValueError(f"arrays: expected {count} arrays for this factorisation, got {len(arrays)}")
        new = object.__new__(Preconditioner)
        new.__dict__.update(self.__dict__)
        it = iter(arrays)
        ops = []
        for op in self._ops:
            if op[0] == "diag":
                ops.append((op[0], op[1], next(it)))
            elif op[0] in ("unit", "block"):
                ops.append([op[0], op[1], next(it), 2])
            elif op[0] == "group":
                ops.append([op[0], op[1], next(it), 2, op[4]])
            elif op[0] == "ollivier":
                ops.append(op[:4] + (next(it), next(it), next(it)))
            else:
                a, r = next(it), next(it)
                ops.append(op[:4] + (a, r, tuple(None if v is None else next(it) for v in op[6])))
        new._ops = ops
        return new

    def matches(self, curvature: Curvature, damping: float, relative_damping: bool | None = None) -> bool:
        """Whether this factorisation is of ``curvature`` (the same object) and ``damping``
        (and, when given, ``relative_damping``)."""
        return (curvature is self.curvature and float(damping) == self.damping
                and (relative_damping is None or bool(relative_damping) == self.relative))

    def apply(self, grads: Sequence[Array]) -> list[Array]:
        """The steps (F̃ + λI)⁻¹ g for gradient leaves ``grads`` in the layout's order."""
        if len(grads) != len(self.names):
            raise ValueError(f"grads: expected {len(self.names)} leaves ({list(self.names)}), got {len(grads)}")
        out: list[Array | None] = [None] * len(grads)
        xp = self._xp
        for op in self._ops:
            tag = op[0]
            if tag == "diag":
                _, i, D = op
                out[i] = grads[i] / D
            elif tag == "ollivier":
                _, u, axes, bshape, a, r, beta = op
                gw, gb = grads[u.weight], grads[u.bias]
                out[u.weight] = a * gw - r * xp.reshape(gb, bshape)
                out[u.bias] = beta * gb - xp.sum(r * gw, axis=axes)
            elif tag == "general":
                _, u, axes, bshape, a, r, (sb, sh, beta, eta, mu) = op
                gw, gb = grads[u.weight], grads[u.bias]
                h = xp.sum(r * gw, axis=axes)
                s = sb * gb + sh * h
                out[u.weight] = a * gw - r * xp.reshape(s, bshape)
                if beta is None:  # the arrowhead form: δ_b = s
                    out[u.bias] = s
                else:
                    db = beta * gb + eta * s
                    out[u.bias] = db if mu is None else db + mu * h
            elif tag == "unit":
                u = op[1]
                gb = None if u.bias is None else grads[u.bias]
                v = self._dense(op, to_units(u, grads[u.weight], gb))
                out[u.weight], b = from_units(u, v, tuple(grads[u.weight].shape))
                if u.bias is not None:
                    out[u.bias] = b
            elif tag == "group":
                ids = op[1]
                v = self._dense(op, xp.concat([xp.reshape(grads[i], (-1,)) for i in ids]))
                for i, (a, b) in zip(ids, op[4]):
                    out[i] = xp.reshape(v[a:b], tuple(grads[i].shape))
            else:  # "block"
                i, g = op[1], grads[op[1]]
                out[i] = xp.reshape(self._dense(op, xp.reshape(g, (-1,))), tuple(g.shape))
        return out

    def _dense(self, op: list, v: Array) -> Array:
        """A⁻¹ v for op = [tag, leaf, A or its inverse, uses so far]: a solve on the first use, as
        precondition() does; from the second on, the (pseudo-)inverse, computed once."""
        xp = self._xp
        if op[3] < 2 and not is_eager(v):  # inside jit or vmap: store nothing traced on this object
            if self._factor is not None:
                return self._factor[1](self._factor[0](op[2]), v)
            if not self.pinv:
                return xp.linalg.solve(op[2], v[..., None])[..., 0]
            return xp.sum(self._invert(op[2]) * v[..., None, :], axis=-1)
        if self._factor is not None:
            if op[3] < 2:
                op[2], op[3] = self._factor[0](op[2]), 2
            return self._factor[1](op[2], v)
        op[3] += 1
        if op[3] == 1 and not self.pinv:
            return xp.linalg.solve(op[2], v[..., None])[..., 0]
        if op[3] <= 2:
            op[2], op[3] = self._invert(op[2]), 2
        # A mat-vec as a product and a sum: batched matmuls of small blocks are slower on a CPU.
        return xp.sum(op[2] * v[..., None, :], axis=-1)

    def _invert(self, a: Array) -> Array:
        xp = self._xp
        if self._factor is not None:
            return self._factor[0](a)
        if self.pinv:
            return xp.linalg.pinv(a) if self.rtol is None else xp.linalg.pinv(a, rtol=self.rtol)
        return self._inverse(a) if self._inverse is not None else xp.linalg.inv(a)

    def __repr__(self) -> str:
        rel = ", relative" if self.relative else ""
        return f"Preconditioner(kind={self.kind!r}, damping={self.damping:.3g}{rel}, leaves={len(self.names)})"


def leaf_dampings(curvature: Curvature, damping: float, xp) -> list[Array]:
    """λ_l = ``damping`` · mean_i F̃_ii over each leaf l (0-d arrays; traceable): a leaf whose
    mean is 0 (a parameter the outputs do not depend on) takes the mean over all leaves, and
    λ = ``damping`` where the whole diagonal is 0."""
    lay = curvature.layout
    means, sizes = [], []
    for i in range(len(lay.names)):
        d = curvature.diag(i)
        means.append(xp.mean(d))
        sizes.append(math.prod(lay.shapes[i]))
    total = sum(m * s for m, s in zip(means, sizes)) / sum(sizes)
    total = xp.where(total > 0, total, xp.ones_like(total))
    return [damping * xp.where(m > 0, m, total) for m in means]


def _group_damping(curvature: Curvature, name: str, ids, lams, like: Array) -> Array:
    """The damping of each entry of group ``name``'s block: its leaf's λ, as a vector."""
    xp = array_namespace(like)
    parts = []
    for i in ids:
        a, b = curvature.group_slice(name, i)
        parts.append(xp.zeros((b - a,), dtype=like.dtype, device=device(like)) + lams[i])
    return xp.concat(parts)


def _diag_matrix(v: Array) -> Array:
    xp = array_namespace(v)
    S = v.shape[0]
    return xp.eye(S, dtype=v.dtype, device=device(v)) * v[None, :]


def _damped(block: Array, lam, lam_bias=None) -> Array:
    """sym(F) + λI: the matrix :func:`~fisherlib.natural.dense` solves; with ``lam_bias`` (a unit
    block whose last row is its bias) the bias entry is damped by ``lam_bias`` instead."""
    xp = array_namespace(block)
    S = block.shape[-1]
    eye = xp.eye(S, dtype=block.dtype, device=device(block))
    sym = (block + xp.matrix_transpose(block)) / 2
    if lam_bias is None:
        return sym + lam * eye
    last = xp.astype(xp.arange(S, device=device(block)) == S - 1, block.dtype)
    return sym + eye * (lam * (1 - last) + lam_bias * last)


def _unit_op(u, shape: tuple[int, ...], coef: tuple) -> tuple:
    """The weight-shaped coefficients of a unit, with the axes to sum over and the bias's broadcast shape."""
    tag, a, r, scalars = coef
    a, _ = from_units(u, a, shape, bias=False)
    r, _ = from_units(u, r, shape, bias=False)
    nd = len(shape)
    if u.axis == 0:  # (U, in, ...): sum over the trailing axes; the bias broadcasts as (U, 1, ...)
        axes, bshape = tuple(range(1, nd)), (u.units,) + (1,) * (nd - 1)
    else:  # (..., in, U): sum over the leading axes; the bias broadcasts as is
        axes, bshape = tuple(range(nd - 1)), (u.units,)
    return (tag, u, axes, bshape, a, r, scalars)


def _ollivier(dw, db, c, lam, lam_b=None):
    """Ollivier: δ_w = a g_w − r g_b, δ_b = β g_b − ⟨r, g_w⟩ (expanded from :func:`_solve.ollivier`);
    the weights damped by ``lam``, the bias by ``lam_b`` (default ``lam``)."""
    lam_b = lam if lam_b is None else lam_b
    xp = array_namespace(dw, db, c)
    Dw, Db = dw + lam, (db + lam_b)[..., None]
    den = Dw * Db - c * c
    r = c / den
    return "ollivier", Db / den, r, (1 + xp.sum(c * r, axis=-1)) / Db[..., 0]


def _arrowhead_coef(dw, db, c, lam, lam_b):
    """Arrowhead: s = (g_b − h) / schur, δ_w = g_w / D_w − r s, δ_b = s; r = c / D_w."""
    xp = array_namespace(dw, db, c)
    Dw = dw + lam
    r = c / Dw
    inv_schur = 1 / (db + lam_b - xp.sum(c * r, axis=-1))
    return 1 / Dw, r, inv_schur, -inv_schur


def _quasidiag(dw, db, c, lam, lam_b=None, static=False):
    """The arrowhead solve where it is positive definite, Ollivier's step elsewhere (as precondition())."""
    lam_b = lam if lam_b is None else lam_b
    xp = array_namespace(dw, db, c)
    Dw = dw + lam  # _solve.arrowhead_definite, with the bias damped by lam_b
    ok = (db + lam_b - xp.sum(c * c / Dw, axis=-1) > 0) & xp.all(Dw > 0, axis=-1)
    a1, r1, sb, sh = _arrowhead_coef(dw, db, c, lam, lam_b)
    _, a2, r2, beta2 = _ollivier(dw, db, c, lam, lam_b)
    zero, one = xp.zeros_like(sb), xp.ones_like(sb)
    definite = False
    if not static:
        try:
            definite = bool(xp.all(ok))
        except Exception:  # noqa: BLE001 - a traced array (under jit) has no truth value: the mixed form
            pass
    if definite:  # every unit definite: the arrowhead form alone
        return "general", a1, r1, (sb, sh, None, None, None)
    # Ollivier in the general form: s = g_b, δ_w = a g_w − r s, δ_b = β g_b − h.
    okw = ok[..., None]
    return "general", xp.where(okw, a1, a2), xp.where(okw, r1, r2), (
        xp.where(ok, sb, one), xp.where(ok, sh, zero), xp.where(ok, zero, beta2), xp.where(ok, one, zero),
        xp.where(ok, zero, -one))


def _woodbury(dw, db, c, lam, lam_b=None):
    """Woodbury (see :func:`_solve.woodbury`): s = κ(h + e g_b), δ_w = g_w / D_w' − r s, δ_b = g_b/λ_b − e s."""
    if isinstance(lam, float) and lam <= 0:
        raise ValueError(f"damping: the Woodbury unit solve needs damping > 0, got {lam!r}")
    lam_b = lam if lam_b is None else lam_b
    xp = array_namespace(dw, db, c)
    live = db > 0
    f = xp.where(live, db, xp.ones_like(db))
    ab = xp.where(live, db, xp.zeros_like(db))
    c = xp.where(live[..., None], c, xp.zeros_like(c))
    Dw = dw + lam - c * c / f[..., None]
    r = c / Dw
    e = ab / lam_b
    kappa = 1 / (f + xp.sum(c * r, axis=-1) + ab * e)
    return "general", 1 / Dw, r, (kappa * e, kappa, xp.ones_like(db) / lam_b, -e, None)
