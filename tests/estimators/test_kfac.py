"""fisher(structure="kfac" | "ekfac") against dense float64 references, on torch and JAX.

References are written out by hand for a two-layer tanh MLP z = W₂ tanh(W₁x + b₁) + b₂:
A_l = (1/N) Σ x̃ x̃ᵀ from the layer inputs, G_l = Σ_n J_nᵀ K_n J_n with J_n the Jacobian of
the logits at the layer's output and K_n the output Fisher (exact), the label residual's
outer product (empirical). The exact Fisher's blocks come from per-example Jacobians
(``fisher_reference``). Statistical tests compare random factors with the exact ones within
five of their own standard errors, and show that a biased variant fails that tolerance.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fisherlib
from fisherlib import KroneckerEstimate, KroneckerFallbackWarning
from fisher_reference import dense_fisher, jacobians, softmax

torch = pytest.importorskip("torch")

D, H, C, N = 4, 6, 3, 24


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)).double()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(N, D)), rng.integers(0, C, size=N)


def _reference(net, x, y=None):
    """{block: (A, G)} for the MLP: exact G, or the empirical one with labels ``y``."""
    W1, b1, W2, b2 = (p.detach().numpy() for p in net.parameters())
    a = np.tanh(x @ W1.T + b1)
    z = a @ W2.T + b2
    p = softmax(z)
    if y is None:
        K = np.stack([np.diag(r) - np.outer(r, r) for r in p])
    else:
        r = np.eye(C)[y] - p
        K = np.einsum("ni,nj->nij", r, r)
    J1 = W2[None, :, :] * (1 - a * a)[:, None, :]  # ∂z/∂(W₁x + b₁): (N, C, H)
    ones = np.ones((len(x), 1))
    x1, x2 = np.hstack([x, ones]), np.hstack([a, ones])
    return {"0": (x1.T @ x1 / len(x), np.einsum("nci,ncd,ndj->ij", J1, K, J1)),
            "2": (x2.T @ x2 / len(x), K.sum(0))}


def _np(a):
    return a.detach().numpy() if hasattr(a, "detach") else np.asarray(a)


def _jax_twin(net):
    """The MLP as a JAX function of a dict with torch's leaf names and layouts."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in net.state_dict().items()}

    def f(p, x):
        return jnp.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]

    return f, params, jnp


