"""Sequence outputs (N, T, C): token-level Fisher with attention masks and ignored labels.

Every method and structure against :mod:`token_reference`, which loops over inputs and
positions. The tagger mixes its tokens (a mean over the sequence feeds every position), so
per-example products that squared a sum over positions would be visibly wrong.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import fisherlib  # noqa: E402
from fisherlib import backends  # noqa: E402

from token_reference import as_numpy, diag_tree, leaf_blocks, token_fisher  # noqa: E402

N, T, V, D, C = 4, 5, 7, 3, 3


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.out = nn.Linear(D, C)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        return self.out(torch.tanh(h + self.mix(h.mean(1, keepdim=True))))


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = Tagger().double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (N, T), generator=g)
    am = torch.ones(N, T, dtype=torch.long)
    am[1, 3:] = 0
    am[3, 2:] = 0
    ids[am == 0] = 0
    y = torch.randint(0, C, (N, T), generator=g)
    y[am == 0] = -100
    y[0, 1] = -100  # a real token the loss ignores (a sub-word, say)
    w = (am != 0).numpy() & (y != -100).numpy()
    batch = {"input_ids": ids, "attention_mask": am, "labels": y}
    F, names, shapes = token_fisher(model, {"input_ids": ids}, w)
    E, _, _ = token_fisher(model, {"input_ids": ids}, w, labels=y.clamp(min=0))
    return model, batch, w, F, E, names, shapes


def _close(est, ref, tol=1e-9):
    got = as_numpy(est)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("layer_io", [True, False], ids=["layer_io", "generic"])
def test_exact_every_structure_matches_the_token_loop(case, layer_io):
    model, batch, w, F, _, names, shapes = case
    be = backends.get("torch", layer_io=layer_io)
    est = fisherlib.fisher(model, None, [batch], method="exact", backend=be)
    _close(est.value, diag_tree(F, names, shapes))
    assert est.n_inputs == N and est.n_outputs == int(w.sum())
    blocks = fisherlib.fisher(model, None, [batch], method="exact", structure="blocks", backend=be)
    _close(blocks.value, leaf_blocks(F, names, shapes))
    trace = fisherlib.fisher(model, None, [batch], method="exact", structure="trace", backend=be)
    np.testing.assert_allclose(float(trace.value), np.trace(F), rtol=1e-9)


@pytest.mark.parametrize("layer_io", [True, False], ids=["layer_io", "generic"])
def test_empirical_is_token_level(case, layer_io):
    model, batch, w, _, E, names, shapes = case
    be = backends.get("torch", layer_io=layer_io)
    est = fisherlib.fisher(model, None, [batch], method="empirical", backend=be)
    _close(est.value, diag_tree(E, names, shapes))
    blocks = fisherlib.fisher(model, None, [batch], method="empirical", structure="blocks", backend=be)
    _close(blocks.value, leaf_blocks(E, names, shapes))


@pytest.mark.parametrize("method,per_example", [("hutchinson", False), ("hutchinson", True), ("mc", False),
                                                ("mc", True)])
def test_random_methods_are_unbiased_for_the_token_fisher(case, method, per_example):
    model, batch, _, F, _, names, shapes = case
    est = fisherlib.fisher(model, None, [batch], method=method, probes=400, seed=3, per_example=per_example)
    ref, val, se = diag_tree(F, names, shapes), as_numpy(est.value), as_numpy(est.stderr)
    for k in ref:
        z = np.abs(val[k] - ref[k]) / (se[k] + 1e-12)
        assert np.all(z < 5.5), (k, z.max())
        # Not vacuous: the error bars are a fraction of the values, not larger than them.
        assert np.median(se[k]) < 0.5 * np.median(np.abs(ref[k]) + 1e-300), k
    trace = fisherlib.fisher(model, None, [batch], method=method, probes=400, seed=3, structure="trace",
                             per_example=per_example)
    assert abs(float(trace.value) - np.trace(F)) < 5.5 * float(trace.stderr)


def test_mask_argument_callable_name_and_none(case):
    model, batch, w, F, _, names, shapes = case
    am = batch["attention_mask"]
    plain = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    by_call = fisherlib.fisher(model, None, [plain], method="exact", mask=lambda x: am)
    _close(by_call.value, diag_tree(F, names, shapes))
    renamed = {"input_ids": batch["input_ids"], "keep": am, "labels": batch["labels"]}

    class Keep(Tagger):
        def forward(self, input_ids, keep=None):
            return super().forward(input_ids)

    other = Keep().double()
    other.load_state_dict(model.state_dict())
    by_name = fisherlib.fisher(other, None, [renamed], method="exact", mask="keep")
    _close(by_name.value, diag_tree(F, names, shapes))
    # mask=None and no labels: every position counts.
    everything = fisherlib.fisher(model, None, [{"input_ids": batch["input_ids"]}], method="exact", mask=None)
    full, _, _ = token_fisher(model, {"input_ids": batch["input_ids"]}, np.ones((N, T)))
    _close(everything.value, diag_tree(full, names, shapes))
    assert everything.n_outputs == N * T


def test_ignore_index_and_label_errors(case):
    model, batch, *_ = case
    with pytest.raises(ValueError, match="labels outside|labels"):
        fisherlib.fisher(model, None, [batch], method="empirical", ignore_index=None)
    bad = dict(batch, labels=batch["labels"][:, 0])
    with pytest.raises(ValueError, match=r"labels have shape \(4,\); expected \(4, 5\)"):
        fisherlib.fisher(model, None, [bad], method="empirical")
    wrong = dict(batch, attention_mask=batch["attention_mask"][:, :3])
    with pytest.raises(ValueError, match="mask: batch 0's 'attention_mask' has shape"):
        fisherlib.fisher(model, None, [wrong], method="exact")
    with pytest.raises(ValueError, match="mask: batch 0's mask has shape"):
        fisherlib.fisher(model, None, [batch], method="exact", mask=lambda x: torch.ones(N))
    with pytest.raises(TypeError, match="mask: expected"):
        fisherlib.fisher(model, None, [batch], method="exact", mask=3)


@pytest.mark.slow  # JAX compiles the per-example products: seconds on a loaded CPU
def test_jax_sequence_exact_and_hutchinson(case):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    model, batch, w, F, E, names, shapes = case
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in model.named_parameters()}

    def f(p, x):
        h = p["emb.weight"][x["input_ids"]]
        ctx = h.mean(1, keepdims=True) @ p["mix.weight"].T + p["mix.bias"]
        return {"logits": jnp.tanh(h + ctx) @ p["out.weight"].T + p["out.bias"], "hidden": h}

    jb = {k: jnp.asarray(v.numpy()) for k, v in batch.items()}
    if True:  # float64: tests/conftest.py enables jax_enable_x64
        exact = fisherlib.fisher(f, params, [jb], method="exact")
        _close(exact.value, diag_tree(F, names, shapes), tol=1e-7)
        emp = fisherlib.fisher(f, params, [jb], method="empirical")
        _close(emp.value, diag_tree(E, names, shapes), tol=1e-7)
        assert exact.n_outputs == int(w.sum()) and exact.n_inputs == N
        est = fisherlib.fisher(f, params, [jb], probes=400, seed=2)
        ref, val, se = diag_tree(F, names, shapes), as_numpy(est.value), as_numpy(est.stderr)
        for k in ref:
            assert np.all(np.abs(val[k] - ref[k]) < 5.5 * se[k] + 1e-9), k
