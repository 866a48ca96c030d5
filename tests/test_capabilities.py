"""fisherlib/_capabilities.py, the one record of what runs where (style.md §2): the docs'
table is generated from it, the tests take their marks from it, and a few of its claims are
checked here directly (reduced precision, models owning their parameters)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fisherlib import _capabilities as caps
from fisherlib.models import MLP
from tests._backends import capability_marks

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "backends.md"


def _installed(mod: str) -> list:
    return [pytest.mark.skipif(importlib.util.find_spec(mod) is None, reason=f"{mod} is not installed")]


def test_docs_table_is_generated_from_the_record():
    got = caps.docs_table(PAGE.read_text(encoding="utf-8"))
    assert got == caps.render_markdown(), (
        f"docs/backends.md's capability table differs from fisherlib/_capabilities.py; "
        f"regenerate it with `{caps.REGENERATE}`"
    )


def test_every_backend_and_feature_has_an_entry_and_reasons():
    assert [b.name for b in caps.BACKENDS] == ["numpy", "torch", "jax", "cupy", "array_api_strict"]
    for b in caps.BACKENDS:
        for f in caps.FEATURES:
            entry = caps.support(b.name, f.key)
            assert isinstance(entry, caps.Support)
            if entry.status is not caps.Status.YES:
                assert entry.note, f"{b.name}/{f.key}: {entry.status.value} without a reason"
    with pytest.raises(ValueError, match="note: a 'no' entry must say why"):
        caps.Support(caps.Status.NO)
    with pytest.raises(ValueError, match="backend: unknown 'tensorflow'"):
        caps.support("tensorflow", "gpu")
    with pytest.raises(ValueError, match="feature: unknown 'autograd'"):
        caps.support("numpy", "autograd")


def test_the_built_in_adapters_are_all_in_the_record():
    from fisherlib.backends import _registry

    builtin = {name for name in ("numpy", "torch", "jax", "cupy") if name in _registry._ENTRIES}
    assert builtin <= {b.name for b in caps.BACKENDS}


def test_importing_the_record_loads_no_framework():
    code = ("import json, sys\nimport fisherlib._capabilities as c\nc.render_markdown()\n"
            "print(json.dumps(sorted(m for m in ('torch', 'jax', 'jaxlib', 'cupy') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_update_docs_rewrites_only_the_marked_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"before\n{caps.START}\nstale\n{caps.END}\nafter\n", encoding="utf-8")
    assert caps.update_docs(page) is True
    text = page.read_text(encoding="utf-8")
    assert text.startswith("before\n") and text.endswith(f"{caps.END}\nafter\n")
    assert caps.docs_table(text) == caps.render_markdown()
    assert caps.update_docs(page) is False
    (tmp_path / "bare.md").write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no <!-- capabilities:start -->"):
        caps.update_docs(tmp_path / "bare.md")


def test_capability_marks_follow_the_record():
    (skip,) = capability_marks("numpy", "gpu")
    assert skip.name == "skip" and caps.support("numpy", "gpu").note in skip.kwargs["reason"]
    assert capability_marks("numpy", "float64") == []
    assert capability_marks("numpy:readonly", "core") == []
    assert capability_marks("array_api_strict", "reduced_precision")[0].name == "skip"
    with pytest.raises(ValueError, match="backend: unknown"):
        capability_marks("tensorflow", "gpu")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_gpu_marks_carry_the_gpu_marker():
    names = [m.name for m in capability_marks("torch:cuda", "gpu")]
    assert names == ["gpu", "skipif"]


# -- claims checked on the backends -------------------------------------------------------------


def _run_fisher(backend: str, dtype: str):
    """fisherlib.fisher on a tiny MLP in ``dtype`` on ``backend``: (estimate values, core output)."""
    import fisherlib
    from fisherlib import simplex

    model = MLP([3, 4, 2])
    params = model.init(0)
    x = np.random.default_rng(0).standard_normal((5, 3))
    if backend in ("numpy", "cupy"):
        xp = np if backend == "numpy" else __import__("cupy")
        p = {k: xp.asarray(v).astype(dtype) for k, v in params.items()}
        z = xp.asarray(x).astype(dtype)
        est = fisherlib.fisher(model, p, z, probes=2, backend=backend)
    elif backend == "torch":
        import torch

        dt = getattr(torch, dtype)
        p = {k: torch.asarray(v).to(dt) for k, v in params.items()}
        z = torch.asarray(x).to(dt)
        est = fisherlib.fisher(model.forward, p, z, probes=2, backend="torch")
    else:
        import jax.numpy as jnp

        p = {k: jnp.asarray(v, dtype=dtype) for k, v in params.items()}
        z = jnp.asarray(x, dtype=dtype)
        est = fisherlib.fisher(model.forward, p, z, probes=2, backend="jax")
    return est, simplex.eigvalsh(z[:, :2]), z.dtype


REDUCED = [
    pytest.param(b, dt, id=f"{b}-{dt}", marks=_installed(b) + (
        capability_marks(b, "reduced_precision") if importlib.util.find_spec(b) is not None else []))
    for b, dt in [("numpy", "float16"), ("torch", "float16"), ("torch", "bfloat16"),
                  ("jax", "float16"), ("jax", "bfloat16"), ("cupy", "float16"), ("array_api_strict", "float16")]
]


@pytest.mark.parametrize(("backend", "dtype"), REDUCED)
def test_reduced_precision_accumulates_in_float32(backend, dtype):
    est, lam, in_dtype = _run_fisher(backend, dtype)
    assert lam.dtype == in_dtype  # the core keeps the input's dtype (computed in float32)
    for name in est.names:
        assert str(est.value[name].dtype).endswith("float32"), f"{backend} {dtype}: {name} is {est.value[name].dtype}"
        assert np.all(np.isfinite(np.asarray(est.to_numpy().value[name])))


def test_unsupported_claims_are_real():
    """Entries marked "no" are not just untested: they fail, or the framework lacks the feature."""
    from fisherlib import backends

    model = MLP([3, 4, 2])
    with pytest.raises(TypeError, match="params"):  # numpy, own parameters
        backends.get("numpy").linearize(model, None, np.ones((2, 3)))
    if importlib.util.find_spec("array_api_strict") is not None:
        import array_api_strict as xps

        assert not hasattr(xps, "float16") and not hasattr(xps, "bfloat16")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_float64_depends_on_x64():
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(False):
        assert jnp.asarray(np.zeros(1)).dtype == jnp.float32
    with jax.enable_x64(True):
        assert jnp.asarray(np.zeros(1)).dtype == jnp.float64


def test_supported_layers_table_is_generated_from_the_record():
    page = PAGE.parent / "per-example.md"
    assert caps.layers_table(page.read_text(encoding="utf-8")) == caps.render_layers(), (
        f"docs/per-example.md's supported-layers table differs from fisherlib/_capabilities.py; "
        f"run `{caps.REGENERATE}`")


def test_every_recognised_torch_module_is_documented():
    torch_layers = pytest.importorskip("fisherlib.backends.torch_layers")
    text = caps.render_layers()
    for cls in torch_layers.RECOGNISED:
        name = cls.__name__
        short = "BatchNorm1d/2d/3d" if "BatchNorm" in name else name  # one row for the three
        assert f"nn.{short}" in text or f"nn.{name}" in text, name