def _fit(framework, net, x, **kw):
    if framework == "torch":
        return fisherlib.fisher(net, None, [torch.as_tensor(x)], **kw)
    f, params, jnp = _jax_twin(net)
    return fisherlib.fisher(f, params, [jnp.asarray(x)], **kw)


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_factors_match_the_dense_reference(framework, method, data):
    x, y = data
    net = _mlp()
    if framework == "torch":
        est = fisherlib.fisher(net, None, [(torch.as_tensor(x), torch.as_tensor(y))], structure="kfac", method=method)
    else:
        f, params, jnp = _jax_twin(net)
        est = fisherlib.fisher(f, params, [(jnp.asarray(x), jnp.asarray(y))], structure="kfac", method=method)
    ref = _reference(net, x, y if method == "empirical" else None)
    assert [b.name for b in est.blocks] == ["0", "2"] and est.fallback == []
    for name, (A, G) in ref.items():
        np.testing.assert_allclose(_np(est.factors[name]["A"])[0], A, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(_np(est.factors[name]["G"])[0], G, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(_np(est.factor_stderr[name]["G"]), 0)
    # the diagonal of A ⊗ G, mapped to the leaves: weight (O, I), bias (O,)
    A, G = ref["2"]
    np.testing.assert_allclose(_np(est.value["2.weight"]), np.outer(np.diag(G), np.diag(A)[:-1]), rtol=1e-10)
    np.testing.assert_allclose(_np(est.value["2.bias"]), np.diag(G) * A[-1, -1], rtol=1e-10)


def test_one_linear_layer_is_exact_when_the_output_fisher_is_shared():
    """F_W = Σ x̃ x̃ᵀ ⊗ I(z_n) is A ⊗ G when every input has the same I(z): one input, or zero weights."""
    lin = torch.nn.Linear(D, C).double()
    x = torch.as_tensor(np.random.default_rng(2).normal(size=(5, D)))
    be = fisherlib.backends.get("torch")
    for xs, zero in ((x[:1], False), (x, True)):
        if zero:
            with torch.no_grad():
                lin.weight.zero_()
        est = fisherlib.fisher(lin, None, [xs], structure="kfac", method="exact")
        z, J = jacobians(be, lin, dict(lin.named_parameters()), xs)
        np.testing.assert_allclose(_np(est.to_dense()), dense_fisher(J, z), rtol=1e-10, atol=1e-14)
    # with different I(z_n), K-FAC replaces them by their mean: no longer the Fisher
    torch.manual_seed(0)
    lin2 = torch.nn.Linear(D, C).double()
    est = fisherlib.fisher(lin2, None, [x], structure="kfac", method="exact")
    z, J = jacobians(be, lin2, dict(lin2.named_parameters()), x)
    assert not np.allclose(_np(est.to_dense()), dense_fisher(J, z), rtol=1e-3)


@pytest.mark.parametrize("method", ["hutchinson", "mc"])
def test_random_factors_are_unbiased(method, data):
    x, _ = data
    net = _mlp()
    exact = fisherlib.fisher(net, None, [torch.as_tensor(x)], structure="kfac", method="exact")
    est = fisherlib.fisher(net, None, [torch.as_tensor(x)] * 4, structure="kfac", method=method, probes=64, seed=0)
    assert est.stderr_kind == "probes" and est.n_probes == 64
    for name in ("0", "2"):
        G, se = _np(est.factors[name]["G"]) / 4, _np(est.factor_stderr[name]["G"]) / 4
        ref = _np(exact.factors[name]["G"])
        assert np.all(np.abs(G - ref) <= 5 * se + 1e-12), name
        assert np.all(se > 0)
    # a biased cotangent (the upper bound's, diag(p) instead of diag(p) - ppᵀ) fails the same check
    up = fisherlib.fisher(net, None, [torch.as_tensor(x)] * 4, structure="kfac", bound="upper", probes=16, seed=3)
    G, se = _np(up.factors["2"]["G"]) / 4, _np(up.factor_stderr["2"]["G"]) / 4
    assert not np.all(np.abs(G - _np(exact.factors["2"]["G"])) <= 5 * se + 1e-12)


def test_one_probe_reports_the_bound(data):
    x, _ = data
    est = fisherlib.fisher(_mlp(), None, [torch.as_tensor(x)], structure="kfac")
    assert est.stderr_kind == "bound"
    G, se = _np(est.factors["2"]["G"])[0], _np(est.factor_stderr["2"]["G"])[0]
    d = np.abs(np.diag(G))
    np.testing.assert_allclose(se, np.sqrt(np.outer(d, d) + G * G), rtol=1e-12)


def test_reduction_merge_and_save_load(tmp_path, data):
    x, _ = data
    net = _mlp()
    X = torch.as_tensor(x)
    whole = fisherlib.fisher(net, None, [X], structure="kfac", method="exact")
    a = fisherlib.fisher(net, None, [X[:10]], structure="kfac", method="exact", first_batch=0)
    b = fisherlib.fisher(net, None, [X[10:]], structure="kfac", method="exact", first_batch=1)
    merged = a.merge(b)
    np.testing.assert_allclose(_np(merged.to_dense()), _np(whole.to_dense()), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="twice"):
        a.merge(a)
    with pytest.raises(TypeError, match="other"):
        a.merge(fisherlib.fisher(net, None, [X], method="exact"))
    mean = fisherlib.fisher(net, None, [X], structure="kfac", method="exact", reduction="mean")
    np.testing.assert_allclose(_np(mean.to_dense()) * N, _np(whole.to_dense()), rtol=1e-10)
    whole.save(tmp_path / "k")
    back = KroneckerEstimate.load(tmp_path / "k")
    np.testing.assert_allclose(back.to_dense(), _np(whole.to_dense()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="KroneckerEstimate"):
        whole_diag = fisherlib.fisher(net, None, [X], method="exact")
        whole_diag.save(tmp_path / "d")
        KroneckerEstimate.load(tmp_path / "d")


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_products_agree_with_the_dense_matrix(structure, data):
    x, _ = data
    net = _mlp()
    est = fisherlib.fisher(net, None, [torch.as_tensor(x)], structure=structure, method="exact")
    F = _np(est.to_dense())
    P = F.shape[0]
    np.testing.assert_allclose(F, F.T, atol=1e-12)
    rng = np.random.default_rng(4)
    v = {n: torch.as_tensor(rng.normal(size=p.shape)) for n, p in net.named_parameters()}
    flat = np.concatenate([_np(t).ravel() for t in v.values()])
    Fv = est.matvec(v)
    np.testing.assert_allclose(np.concatenate([_np(t).ravel() for t in Fv.values()]), F @ flat, rtol=1e-9)
    lam = 1e-2
    s = est.solve(v, lam)
    np.testing.assert_allclose(np.concatenate([_np(t).ravel() for t in s.values()]),
                               np.linalg.solve(F + lam * np.eye(P), flat), rtol=1e-7)
    np.testing.assert_allclose(est.logdet(lam), np.linalg.slogdet(F + lam * np.eye(P))[1], rtol=1e-9)
    np.testing.assert_allclose(est.trace(), np.trace(F), rtol=1e-10)
    V = torch.as_tensor(rng.normal(size=(3, P)))
    np.testing.assert_allclose(_np(est.matmat(V)), _np(V) @ F, rtol=1e-9)
    top = fisherlib.spectral.top_eigenpairs(est.matmat, torch.ones(P, dtype=torch.float64), k=2)
    np.testing.assert_allclose(_np(top.values)[:2], np.linalg.eigvalsh(F)[::-1][:2], rtol=1e-6)
    with pytest.raises(ValueError, match="damping"):
        est.solve(v, -1.0)


def test_ekfac_refits_the_fisher_diagonal_in_the_kfac_eigenbasis(data):
    x, _ = data
    net = _mlp()
    X = torch.as_tensor(x)
    kfac = fisherlib.fisher(net, None, [X], structure="kfac", method="exact")
    ekfac = fisherlib.fisher(net, None, [X], structure="ekfac", method="exact")
    z, J = jacobians(fisherlib.backends.get("torch"), net, dict(net.named_parameters()), X)
    F = dense_fisher(J, z)
    # the last layer's block in core order (o, i): weight (O, I) row-major, then the bias column
    start = D * H + H  # the first layer's leaves come first
    idx = np.hstack([np.arange(start, start + C * H).reshape(C, H),
                     np.arange(start + C * H, start + C * H + C)[:, None]]).ravel()
    Fb = F[np.ix_(idx, idx)]
    (_, QA), (_, QG) = kfac._eig(kfac.blocks[1])
    Q = np.kron(_np(QG)[0], _np(QA)[0])
    S = _np(ekfac.factors["2"]["S"])[0]
    np.testing.assert_allclose(S.ravel(), np.diag(Q.T @ Fb @ Q), rtol=1e-9, atol=1e-13)
    # the EK-FAC block is closer to the Fisher's than K-FAC's (its diagonal is the best in that basis)
    err = [np.linalg.norm(_np(e.to_dense())[np.ix_(idx, idx)] - Fb) for e in (kfac, ekfac)]
    assert err[1] < err[0]
    with pytest.raises(ValueError, match="iterator"):
        fisherlib.fisher(net, None, iter([X]), structure="ekfac", method="exact")


def test_ekfac_with_a_given_basis_merges_across_shards(data):
    x, _ = data
    net = _mlp()
    X = torch.as_tensor(x)
    kfac = fisherlib.fisher(net, None, [X], structure="kfac", method="exact")
    whole = fisherlib.fisher(net, None, [X], structure="ekfac", method="exact", basis=kfac)
    a = fisherlib.fisher(net, None, [X[:8]], structure="ekfac", method="exact", basis=kfac, first_batch=0)
    b = fisherlib.fisher(net, None, [X[8:]], structure="ekfac", method="exact", basis=kfac, first_batch=1)
    np.testing.assert_allclose(_np(a.merge(b).to_dense()), _np(whole.to_dense()), rtol=1e-10, atol=1e-14)
    other = fisherlib.fisher(net, None, [X[8:]], structure="ekfac", method="exact", first_batch=1)
    with pytest.raises(ValueError, match="eigenbas"):
        a.merge(other)
    with pytest.raises(TypeError, match="basis"):
        fisherlib.fisher(net, None, [X], structure="ekfac", basis=whole)


def test_reduce_is_exact_for_a_pooled_linear_sequence_model():
    """z = W₂ mean_t(W₁ x_t + b₁) + b₂: the per-example gradient of W₁ is ḡ x̄ᵀ, so K-FAC-reduce
    is the exact block for one input (Eschenhagen et al., 2023), while expand is not."""

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = torch.nn.Linear(D, H), torch.nn.Linear(H, C)

        def forward(self, x):
            return self.head(self.inner(x).mean(1))

    torch.manual_seed(1)
    net = Pooled().double()
    x = torch.as_tensor(np.random.default_rng(5).normal(size=(1, 5, D)))
    be = fisherlib.backends.get("torch")
    z, J = jacobians(be, net, dict(net.named_parameters()), x)
    F = dense_fisher(J, z)
    P1 = D * H + H
    for setting, exact in (("reduce", True), ("expand", False)):
        est = fisherlib.fisher(net, None, [x], structure="kfac", method="exact", kfac_approx=setting)
        block = _np(est.to_dense())[:P1, :P1]
        assert np.allclose(block, F[:P1, :P1], rtol=1e-9, atol=1e-13) == exact, setting


def test_token_level_expand_with_a_mask_counts_only_kept_positions():
    """Masked positions count in neither factor: padding a batch changes nothing."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)).double()
    rng = np.random.default_rng(6)
    x = torch.as_tensor(rng.normal(size=(3, 4, D)))
    padded = torch.cat([x, torch.as_tensor(rng.normal(size=(3, 2, D)))], dim=1)
    mask = torch.cat([torch.ones(3, 4), torch.zeros(3, 2)], dim=1)
    a = fisherlib.fisher(net, None, [x], structure="kfac", method="exact")
    b = fisherlib.fisher(net, None, [padded], structure="kfac", method="exact", mask=lambda _: mask)
    for name in ("0", "2"):
        for r in ("A", "G"):
            np.testing.assert_allclose(_np(b.factors[name][r]), _np(a.factors[name][r]), rtol=1e-10, atol=1e-14)
    assert b.n_outputs == 12


def test_embedding_block_is_exact_for_one_token():
    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 3, padding_idx=0)
            self.head = torch.nn.Linear(3, C)

        def forward(self, t):
            return self.head(torch.tanh(self.emb(t).mean(1)))

    torch.manual_seed(3)
    net = Bag().double()
    t = torch.tensor([[4]])
    est = fisherlib.fisher(net, None, [t], structure="kfac", method="exact")
    assert est.blocks[0].kind == "embedding" and est.blocks[0].diagonal
    z, J = jacobians(fisherlib.backends.get("torch"), net, dict(net.named_parameters()), t)
    F = dense_fisher(J, z)
    np.testing.assert_allclose(_np(est.to_dense())[:21, :21], F[:21, :21], rtol=1e-10, atol=1e-14)
    many = fisherlib.fisher(net, None, [torch.tensor([[0, 2, 2], [1, 0, 5]])], structure="kfac", method="exact")
    assert np.all(_np(many.value["emb.weight"])[0] == 0)  # the padding row
    e = fisherlib.fisher(net, None, [torch.tensor([[3, 2, 2], [1, 6, 5]])], structure="ekfac", method="exact")
    assert np.all(np.isfinite(_np(e.to_dense())))


def test_uncovered_leaves_fall_back_to_their_diagonal_with_a_warning(data):
    x, _ = data
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.LayerNorm(H), torch.nn.Linear(H, C)).double()
    X = torch.as_tensor(x)
    with pytest.warns(KroneckerFallbackWarning, match="1.weight, 1.bias"):
        est = fisherlib.fisher(net, None, [X], structure="kfac", method="exact")
    assert est.fallback == ["1.weight", "1.bias"]
    exact = fisherlib.fisher(net, None, [X], method="exact")
    for n in est.fallback:
        np.testing.assert_allclose(_np(est.value[n]), _np(exact.value[n]), rtol=1e-10)
        np.testing.assert_allclose(_np(est.stderr[n]), 0)
    # a model without layer I/O: everything on the diagonal, still the exact one
    be = fisherlib.backends.get("torch", layer_io=False)
    with pytest.warns(KroneckerFallbackWarning):
        flat = fisherlib.fisher(net, None, [X], structure="kfac", method="exact", backend=be)
    assert flat.blocks == [] and len(flat.fallback) == 6


@pytest.mark.parametrize(("kw", "match"), [
    (dict(kfac_approx="mean"), "kfac_approx"),
    (dict(structure="diag", kfac_approx="reduce"), "kfac_approx"),
    (dict(per_example=False), "per_example"),
    (dict(structure="kfac", basis=object()), "basis"),
])
def test_bad_arguments_name_themselves(kw, match, data):
    x, _ = data
    kw = {"structure": "kfac", **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fisherlib.fisher(_mlp(), None, [torch.as_tensor(x)], **kw)


def test_jax_ekfac_and_trees_match_torch(data):
    jax = pytest.importorskip("jax")
    x, _ = data
    net = _mlp()
    t = fisherlib.fisher(net, None, [torch.as_tensor(x)], structure="ekfac", method="exact")
    f, params, jnp = _jax_twin(net)
    j = fisherlib.fisher(f, params, [jnp.asarray(x)], structure="ekfac", method="exact")
    for n in t.names:
        np.testing.assert_allclose(np.asarray(j.value[n]), _np(t.value[n]), rtol=1e-9, atol=1e-13)
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    out = j.solve(ones, 0.1)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    ref = t.solve({n: torch.ones_like(p) for n, p in net.named_parameters()}, 0.1)
    for n in t.names:
        np.testing.assert_allclose(np.asarray(out[n]), _np(ref[n]), rtol=1e-8)


def test_jax_devices_reduce_kronecker_estimates(data):
    """distributed.jax_fisher compiles each device's batches and sums the K-FAC parts like any estimate."""
    pytest.importorskip("jax")
    import fisherlib.distributed as fd

    x, _ = data
    f, params, jnp = _jax_twin(_mlp())
    xs = [jnp.asarray(x[i:i + 6]) for i in range(0, N, 6)]
    for kw in (dict(method="exact"), dict(probes=2, seed=1)):
        got = fd.jax_fisher(f, params, xs, structure="kfac", **kw)
        ref = fisherlib.fisher(f, params, xs, structure="kfac", first_batch=0, **kw)
        assert isinstance(got, KroneckerEstimate) and got.draws == ref.draws
        np.testing.assert_allclose(np.asarray(got.to_dense()), np.asarray(ref.to_dense()), rtol=1e-10, atol=1e-13)


def test_leaves_used_twice_get_an_unbiased_batch_diagonal(data):
    """A layer called twice is not a Kronecker block; with random probes its diagonal is the batch's
    pulled-back probe squared (no per-example vmap), unbiased within five standard errors."""

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = torch.nn.Linear(D, D), torch.nn.Linear(D, C)

        def forward(self, x):
            return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))

    torch.manual_seed(5)
    net = Twice().double()
    X = torch.as_tensor(data[0])
    with pytest.warns(KroneckerFallbackWarning, match="inner.weight"):
        est = fisherlib.fisher(net, None, [X] * 8, structure="kfac", probes=16, seed=2)
    exact = fisherlib.fisher(net, None, [X] * 8, method="exact")
    assert est.fallback == ["inner.weight", "inner.bias"] and [b.name for b in est.blocks] == ["head"]
    for n in est.fallback:
        assert np.all(np.abs(_np(est.value[n]) - _np(exact.value[n])) <= 5 * _np(est.stderr[n]) + 1e-12), n


def test_a_huggingface_gpt2_runs_with_its_conv1d_layers_as_blocks():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(1, 50, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 6, dtype=torch.long), "labels": ids}
    with pytest.warns(KroneckerFallbackWarning, match="transformer.wte.weight"):  # tied with the head
        est = fisherlib.fisher(m, None, [batch], structure="kfac", probes=2)
    blocks = {b.name: b for b in est.blocks}
    assert blocks["transformer.h.0.attn.c_attn"].layout == "io" and blocks["transformer.wpe"].kind == "embedding"
    assert est.n_outputs == 12
    v = {n: torch.ones_like(p) for n, p in m.named_parameters()}
    out = est.solve(v, 1e-3)
    assert all(torch.isfinite(t).all() and t.shape == v[n].shape for n, t in out.items())


