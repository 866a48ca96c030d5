"""natural_gradient (optax): one jitted step is precondition() of the running Fisher; it trains; its
state is a pytree that round-trips through NumPy."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

from fisherlib import backends  # noqa: E402
from fisherlib.estimators import RunningFisher  # noqa: E402
from fisherlib.natural import Curvature, natural_gradient, precondition, value_grad_and_probes  # noqa: E402

N = 32


def f(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _setup():
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(6, 8)) / 2), "b1": jnp.zeros(8),
              "w2": jnp.asarray(rng.normal(size=(8, 3)) / 2), "b2": jnp.zeros(3)}
    x = jnp.asarray(rng.normal(size=(N, 6)))
    y = jnp.asarray((np.asarray(x[:, 0]) > 0).astype(int) + (np.asarray(x[:, 1]) > 0.5))
    return params, x, y


def _make_step(tx):
    @jax.jit
    def step(p, st, seed):
        loss, g, pg = value_grad_and_probes(f, p, X, Y, seed, probes=2)
        u, st = tx.update(g, st, p, probe_grads=pg, n=N)
        return optax.apply_updates(p, u), st, loss

    return step


PARAMS, X, Y = _setup()


@pytest.mark.slow
def test_step_matches_precondition_and_trains_and_checkpoints():
    tx = natural_gradient(0.1, preconditioner="ollivier", damping=0.05, kl_clip=None, momentum=0.5)
    st = tx.init(PARAMS)
    step = _make_step(tx)
    p1, st1, loss0 = step(PARAMS, st, 3)
    loss, g, pg = jax.jit(lambda p: value_grad_and_probes(f, p, X, Y, 3, probes=2))(PARAMS)

    # The loss, its gradient and the probe gradients J_xᵀ B(p̃) ξ_k, by hand in one compiled call.
    @jax.jit
    def by_hand(p, xi):
        value, grad = jax.value_and_grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(f(q, X), Y).mean())(p)
        z, pull = jax.vjp(lambda q: f(q, X), p)
        prob = jax.nn.softmax(z)
        ct = jnp.sqrt(prob) * xi - prob * jnp.sum(jnp.sqrt(prob) * xi, axis=-1, keepdims=True)
        return value, grad, jax.vmap(lambda c: pull(c)[0])(ct)

    xi = backends.get("jax").probes(3, (2, N, 3), "rademacher", like=X)
    v_ref, g_ref, pg_ref = by_hand(PARAMS, xi)
    assert abs(float(loss) - float(v_ref)) < 1e-12
    for n in PARAMS:
        np.testing.assert_allclose(g[n], g_ref[n], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(pg[n], pg_ref[n], rtol=1e-10, atol=1e-13)
    # The step: RunningFisher's terms and precondition() (in NumPy: eager JAX compiles op by op).
    rf = RunningFisher("quasidiag", probes=2)
    names = list(PARAMS)
    rf.update([np.asarray(pg[n]) for n in names], names, N)
    d = precondition({n: np.asarray(g[n]) for n in PARAMS}, Curvature.from_running(rf), "ollivier", 0.05)
    for n in PARAMS:
        np.testing.assert_allclose(p1[n], PARAMS[n] - 0.1 * d[n], rtol=1e-10, atol=1e-12)
    # Training lowers the loss.
    p, s = p1, st1
    for t in range(40):
        p, s, loss = step(p, s, 10 + t)
    assert float(loss) < 0.5 * float(loss0)
    # Checkpoint: flatten the state to NumPy and back, continue identically.
    leaves, treedef = jax.tree_util.tree_flatten(s)
    restored = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(np.asarray(a)) for a in leaves])
    pa, sa, _ = step(p, s, 99)
    pb, sb, _ = step(p, restored, 99)
    for n in PARAMS:
        np.testing.assert_array_equal(pa[n], pb[n])
    # Between refreshes (no probe gradients) the last estimate is used and kept.
    u, s2 = jax.jit(lambda g, s: tx.update(g, s))(g, st1)
    assert int(s2.fisher["t"]) == 1
    np.testing.assert_allclose(u["b2"], -0.1 * (0.5 * d["b2"] + d["b2"]), rtol=1e-10)  # momentum 0.5


@pytest.mark.slow
def test_dense_unit_blocks_trace_and_train():
    tx = natural_gradient(0.05, preconditioner="unitwise", damping=1e-2)
    step = _make_step(tx)
    p, s = PARAMS, tx.init(PARAMS)
    p, s, first = step(p, s, 0)
    for t in range(30):
        p, s, loss = step(p, s, t + 1)
    assert float(loss) < 0.7 * float(first)
    assert s.fisher["m"]["unit:w1"].shape == (8, 7, 7)


def test_errors_are_named():
    tx = natural_gradient(0.1)
    with pytest.raises(ValueError, match="n:"):
        tx.update(PARAMS, tx.init(PARAMS), PARAMS, probe_grads=PARAMS)
    with pytest.raises(ValueError, match="preconditioner"):
        natural_gradient(0.1, preconditioner="kfac")
    with pytest.raises(ValueError, match="kl_clip"):
        natural_gradient(0.1, kl_clip=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unitwise", "quasidiag"])
def test_updates_between_refreshes_apply_the_kept_factorisation(kind):
    """A refresh keeps the factorised F̃ + λI in the state (dense unit blocks: a Cholesky factor);
    later updates without probes apply it to new gradients: precondition() of the kept estimate."""
    tx = natural_gradient(1.0, preconditioner=kind, damping=0.05, kl_clip=None)
    st = tx.init(PARAMS)
    _, g, pg = jax.jit(lambda p: value_grad_and_probes(f, p, X, Y, 5, probes=2))(PARAMS)
    _, st = jax.jit(lambda g, s, pg: tx.update(g, s, probe_grads=pg, n=N))(g, st, pg)
    g2 = {n: jnp.asarray(np.random.default_rng(1).normal(size=v.shape)) for n, v in PARAMS.items()}
    u, st2 = jax.jit(lambda g, s: tx.update(g, s))(g2, st)
    assert all(np.array_equal(a, b) for a, b in zip(st.factors, st2.factors))
    rf = RunningFisher("unitwise" if kind == "unitwise" else "quasidiag", probes=2)
    names = list(PARAMS)
    rf.update([np.asarray(pg[n]) for n in names], names, N)
    d = precondition({n: np.asarray(g2[n]) for n in names}, Curvature.from_running(rf), kind, 0.05)
    for n in names:
        np.testing.assert_allclose(u[n], -d[n], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_the_docs_optax_example_runs_as_written_and_trains():
    """docs/natural-gradient.md's optax snippet is a ```python block that defines everything it
    uses, so tests/test_docs.py runs it as written; here it runs on its own and trains."""
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "docs" / "natural-gradient.md"
    if not path.exists():
        pytest.skip("no docs/ beside the tests (a copy of the package and its tests alone)")
    page = path.read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", page, re.S | re.M) if "natural_gradient(" in b]
    assert len(blocks) == 1, "the optax example is a ```python block of its own"
    ns: dict = {"__name__": "docs_example"}  # nothing defined beforehand
    exec(compile(blocks[0], "docs/natural-gradient.md optax example", "exec"), ns)
    assert ns["losses"][-1] < 0.8 * ns["losses"][0]


@pytest.mark.slow
def test_relative_damping_under_jit_is_the_preconditioners():
    """natural_gradient(relative_damping=True), jitted: the step is Preconditioner(relative_damping=True)
    of the running estimate (λ_l = ρ · mean diag F̃ per leaf), as NaturalGradient's."""
    from fisherlib.natural import Preconditioner

    tx = natural_gradient(0.1, preconditioner="ollivier", damping=0.3, kl_clip=None, relative_damping=True)
    p1, _, _ = _make_step(tx)(PARAMS, tx.init(PARAMS), 3)
    _, g, pg = jax.jit(lambda p: value_grad_and_probes(f, p, X, Y, 3, probes=2))(PARAMS)
    rf = RunningFisher("quasidiag", probes=2)
    names = list(PARAMS)
    rf.update([np.asarray(pg[n]) for n in names], names, N)
    pre = Preconditioner(Curvature.from_running(rf), "ollivier", 0.3, relative_damping=True)
    for n, d in zip(pre.names, pre.apply([np.asarray(g[n]) for n in pre.names])):
        np.testing.assert_allclose(p1[n], PARAMS[n] - 0.1 * d, rtol=1e-9, atol=1e-12)


