"""An inf input gave a Fisher with NaN entries and no error (issue 23): the logits stayed finite
through a saturating activation, and nothing looked at the gradients."""

from __future__ import annotations

import numpy as np
import pytest

import fisherlib
from fisherlib.models import MLP


@pytest.mark.parametrize("kwargs", [dict(), dict(method="exact"), dict(structure="blocks"),
                                    dict(structure="trace"), dict(probes=4, keep_probes=False)],
                         ids=["hutchinson", "exact", "blocks", "trace", "moments"])
def test_inf_input_is_an_error_on_numpy(kwargs):
    model = MLP([3, 4, 3], activation="tanh")
    x = np.ones((4, 3))
    x[1, 0] = np.inf
    with np.errstate(invalid="ignore", over="ignore"), pytest.raises(ValueError, match="non-finite") as e:
        fisherlib.fisher(model, model.init(0), [np.ones((2, 3)), x], **kwargs)
    assert "input" in str(e.value)
    if not kwargs:
        assert "0.weight" in str(e.value)  # the leaf it reached


def test_inf_input_is_an_error_on_torch():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.ones(4, 3)
    x[1, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite entries .* in 0.weight"):
        fisherlib.fisher(net, None, x)
    ok = fisherlib.fisher(net, None, torch.ones(4, 3))  # finite inputs: no error, finite values
    assert all(bool(torch.isfinite(v).all()) for v in ok.value.values())


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_inf_input_is_an_error_for_kronecker_factors(structure):
    """K-FAC's sums were never checked: an inf input gave inf and NaN factors and no error."""
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.ones(4, 3)
    x[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite entries .* in 0 \(A\)"):
        fisherlib.fisher(net, None, [x], structure=structure)
    ok = fisherlib.fisher(net, None, [torch.ones(4, 3)], structure=structure)
    assert all(bool(torch.isfinite(p).all()) for p in ok.parts)


def test_inf_input_is_an_error_for_kronecker_factors_on_jax():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(np.abs(rng.normal(size=(3, 4)))), "w2": jnp.asarray(rng.normal(size=(4, 3)))}

    def f(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    x = np.ones((4, 3))
    x[1, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite entries .* in w1 \\(A\\)"):
        fisherlib.fisher(f, params, [jnp.asarray(x)], structure="kfac")