@pytest.mark.parametrize(("structure", "setting"), [("kfac", "expand"), ("kfac", "reduce"), ("ekfac", "expand")])
def test_a_flax_cnn_matches_its_torch_twin(structure, setting):
    """flax's (kh, kw, C_in, O) kernels and NHWC patches give the torch twin's blocks, leaf by leaf.
    (EK-FAC with reduce is left out: its A is singular here, and its diagonal then depends on the
    basis eigh picks for the null space.)"""
    jax = pytest.importorskip("jax")
    nn = pytest.importorskip("flax.linen")
    jnp = jax.numpy
    torch.manual_seed(0)
    tnet = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 5 * 5, 4)).double()

    class Flax(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(3, (3, 3), padding=1)(x))
            return nn.Dense(4)(jnp.transpose(h, (0, 3, 1, 2)).reshape(x.shape[0], -1))  # torch's flatten order

    x = np.random.default_rng(0).normal(size=(6, 2, 5, 5))
    W, b, W2, b2 = (p.detach().numpy() for p in tnet.parameters())
    fp = {"params": {"Conv_0": {"kernel": jnp.asarray(W.transpose(2, 3, 1, 0)), "bias": jnp.asarray(b)},
                     "Dense_0": {"kernel": jnp.asarray(W2.T), "bias": jnp.asarray(b2)}}}
    t = fisherlib.fisher(tnet, None, [torch.as_tensor(x)], structure=structure, method="exact", kfac_approx=setting)
    j = fisherlib.fisher(Flax().apply, fp, [jnp.asarray(x.transpose(0, 2, 3, 1))], structure=structure,
                         method="exact", kfac_approx=setting)
    conv = j.value["params"]["Conv_0"]
    np.testing.assert_allclose(np.asarray(conv["kernel"]).transpose(3, 2, 0, 1), _np(t.value["0.weight"]),
                               rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(np.asarray(conv["bias"]), _np(t.value["0.bias"]), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(np.asarray(j.value["params"]["Dense_0"]["kernel"]).T, _np(t.value["3.weight"]),
                               rtol=1e-9, atol=1e-14)
