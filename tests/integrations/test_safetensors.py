"""The safetensors file format of a FisherEstimate: round trips, readability, model checks."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("safetensors")
torch = pytest.importorskip("torch")

import fisherlib  # noqa: E402
from fisherlib import FisherEstimate  # noqa: E402
from fisherlib.integrations import safetensors as fst  # noqa: E402


def _net(seed=0, hidden=5):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)).double()


def _x(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64)


def _np(t):
    return t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)


CASES = [dict(method="exact"), dict(probes=1), dict(probes=4), dict(probes=4, keep_probes=False),
         dict(method="mc", probes=1), dict(method="empirical"), dict(probes=3, reduction="mean"),
         dict(structure="blocks", method="exact"), dict(structure="trace", probes=3)]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_round_trip_keeps_value_stderr_and_provenance(tmp_path, kw):
    net, x = _net(), _x()
    y = torch.arange(12) % 3
    est = fisherlib.fisher(net, None, [(x, y)], seed=7, **kw)
    path = tmp_path / "f.safetensors"
    est.save(path)
    back = FisherEstimate.load(path)
    if est.structure == "trace":
        pairs = [(est.value, back.value), (est.stderr, back.stderr)]
    else:
        pairs = [(est.value[k], back.value[k]) for k in est.names] + [(est.stderr[k], back.stderr[k]) for k in est.names]
    for a, b in pairs:
        np.testing.assert_array_equal(_np(a), np.asarray(b))
    for attr in ("method", "structure", "reduction", "n_inputs", "n_outputs", "n_probes", "seed", "draws",
                 "stderr_kind", "names", "block_shapes", "dist"):
        assert getattr(back, attr) == getattr(est, attr), attr


def test_readable_with_safetensors_alone(tmp_path):
    from safetensors import safe_open

    net = _net()
    est = fisherlib.fisher(net, None, [_x()], probes=8, seed=3)
    path = str(tmp_path / "f.safetensors")
    est.save(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        values = {k: f.get_tensor(k) for k in keys if "/" not in k}
    names = [n for n, p in net.named_parameters()]
    assert keys == set(names) | {f"stderr/{n}" for n in names}
    for n, p in net.named_parameters():  # named and shaped as the state_dict, the value itself
        assert values[n].shape == p.shape
        torch.testing.assert_close(values[n], est.value[n], rtol=0, atol=0)
    assert meta["method"] == "hutchinson" and meta["probes"] == "8" and meta["inputs"] == "12"
    assert meta["outputs"] == "12" and meta["seed"] == "3" and meta["draws"] == "[[3, 0, 1]]"
    assert meta["fisherlib_version"] == fisherlib.__version__ and meta["format"] == fst.FORMAT


def test_loaded_estimates_merge_like_the_originals(tmp_path):
    net, x = _net(), _x(24)
    a = fisherlib.fisher(net, None, [x[:12]], probes=4, seed=5, first_batch=0)
    b = fisherlib.fisher(net, None, [x[12:]], probes=4, seed=5, first_batch=1)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    both = FisherEstimate.load(tmp_path / "a.safetensors").merge(FisherEstimate.load(tmp_path / "b.safetensors"))
    ref = a.merge(b)
    for k in ref.names:
        np.testing.assert_allclose(both.value[k], _np(ref.value[k]), rtol=1e-12)
        # The moments' variance of the sum equals the spread of the K summed probes only in
        # expectation, so compare with the independent-parts variance a.se² + b.se².
        np.testing.assert_allclose(both.stderr[k], np.hypot(_np(a.stderr[k]), _np(b.stderr[k])), rtol=1e-12)
    assert both.n_inputs == 24 and both.draws == ((5, 0, 2),)
    with pytest.raises(ValueError, match="twice"):  # a batch counted twice is still refused
        both.merge(FisherEstimate.load(tmp_path / "a.safetensors"))


def test_parts_keep_first_probes(tmp_path):
    est = fisherlib.fisher(_net(), None, [_x()], probes=6, seed=2)
    fst.save(est, tmp_path / "f.safetensors", parts=True)
    back = fst.load(tmp_path / "f.safetensors")
    for k in est.names:
        np.testing.assert_array_equal(back.first_probes(2).value[k], _np(est.first_probes(2).value[k]))
    with pytest.raises(ValueError, match="running moments"):  # without parts: moments only
        est.save(tmp_path / "g.safetensors")
        FisherEstimate.load(tmp_path / "g.safetensors").first_probes(2)


def test_loading_against_a_different_model_names_the_differences(tmp_path):
    est = fisherlib.fisher(_net(), None, [_x()], method="exact")
    path = tmp_path / "f.safetensors"
    est.save(path)
    FisherEstimate.load(path, model=_net(seed=4))  # other values, same names and shapes: fine
    with pytest.raises(ValueError, match=r"model: .*shapes differ: 0.weight: estimate \(5, 4\), model \(6, 4\)"):
        FisherEstimate.load(path, model=_net(hidden=6))
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"the model has parameters the estimate lacks: \['3.weight', '3.bias'\]"):
        fst.load(path, model=other)
    frozen = _net()
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"the estimate has leaves the model lacks: \['0.weight'\]"):
        fst.load(path, model=frozen)
    est.save(tmp_path / "f.npz")  # the .npz format is checked the same way
    with pytest.raises(ValueError, match="shapes differ"):
        FisherEstimate.load(tmp_path / "f.npz", model=_net(hidden=6))


def test_numpy_parameter_trees(tmp_path):
    from fisherlib.models import Linear

    model = Linear(4, 3)
    params = model.init(seed=0, like=np.zeros(1))
    x = np.random.default_rng(0).normal(size=(16, 4))
    est = fisherlib.fisher(model, params, x, probes=3, seed=1)
    est.save(tmp_path / "f.safetensors")
    back = FisherEstimate.load(tmp_path / "f.safetensors", model=params)
    np.testing.assert_array_equal(back.value["weight"], est.value["weight"])


def test_bad_input(tmp_path):
    est = fisherlib.fisher(_net(), None, [_x()], structure="sketch", probes=2)
    with pytest.raises(ValueError, match="est: a low-rank sketch"):
        est.save(tmp_path / "s.safetensors")
    with pytest.raises(TypeError, match="est: expected one of \\['FisherEstimate', 'KroneckerEstimate'\\]"):
        fst.save({"w": np.zeros(2)}, tmp_path / "x.safetensors")
    import safetensors.numpy

    safetensors.numpy.save_file({"w": np.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a fisherlib.fisher/1 file"):
        FisherEstimate.load(tmp_path / "plain.safetensors")
    exact = fisherlib.fisher(_net(), None, [_x()], structure="blocks", method="exact")
    with pytest.raises(ValueError, match="only a diagonal or Kronecker-factored estimate"):
        fst.check_against(exact, _net())


# --------------------------------------------------------------------------- Kronecker factors


def _kron_net():
    """A dense layer with bias, one without, and a LayerNorm that K-FAC leaves to its diagonal."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3, bias=False)).double()


