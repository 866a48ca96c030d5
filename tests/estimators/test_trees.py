"""Batches as trees, parameter subsets, and estimates people can keep (pickle, save, blocks)."""

from __future__ import annotations

import gc
import io
import pickle

import numpy as np
import pytest

import fisherlib
from fisherlib.estimators import _batches
from fisherlib.models import Linear

from tests._backends import to_numpy, to_xp


# ----------------------------------------------------------------- the tree helpers, every backend


def test_n_of_and_slice_tree_on_every_backend(xp):
    x = to_xp(np.arange(24.0).reshape(6, 4), xp)
    m = to_xp(np.ones((6, 3)), xp)
    tree = {"x": x, "pair": (m, [x]), "note": "kept", "none": None}
    assert _batches.n_of(tree) == 6
    part = _batches.slice_tree(tree, 2, 5)
    assert part["note"] == "kept" and part["none"] is None
    np.testing.assert_array_equal(to_numpy(part["x"]), np.arange(24.0).reshape(6, 4)[2:5])
    assert isinstance(part["pair"], tuple) and isinstance(part["pair"][1], list)
    assert tuple(part["pair"][0].shape) == (3, 3)


def test_n_of_refuses_disagreeing_or_missing_arrays():
    with pytest.raises(ValueError, match="first axis"):
        _batches.n_of({"a": np.zeros((3, 2)), "b": np.zeros((4,))})
    with pytest.raises(ValueError, match="no arrays"):
        _batches.n_of({"a": "text"})


def test_batches_reads_dicts_pairs_and_refuses_one_pair():
    x, y = np.zeros((5, 2)), np.arange(5)
    [(inp, lab)] = list(_batches.batches({"x": x, "labels": y}))
    assert list(inp) == ["x"] and lab is y
    [(inp, lab)] = list(_batches.batches([({"x": x}, y)]))
    assert lab is y
    [(inp, lab)] = list(_batches.batches([{"x": x, "y": y}], labels="y"))
    assert lab is y and "y" not in inp
    [(inp, lab)] = list(_batches.batches([{"x": x, "labels": y}], labels=None))
    assert lab is None and "labels" in inp
    [(inp, lab)] = list(_batches.batches([((x, x), y)]))
    assert isinstance(inp, tuple) and lab is y
    with pytest.raises(TypeError, match=r"pass a list of pairs, \[\(inputs, labels\)\]"):
        list(_batches.batches((x, y)))
    with pytest.raises(ValueError, match="3-tuple"):
        list(_batches.batches([(x, y, y)]))


def test_explicit_backend_chunks_on_array_api_strict():
    """Per-example products slice inputs with x[i:j, ...], which array_api_strict accepts."""
    strict = pytest.importorskip("array_api_strict")
    model = Linear(4, 3)
    params = model.init(seed=0, like=strict.zeros(1, dtype=strict.float64))
    x = strict.asarray(np.random.default_rng(0).normal(size=(7, 4)))
    whole = fisherlib.fisher(model, params, x, method="exact")
    chunked = fisherlib.fisher(model, params, x, method="exact", chunk_size=2)
    for k in ("weight", "bias"):
        np.testing.assert_allclose(to_numpy(chunked.value[k]), to_numpy(whole.value[k]), rtol=1e-12)


# ----------------------------------------------------------------- dict and tuple inputs, torch and JAX

torch = pytest.importorskip("torch")
nn = torch.nn