def test_a_one_logit_model_takes_the_sigmoid_likelihood():
    """value_grad_and_probes(likelihood="sigmoid") of a one-logit model: the mean binary
    cross-entropy, its gradient, and probe gradients Jᵀ(√σ′(z) ⊙ ξ), each against JAX by hand;
    under the default softmax it is an error naming likelihood='sigmoid', and so are no targets."""
    def g1(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"][:, :1] + p["b2"][:1]

    yb = (np.asarray(X[:, 0]) > 0).astype(float)
    value, grads, pg = value_grad_and_probes(g1, PARAMS, X, yb, 5, probes=2, likelihood="sigmoid")
    ref_v, ref_g = jax.value_and_grad(lambda p: optax.sigmoid_binary_cross_entropy(g1(p, X)[:, 0], yb).mean())(PARAMS)
    assert abs(float(value) - float(ref_v)) < 1e-12
    z, pull = jax.vjp(lambda p: g1(p, X), PARAMS)
    xi = backends.get("jax").probes(5, (2, N, 1), "rademacher", like=X)
    s = jax.nn.sigmoid(z)
    ref_pg = jax.vmap(lambda c: pull(c)[0])(jnp.sqrt(s * (1 - s)) * xi)
    for n in PARAMS:
        np.testing.assert_allclose(grads[n], ref_g[n], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(pg[n], ref_pg[n], rtol=1e-10, atol=1e-13)
    plain, plain_g, none = value_grad_and_probes(g1, PARAMS, X, yb, 5, probes=0, likelihood="sigmoid")
    assert none is None and abs(float(plain) - float(ref_v)) < 1e-12
    with pytest.raises(ValueError, match="likelihood='sigmoid'"):
        value_grad_and_probes(g1, PARAMS, X, yb.astype(int), 5)
    with pytest.raises(ValueError, match="targets: got None"):
        value_grad_and_probes(f, PARAMS, X, None, 5)
