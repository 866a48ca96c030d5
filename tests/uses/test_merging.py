"""Fisher merging and its baselines against dense float64 formulas, on every backend of ``xp``."""

from __future__ import annotations

import numpy as np
import pytest

from fisherlib.estimators import FisherEstimate
from fisherlib.uses import average_merge, fisher_merge, task_arithmetic_merge
from tests._backends import to_numpy, to_xp

SHAPES = {"w": (4, 3), "b": (3,)}


def _tree(rng, xp, positive=False):
    return {k: to_xp(rng.gamma(1.0, size=s) if positive else rng.normal(size=s), xp) for k, s in SHAPES.items()}


def _np(tree):
    return {k: to_numpy(v) for k, v in tree.items()}


def test_fisher_merge_is_the_precision_weighted_mean(xp):
    rng = np.random.default_rng(0)
    thetas = [_tree(rng, xp) for _ in range(3)]
    fishers = [_tree(rng, xp, positive=True) for _ in range(3)]
    fishers[1]["w"] = fishers[1]["w"] * 0.0  # below the floor everywhere in one leaf
    w = [1.0, 2.0, 0.5]
    floor = 1e-3
    merged = fisher_merge(thetas, fishers, weights=w, floor=floor)
    for k in SHAPES:
        F = [np.maximum(_np(f)[k], floor) for f in fishers]
        ref = sum(wj * f * _np(t)[k] for wj, f, t in zip(w, F, thetas)) / sum(wj * f for wj, f in zip(w, F))
        np.testing.assert_allclose(to_numpy(merged[k]), ref, rtol=1e-12)
        assert type(merged[k]) is type(thetas[0][k])


def test_fisher_merge_maximises_the_summed_laplace_log_posteriors(xp):
    """θ* minimises Σ_j w_j Σ_i F̃_ji (θ_i − θ_ji)²: every perturbation raises it (not vacuous:
    the plain average does not)."""
    rng = np.random.default_rng(1)
    thetas = [_np(_tree(rng, xp)) for _ in range(2)]
    fishers = [_np(_tree(rng, xp, positive=True)) for _ in range(2)]
    merged = _np(fisher_merge([{k: to_xp(v, xp) for k, v in t.items()} for t in thetas], fishers))

    def objective(theta):
        return sum(np.sum(f[k] * (theta[k] - t[k]) ** 2) for f, t in zip(fishers, thetas) for k in SHAPES)

    best = objective(merged)
    for _ in range(20):
        bumped = {k: v + 1e-3 * rng.normal(size=v.shape) for k, v in merged.items()}
        assert objective(bumped) > best
    assert objective(_np(average_merge(thetas))) > best + 1e-3


def test_equal_or_vanishing_fishers_give_the_average(xp):
    rng = np.random.default_rng(2)
    thetas = [_tree(rng, xp) for _ in range(3)]
    F = _tree(rng, xp, positive=True)
    avg = _np(average_merge(thetas, weights=[1, 1, 2]))
    for fishers in ([F, F, F], [{k: v * 0 for k, v in F.items()}] * 3):
        got = _np(fisher_merge(thetas, fishers, weights=[1, 1, 2]))
        for k in SHAPES:
            np.testing.assert_allclose(got[k], avg[k], rtol=1e-12)
    ref = sum(_np(t)["w"] * c for t, c in zip(thetas, [0.25, 0.25, 0.5]))
    np.testing.assert_allclose(avg["w"], ref, rtol=1e-12)


def test_normalize_makes_the_merge_scale_free(xp):
    rng = np.random.default_rng(3)
    thetas = [_tree(rng, xp) for _ in range(2)]
    fishers = [_tree(rng, xp, positive=True) for _ in range(2)]
    scaled = [fishers[0], {k: 100.0 * v for k, v in fishers[1].items()}]  # 100 times the inputs
    a = _np(fisher_merge(thetas, fishers, normalize=True, floor=1e-12))
    b = _np(fisher_merge(thetas, scaled, normalize=True, floor=1e-12))
    c = _np(fisher_merge(thetas, scaled, floor=1e-12))
    for k in SHAPES:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-10)
    assert not np.allclose(a["w"], c["w"])


