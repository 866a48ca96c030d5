"""Two classifiers that state their own vector-Jacobian product, on any Array API namespace.

CuPy and NumPy have no automatic differentiation, so their adapters (``fisherlib.backends.numpy``
and ``fisherlib.backends.cupy``) run models that provide, besides ``forward``, the product of a
cotangent with the Jacobian of the logits. This module gives two such models, written against
the Array API only (the namespace comes from the parameters), so they run unchanged on NumPy,
CuPy, array_api_strict, PyTorch and JAX arrays:

- :class:`Linear`: z = x Wᵀ + b. With softmax outputs (:mod:`fisherlib.simplex`) it is
  multinomial logistic regression, with sigmoid outputs (:mod:`fisherlib.hypercube`)
  multi-label logistic regression; its Fisher gives the coefficients' standard errors.
- :class:`MLP`: a multilayer perceptron with tanh or relu hidden layers.

The explicit-VJP protocol every such model follows (see ``docs/write-your-own-adapter.md``):

``forward(params, x) -> z``
    logits (N, C) for inputs x (N, D).
``vjp(params, x, ct) -> grads``
    ``ct`` (N, C) gives Σ_n J_nᵀ ct_n, a dict shaped like ``params``; ``ct`` (K, N, C) gives K
    such products at once, every leaf with a leading axis K.
``per_example_vjp(params, x, ct) -> grads`` (optional)
    ``ct`` (K, N, C) gives J_nᵀ ct[k, n] for every k and n: leaves (K, N, *leaf.shape).
``linearize(params, x) -> (z, vjp)`` (optional)
    one forward pass whose activations the returned ``vjp(ct)`` reuses.
``jvp(params, x, tangent) -> Jt`` (optional)
    the Jacobian-vector product (N, C) for a tangent shaped like ``params``, or (K, N, C) when
    every leaf has a leading axis K; matrix-free products F v use it (:mod:`fisherlib.spectral`).

Both models backpropagate with matrix products over the whole batch and all K cotangents at
once; there is no Python loop over inputs or probes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from array_api_compat import array_namespace
from array_api_compat import device as _device

Array = Any
Params = dict[str, Array]

__all__ = ["MLP", "Linear"]

_ACTIVATIONS = ("tanh", "relu")


class _Dense:
    """A chain of affine layers with an activation between them (none after the last)."""

    activation: str | None = None

    def __init__(self, sizes: Sequence[int], names: Sequence[str]):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"sizes: expected at least two positive layer widths, got {sizes}")
        self.sizes = sizes
        self._names = list(names)

    @property
    def in_features(self) -> int:
        """Width D of the inputs."""
        return self.sizes[0]

    @property
    def classes(self) -> int:
        """Number C of logits."""
        return self.sizes[-1]

    # -- parameters ---------------------------------------------------------------------------

    def init(self, seed: int = 0, *, like: Array | None = None, xp: Any = None,
             dtype: Any = None, device: Any = None) -> Params:
        """Random parameters: W and b uniform on ±1/√fan_in per layer (as ``torch.nn.Linear``).

        Parameters
        ----------
        seed : int
            Seed of the NumPy generator that draws the values; the same seed gives the same
            values in every namespace.
        like : array, optional
            Take the namespace, dtype and device from this array.
        xp : namespace or module, optional
            Array namespace (``numpy``, ``torch``, ``jax.numpy``, ``cupy``, ...); NumPy by default.
        dtype, device : optional
            Override the dtype (default: ``like``'s, else the namespace's default float) and device.

        Returns
        -------
        dict of str to array
            ``{"<layer>weight": (out, in), "<layer>bias": (out,)}`` for each layer.
        """
        import numpy as np  # a dependency of fisherlib; only draws the initial values

        if like is not None:
            xp = array_namespace(like)
            dtype = like.dtype if dtype is None else dtype
            device = _device(like) if device is None else device
        elif xp is None:
            xp = array_namespace(np.empty(0))
        else:
            xp = array_namespace(xp.asarray(0.0))  # wraps a bare module (torch, cupy) if needed
        if dtype is None:
            dtype = xp.__array_namespace_info__().default_dtypes(device=device)["real floating"]
        rng = np.random.default_rng(seed)
        params = {}
        for (wname, bname), fan_in, fan_out in zip(self._pairs(), self.sizes[:-1], self.sizes[1:]):
            bound = 1.0 / np.sqrt(fan_in)
            w = rng.uniform(-bound, bound, size=(fan_out, fan_in))
            b = rng.uniform(-bound, bound, size=(fan_out,))
            params[wname] = xp.asarray(w, dtype=dtype, device=device)
            params[bname] = xp.asarray(b, dtype=dtype, device=device)
        return params

    def _pairs(self) -> list[tuple[str, str]]:
        return [(self._names[2 * i], self._names[2 * i + 1]) for i in range(len(self.sizes) - 1)]

    def _layers(self, params: Params) -> list[tuple[Array, Array]]:
        if not hasattr(params, "keys"):
            raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
        missing = [n for n in self._names if n not in params]
        if missing:
            raise KeyError(f"params: missing {missing}; expected keys {self._names}")
        layers = [(params[w], params[b]) for w, b in self._pairs()]
        for (w, b), fan_in, fan_out, (wn, bn) in zip(layers, self.sizes[:-1], self.sizes[1:], self._pairs()):
            if tuple(w.shape) != (fan_out, fan_in) or tuple(b.shape) != (fan_out,):
                raise ValueError(
                    f"params: expected {wn} {(fan_out, fan_in)} and {bn} {(fan_out,)}, "
                    f"got {tuple(w.shape)} and {tuple(b.shape)}"
                )
        return layers

    # -- the explicit-VJP protocol --------------------------------------------------------------

    def forward(self, params: Params, x: Array) -> Array:
        """Logits (N, C) of inputs ``x`` (N, D)."""
        return self._forward(params, x)[0]

    def linearize(self, params: Params, x: Array) -> tuple[Array, Callable[[Array], Params]]:
        """One forward pass: (logits (N, C), ``vjp(ct)``), the vjp reusing its activations."""
        z, hs, layers, xp = self._forward(params, x)
        return z, lambda ct: self._backward(layers, hs, self._check_ct(ct, z, stacked=None), xp, False)

    def vjp(self, params: Params, x: Array, ct: Array) -> Params:
        """Σ_n J_nᵀ ct_n, summed over the inputs.

        Parameters
        ----------
        params : dict of str to array
        x : array (N, D)
        ct : array (N, C) or (K, N, C)
            Cotangents of the logits; a leading axis K stacks K of them.

        Returns
        -------
        dict of str to array
            Shaped like ``params``; each leaf has a leading axis K when ``ct`` has one.
        """
        z, hs, layers, xp = self._forward(params, x)
        return self._backward(layers, hs, self._check_ct(ct, z, stacked=None), xp, False)

    def per_example_vjp(self, params: Params, x: Array, ct: Array) -> Params:
        """J_nᵀ ct[k, n] for every probe k and input n, without summing over the inputs.

        Parameters
        ----------
        params : dict of str to array
        x : array (N, D)
        ct : array (K, N, C)

        Returns
        -------
        dict of str to array
            Leaves (K, N, *leaf.shape). Memory is K·N times the parameter count: chunk the inputs.
        """
        z, hs, layers, xp = self._forward(params, x)
        return self._backward(layers, hs, self._check_ct(ct, z, stacked=True), xp, True)

    def jvp(self, params: Params, x: Array, tangent: Params) -> Array:
        """J t = Σ_θ ∂z/∂θ · t_θ, the logits' change along the parameter direction ``tangent``.

        Parameters
        ----------
        params : dict of str to array
        x : array (N, D)
        tangent : dict of str to array
            Shaped like ``params``, or every leaf with a leading axis K for K directions at once.

        Returns
        -------
        array (N, C), or (K, N, C) for a stacked ``tangent``
            Forward mode through the layers: da = dh Wᵀ + h dWᵀ + db, dh' = act'(a) ⊙ da.
        """
        z, hs, layers, xp = self._forward(params, x)
        ts = self._layers_like(tangent, layers)
        stacked = ts[0][0].ndim == 3
        dh = None
        for i, ((w, _), (dw, db)) in enumerate(zip(layers, ts)):
            da = xp.matmul(hs[i], xp.matrix_transpose(dw)) + (db[..., None, :] if stacked else db)
            if dh is not None:
                da = da + xp.matmul(dh, xp.matrix_transpose(w))
            if i == len(layers) - 1:
                return da
            hout = hs[i + 1]  # the activation's output: its derivative is a function of it
            if self.activation == "tanh":
                dh = da * (1 - hout * hout)
            else:
                dh = xp.where(hout > 0, da, xp.zeros_like(da))
        raise AssertionError("unreachable")

    def _layers_like(self, tangent, layers):
        """The tangent's (dW, db) per layer, each shaped like the layer's (W, b) or with a leading K."""
        if not hasattr(tangent, "keys"):
            raise TypeError(f"tangent: expected a dict of arrays, got {type(tangent).__name__}")
        missing = [n for n in self._names if n not in tangent]
        if missing:
            raise KeyError(f"tangent: missing {missing}; expected keys {self._names}")
        out = [(tangent[wn], tangent[bn]) for wn, bn in self._pairs()]
        lead = tuple(out[0][0].shape[:-2])
        if len(lead) > 1:
            raise ValueError(f"tangent: expected {self._names[0]} of shape (out, in) or (K, out, in), "
                             f"got {tuple(out[0][0].shape)}")
        for (dw, db), (w, b), (wn, bn) in zip(out, layers, self._pairs()):
            if tuple(dw.shape) != lead + tuple(w.shape) or tuple(db.shape) != lead + tuple(b.shape):
                raise ValueError(f"tangent: expected {wn} {lead + tuple(w.shape)} and {bn} "
                                 f"{lead + tuple(b.shape)}, got {tuple(dw.shape)} and {tuple(db.shape)}")
        return out

    # -- the computations ---------------------------------------------------------------------

    def _forward(self, params, x):
        layers = self._layers(params)
        xp = array_namespace(x, *[a for layer in layers for a in layer])
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x: expected shape (N, {self.in_features}), got {tuple(x.shape)}")
        hs = [x]  # the input of each layer, kept for the backward pass
        h = x
        for i, (w, b) in enumerate(layers):
            a = xp.matmul(h, xp.matrix_transpose(w)) + b
            if i == len(layers) - 1:
                return a, hs, layers, xp
            h = xp.tanh(a) if self.activation == "tanh" else xp.maximum(a, xp.zeros_like(a))
            hs.append(h)
        raise AssertionError("unreachable")

    def _check_ct(self, ct, z, *, stacked):
        ok_ndim = (3,) if stacked else (2, 3)
        if ct.ndim not in ok_ndim or tuple(ct.shape[-2:]) != tuple(z.shape):
            want = "(K, N, C)" if stacked else "(N, C) or (K, N, C)"
            raise ValueError(f"ct: expected shape {want} with (N, C) = {tuple(z.shape)}, got {tuple(ct.shape)}")
        return ct

    def _backward(self, layers, hs, g, xp, per_example):
        grads = {}
        for i in range(len(layers) - 1, -1, -1):
            w, _ = layers[i]
            h = hs[i]
            wname, bname = self._pairs()[i]
            if per_example:  # (K, N, out, in): an outer product per input
                grads[wname] = g[..., :, :, None] * h[:, None, :]
                grads[bname] = g
            else:  # (..., out, N) @ (N, in): the sum over inputs is the matrix product
                grads[wname] = xp.matmul(xp.matrix_transpose(g), h)
                grads[bname] = xp.sum(g, axis=-2)
            if i > 0:
                g = xp.matmul(g, w)
                hin = hs[i]  # the activation's output: its derivative is a function of it
                if self.activation == "tanh":
                    g = g * (1 - hin * hin)
                else:
                    g = xp.where(hin > 0, g, xp.zeros_like(g))
        return {name: grads[name] for name in self._names}


class Linear(_Dense):
    """Linear classifier z = x Wᵀ + b: multinomial or multi-label logistic regression.

    The model only gives logits; which core space it is read in (softmax or sigmoid) is the
    estimator's choice.

    Parameters
    ----------
    in_features : int
        Input width D.
    classes : int
        Number C of logits.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherlib.models import Linear
    >>> model = Linear(3, 2)
    >>> params = model.init(seed=0)          # {"weight": (2, 3), "bias": (2,)}, float64 NumPy
    >>> x = np.ones((5, 3))
    >>> model.forward(params, x).shape
    (5, 2)
    >>> model.vjp(params, x, np.ones((4, 5, 2)))["weight"].shape   # 4 stacked cotangents
    (4, 2, 3)
    """

    def __init__(self, in_features: int, classes: int):
        super().__init__([in_features, classes], ["weight", "bias"])

    def __repr__(self) -> str:
        return f"Linear(in_features={self.in_features}, classes={self.classes})"


class MLP(_Dense):
    """Multilayer perceptron with tanh or relu hidden layers and linear logits.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths ``[D, H_1, ..., H_L, C]``: inputs, hidden layers, logits.
    activation : {"tanh", "relu"}
        Hidden-layer nonlinearity.

    Notes
    -----
    Parameters are named like those of ``torch.nn.Sequential`` of linear layers, numbered by
    layer: ``"0.weight"`` (H_1, D), ``"0.bias"`` (H_1,), ``"1.weight"``, ... The relu
    derivative at 0 is taken as 0.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherlib.models import MLP
    >>> model = MLP([4, 8, 3], activation="tanh")
    >>> params = model.init(seed=0)
    >>> sorted(params)
    ['0.bias', '0.weight', '1.bias', '1.weight']
    >>> x = np.ones((6, 4))
    >>> model.per_example_vjp(params, x, np.ones((2, 6, 3)))["0.weight"].shape
    (2, 6, 8, 4)
    """

    def __init__(self, sizes: Sequence[int], activation: str = "tanh"):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: expected one of {_ACTIVATIONS}, got {activation!r}")
        n = len(sizes) - 1
        super().__init__(sizes, [f"{i}.{kind}" for i in range(max(n, 0)) for kind in ("weight", "bias")])
        self.activation = activation

    def __repr__(self) -> str:
        return f"MLP(sizes={self.sizes}, activation={self.activation!r})"