def _kfac(x, **kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fisherlib.KroneckerFallbackWarning)
        return fisherlib.fisher(_kron_net(), None, [(x, torch.arange(x.shape[0]) % 3)], **kw)


KRON_CASES = [dict(method="exact"), dict(probes=1), dict(probes=4), dict(method="empirical"),
              dict(probes=3, reduction="mean"), dict(structure="ekfac", method="exact"),
              dict(structure="ekfac", probes=2), dict(kfac_approx="reduce", probes=2)]


@pytest.mark.parametrize("kw", KRON_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_kronecker_round_trip_keeps_factors_errors_and_products(tmp_path, kw):
    est = _kfac(_x(), seed=7, **{"structure": "kfac", **kw})
    path = tmp_path / "k.safetensors"
    est.save(path)
    back = fisherlib.KroneckerEstimate.load(path)
    assert isinstance(back, fisherlib.KroneckerEstimate)
    for b in est.blocks:
        for role, f in est.factors[b.name].items():
            np.testing.assert_allclose(back.factors[b.name][role], _np(f), rtol=1e-14, atol=1e-300)
            np.testing.assert_allclose(back.factor_stderr[b.name][role], _np(est.factor_stderr[b.name][role]),
                                       rtol=1e-14, atol=1e-300)
    for n in est.names:
        np.testing.assert_allclose(back.value[n], _np(est.value[n]), rtol=1e-14)
    for n in est.fallback:
        np.testing.assert_allclose(back.stderr[n], _np(est.stderr[n]), rtol=1e-14)
    v = np.random.default_rng(0).normal(size=est.n_params)
    np.testing.assert_allclose(back.solve(v, 0.1), _np(est.solve(torch.as_tensor(v), 0.1)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(back.logdet(0.1), float(est.logdet(0.1)), rtol=1e-12)
    for attr in ("method", "structure", "setting", "reduction", "n_inputs", "n_outputs", "n_probes", "seed",
                 "draws", "stderr_kind", "names", "shapes", "fallback", "blocks", "dist"):
        assert getattr(back, attr) == getattr(est, attr), attr


def test_kronecker_readable_with_safetensors_alone(tmp_path):
    from safetensors import safe_open

    est = _kfac(_x(), structure="kfac", probes=2, seed=3)
    path = str(tmp_path / "k.safetensors")
    est.save(path)
    with safe_open(path, framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        A, G = f.get_tensor("kron/0/A"), f.get_tensor("kron/0/G")
    assert keys == {"kron/0/A", "kron/0/G", "stderr/kron/0/G", "kron/3/A", "kron/3/G", "stderr/kron/3/G",
                    "1.weight", "1.bias", "stderr/1.weight", "stderr/1.bias"}
    assert A.shape == (1, 5, 5) and G.shape == (1, 5, 5)  # 4 inputs + the bias; 5 outputs
    assert meta["type"] == "KroneckerEstimate" and meta["structure"] == "kfac" and meta["probes"] == "2"
    # The layer's Fisher block, F ≈ A ⊗ G in the core layout (bias last), from the file alone.
    torch.testing.assert_close(A[0, :4, :4], est.factors["0"]["A"][0, :4, :4], rtol=0, atol=0)
    torch.testing.assert_close(G, est.factors["0"]["G"], rtol=0, atol=0)


def test_kronecker_loaded_estimates_merge_like_the_originals(tmp_path):
    """Uneven batches: A's merge weighs each file's mean by its count, which the header keeps."""
    x = _x(19)
    a = _kfac(x[:12], structure="kfac", probes=3, seed=5, first_batch=0)
    b = _kfac(x[12:], structure="kfac", probes=3, seed=5, first_batch=1)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    both = fst.load(tmp_path / "a.safetensors").merge(fst.load(tmp_path / "b.safetensors"))
    ref = a.merge(b)
    for blk in ref.blocks:
        for role in ("A", "G"):
            np.testing.assert_allclose(both.factors[blk.name][role], _np(ref.factors[blk.name][role]), rtol=1e-12)
    assert both.n_inputs == 19 and both.draws == ((5, 0, 2),)
    fst.save(b, tmp_path / "b.safetensors", parts=True)
    back = fst.load(tmp_path / "b.safetensors")  # with parts: the per-probe sums themselves
    for x0, x1 in zip(back.parts, b.parts):
        np.testing.assert_array_equal(np.asarray(x0), _np(x1))


def test_kronecker_loading_against_a_different_model(tmp_path):
    est = _kfac(_x(), structure="kfac", method="exact")
    est.save(tmp_path / "k.safetensors")
    fisherlib.KroneckerEstimate.load(tmp_path / "k.safetensors", model=_kron_net())
    with pytest.raises(ValueError, match=r"the model has parameters the estimate lacks: \['2.weight', '2.bias'\]"):
        fisherlib.KroneckerEstimate.load(tmp_path / "k.safetensors", model=_net())
    plain = fisherlib.fisher(_net(), None, [_x()], method="exact")
    plain.save(tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="holds a FisherEstimate, not a KroneckerEstimate"):
        fisherlib.KroneckerEstimate.load(tmp_path / "d.safetensors")


def test_integrations_import_their_libraries_lazily():
    import subprocess
    import sys

    code = ("import sys, fisherlib, fisherlib.integrations, fisherlib.integrations.safetensors, fisherlib.uses; "
            "print(sorted(m for m in ('torch', 'jax', 'safetensors', 'laplace', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