def test_task_arithmetic(xp):
    rng = np.random.default_rng(4)
    base = _tree(rng, xp)
    thetas = [_tree(rng, xp) for _ in range(3)]
    got = _np(task_arithmetic_merge(base, thetas, scale=0.7))
    for k in SHAPES:
        ref = _np(base)[k] + 0.7 * sum(_np(t)[k] - _np(base)[k] for t in thetas)
        np.testing.assert_allclose(got[k], ref, rtol=1e-12)
    third = _np(task_arithmetic_merge(base, thetas, scale=1 / 3))
    avg = _np(average_merge(thetas))
    for k in SHAPES:
        np.testing.assert_allclose(third[k], avg[k], rtol=1e-12, atol=1e-14)


def test_torch_models_with_estimates_and_files(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import fisherlib

    nets = []
    for s in range(2):
        torch.manual_seed(s)
        nets.append(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double())
    x = torch.randn(16, 4, dtype=torch.float64)
    ests = [fisherlib.fisher(n, None, [x], method="exact") for n in nets]
    ests[1].save(tmp_path / "f1.safetensors")
    merged = fisher_merge(nets, [ests[0], str(tmp_path / "f1.safetensors")])
    F = [{k: v.numpy() for k, v in e.value.items()} for e in ests]
    for name, _ in nets[0].named_parameters():
        p = [dict(n.named_parameters())[name].detach().numpy() for n in nets]
        f = [np.maximum(Fj[name], 1e-6) for Fj in F]
        ref = (f[0] * p[0] + f[1] * p[1]) / (f[0] + f[1])
        np.testing.assert_allclose(merged[name].numpy(), ref, rtol=1e-12)
        assert not merged[name].requires_grad
    out = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    out.load_state_dict(merged)  # a {name: tensor} dict the module takes back
    torch.testing.assert_close(out[2].bias.detach(), merged["2.bias"])


def test_bad_input():
    a, b = {"w": np.zeros(3)}, {"w": np.ones(3)}
    F = {"w": np.ones(3)}
    with pytest.raises(ValueError, match=r"fishers: expected one per model \(2\), got 1"):
        fisher_merge([a, b], [F])
    with pytest.raises(TypeError, match="fishers: expected a sequence"):
        fisher_merge([a, b], F)
    with pytest.raises(ValueError, match="params\\[1\\]: leaf 'w' has shape \\(4,\\)"):
        fisher_merge([a, {"w": np.ones(4)}], [F, F])
    with pytest.raises(ValueError, match="params\\[1\\]: expected the leaves \\['w'\\]"):
        average_merge([a, {"v": np.ones(3)}])
    with pytest.raises(ValueError, match="fishers\\[1\\]: leaf 'w' has negative entries"):
        fisher_merge([a, b], [F, {"w": -np.ones(3)}])
    with pytest.raises(ValueError, match="floor: expected a positive finite number"):
        fisher_merge([a, b], [F, F], floor=0.0)
    with pytest.raises(ValueError, match="weights: expected non-negative finite numbers"):
        fisher_merge([a, b], [F, F], weights=[0, 0])
    with pytest.raises(TypeError, match="params: expected a sequence of parameter trees"):
        average_merge(a)
    with pytest.raises(ValueError, match="normalize=True needs a Fisher that is not all zero"):
        fisher_merge([a, b], [F, {"w": np.zeros(3)}], normalize=True)
    blocks = FisherEstimate(names=["w"], parts=[np.ones((1, 3, 3))], method="exact", structure="blocks",
                            likelihood="softmax", bound=None, rank=1, reduction="sum", n_inputs=1, n_probes=0,
                            per_example=True, dist="none", stderr_kind="exact")
    with pytest.raises(ValueError, match="fishers\\[0\\]: expected a FisherEstimate of structure 'diag'"):
        fisher_merge([a, b], [blocks, F])