class Two(nn.Module):
    """Two inputs, by keyword or position, and an output object with .logits."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)

    def forward(self, left, right):
        class Out(dict):
            pass

        out = Out(logits=self.a(left) + self.b(right), hidden=left)
        return out


class One(nn.Module):
    """The same network on one concatenated input: the reference."""

    def __init__(self, two):
        super().__init__()
        self.two = two

    def forward(self, x):
        return self.two.a(x[:, :3]) + self.two.b(x[:, 3:])


@pytest.fixture(scope="module")
def two():
    torch.manual_seed(0)
    model = Two().double()
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g,
                                                                                   dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g)
    return model, left, right, y


@pytest.mark.parametrize("method", ["exact", "empirical", "hutchinson"])
@pytest.mark.parametrize("layer_io", [True, False], ids=["layer_io", "generic"])
def test_dict_and_tuple_inputs_match_one_array(two, method, layer_io):
    model, left, right, y = two
    be = fisherlib.backends.get("torch", layer_io=layer_io)
    kw = dict(method=method, backend=be, chunk_size=2, per_example=True if method == "hutchinson" else None,
              probes=3 if method == "hutchinson" else 1)
    ref = fisherlib.fisher(One(model), None, [(torch.cat([left, right], 1), y)], **kw)
    by_dict = fisherlib.fisher(model, None, [{"left": left, "right": right, "labels": y}], **kw)
    by_tuple = fisherlib.fisher(model, None, [((left, right), y)], **kw)
    for k, v in ref.value.items():
        name = k.removeprefix("two.")
        torch.testing.assert_close(by_dict.value[name], v, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(by_tuple.value[name], v, rtol=1e-10, atol=1e-14)


@pytest.mark.slow  # JAX traces the per-example products: seconds on a loaded CPU
def test_jax_function_takes_the_dict_batch():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    p = {"a": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=(2, 4)))}
    left, right = jnp.asarray(rng.normal(size=(6, 3))), jnp.asarray(rng.normal(size=(6, 2)))

    def f(p, x):
        return {"logits": x["left"] @ p["a"] + x["right"] @ p["b"], "extra": x["left"]}

    def g(p, x):
        return x[:, :3] @ p["a"] + x[:, 3:] @ p["b"]

    be = fisherlib.backends.get("jax", jit=False)
    a = fisherlib.fisher(f, p, {"left": left, "right": right}, method="exact", chunk_size=4, backend=be)
    b = fisherlib.fisher(g, p, jnp.concatenate([left, right], 1), method="exact", backend=be)
    for k in p:
        np.testing.assert_allclose(np.asarray(a.value[k]), np.asarray(b.value[k]), rtol=1e-6)
    picked = fisherlib.fisher(lambda p, x: (g(p, x), 0), p, jnp.concatenate([left, right], 1), method="exact",
                              backend=be, logits=lambda out: out[0])
    for k in p:
        np.testing.assert_allclose(np.asarray(picked.value[k]), np.asarray(b.value[k]), rtol=1e-6)


# ----------------------------------------------------------------- parameter subsets


def test_subset_is_exactly_those_parameters_and_names_are_checked(two):
    model, left, right, y = two
    batch = [({"left": left, "right": right}, y)]
    full = fisherlib.fisher(model, None, batch, method="exact")
    sub = fisherlib.fisher(model, {"a.weight": model.a.weight}, batch, method="exact")
    assert list(sub.value) == ["a.weight"]
    torch.testing.assert_close(sub.value["a.weight"], full.value["a.weight"], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"no parameter 'a.weigth'; did you mean 'a.weight'"):
        fisherlib.fisher(model, {"a.weigth": model.a.weight}, batch, method="exact")
    with pytest.raises(TypeError, match="the module Two itself; pass params=None"):
        fisherlib.fisher(model, model, batch, method="exact")


def test_state_dict_with_buffers_is_refused_with_advice():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'1.running_mean' is a buffer .* dict\(model.named_parameters\(\)\)"):
        fisherlib.fisher(net, net.state_dict(), x)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="reads /proc/self/statm")
def test_subset_memory_stays_flat_over_200_batches():
    """A dict of some parameters: the results carry no autograd graph (it grew ~7 MB a batch)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    sub = {"2.weight": net[2].weight}
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 64, generator=g) for _ in range(200)]
    for layer_io in (True, False):
        be = fisherlib.backends.get("torch", layer_io=layer_io)
        est = fisherlib.fisher(net, sub, data[:20], per_example=True, probes=2, backend=be)
        assert not est.parts[0].requires_grad
        gc.collect()
        before = _rss_mb()
        est = fisherlib.fisher(net, sub, data, per_example=True, probes=2, backend=be)
        assert not est.parts[0].requires_grad and est.parts[0].grad_fn is None
        del est
        gc.collect()
        grown = _rss_mb() - before
        # A leak keeps each batch's per-example products (8 x 65,536 floats x 2 probes = 4 MB).
        assert grown < 100, (layer_io, grown)


# ----------------------------------------------------------------- estimates people can keep


def test_pickle_and_torch_save_keep_the_numbers(two, tmp_path):
    model, left, right, y = two
    est = fisherlib.fisher(model, None, [({"left": left, "right": right}, y)], probes=3)
    back = pickle.loads(pickle.dumps(est))
    buf = io.BytesIO()
    torch.save(est, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (back, loaded):
        assert other.n_inputs == est.n_inputs and other.n_outputs == est.n_outputs
        for k, v in est.value.items():
            torch.testing.assert_close(other.value[k], v)
            torch.testing.assert_close(other.stderr[k], est.stderr[k])


def test_save_and_load_agree_on_the_file_name(tmp_path):
    model = Linear(4, 3)
    params = model.init(seed=0, like=np.zeros(1))
    est = fisherlib.fisher(model, params, np.random.default_rng(0).normal(size=(8, 4)), probes=2)
    est.save(tmp_path / "fim")
    assert (tmp_path / "fim.npz").exists()
    for path in (tmp_path / "fim", str(tmp_path / "fim"), tmp_path / "fim.npz"):
        back = fisherlib.FisherEstimate.load(path)
        np.testing.assert_array_equal(back.value["weight"], est.value["weight"])
        assert back.n_outputs == 8


def test_blocks_default_works_on_a_resnet_like_model():
    class Basic(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), Basic(64),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    est = fisherlib.fisher(net, None, x, structure="blocks")
    shapes = {k: tuple(v.shape) for k, v in est.value.items()}
    assert shapes["3.conv1.weight"] == (64, 576, 576)  # 36,864 entries: one block per output channel
    assert shapes["0.weight"] == (27 * 64, 27 * 64) and shapes["1.weight"] == (64, 64)
    wide = nn.Sequential(nn.Linear(5000, 2))
    with pytest.raises(ValueError, match=r"block '0.weight' has 2 blocks of size 5000"):
        fisherlib.fisher(wide, None, torch.randn(2, 5000), structure="blocks")
