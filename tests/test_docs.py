"""The documentation site: its examples run as written, and it builds with warnings as errors.

Every ```python block of the quickstart, estimator, theory and home pages runs, page by page, in
order, in one namespace per page (a later block may use what an earlier one defined). Its needs
are its first line ``# requires: mod1 mod2 ...`` (module names, plus ``gpu`` for a CUDA
device), else the top-level modules it imports. When a block's needs are missing, the page
stops there and the test is skipped with the reason (docs/testing.md describes the
convention). ``mkdocs build --strict`` runs when mkdocs is installed (the ``docs`` extra).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = sorted(
    str(p.relative_to(DOCS))
    for pattern in ("quickstart/*.md", "estimators/*.md", "theory.md", "index.md", "per-example.md",
                    "huggingface-and-sequences.md", "language-models.md", "parameter-spectrum.md",
                    "natural-gradient.md", "using-the-fisher.md", "kfac.md",
                    "integrations/*.md")
    for p in DOCS.glob(pattern)
)


def blocks(page: str) -> list[str]:
    """The ```python blocks of a page, in order."""
    return BLOCK.findall((DOCS / page).read_text(encoding="utf-8"))


def requires(block: str) -> list[str]:
    """What a block needs: its ``# requires:`` line, else the top-level modules it imports."""
    lines = block.lstrip().splitlines()
    if lines and lines[0].startswith("# requires:"):
        return lines[0].split(":", 1)[1].split()
    return sorted(set(re.findall(r"^(?:import|from) (\w+)", block, re.M)))


def _has_gpu() -> bool:
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                return True
        except Exception:
            pass
    if "torch" in sys.modules or importlib.util.find_spec("torch") is not None:
        try:
            import torch

            return bool(torch.cuda.is_available())
        except Exception:
            return False
    return False


def missing(block: str) -> list[str]:
    """The needs of a block that this machine lacks (modules first: a GPU check imports them)."""
    needs = requires(block)
    out = [name for name in needs if name != "gpu" and importlib.util.find_spec(name) is None]
    # CuPy imports without a GPU but cannot run without one.
    if not out and ("gpu" in needs or "cupy" in needs) and not _has_gpu():
        out.append("a GPU")
    return out


def test_pages_found():
    assert {"quickstart/numpy.md", "quickstart/torch.md", "quickstart/jax.md", "quickstart/cupy.md",
            "estimators/hutchinson.md", "estimators/exact.md", "estimators/monte-carlo.md",
            "estimators/empirical.md"} <= set(PAGES)
    for page in PAGES:
        if page.startswith(("quickstart/", "estimators/")):
            assert blocks(page), f"{page} has no python example"


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {"__name__": "docs_example"}
    for i, block in enumerate(blocks(page)):
        lack = missing(block)
        if lack:
            pytest.skip(f"{page}: block {i + 1} needs {', '.join(lack)} (blocks before it ran)")
        exec(compile(block, f"docs/{page} block {i + 1}", "exec"), namespace)


def test_requires_convention():
    assert requires("# requires: cupy gpu\nimport cupy\n") == ["cupy", "gpu"]
    assert requires("import numpy as np\nfrom fisherlib import simplex\n") == ["fisherlib", "numpy"]
    assert "no_such_module_xyz" in missing("import no_such_module_xyz\n")


def _site_tools() -> bool:
    """mkdocs, the material theme and mkdocstrings' python handler (the ``docs`` extra)."""
    try:
        return all(importlib.util.find_spec(m) is not None
                   for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"))
    except ModuleNotFoundError:  # a parent package is missing
        return False


@pytest.mark.skipif(not _site_tools(), reason="mkdocs is not installed (pip install 'fisherlib[docs]')")
def test_site_builds_strict(tmp_path):
    """What CI runs: ``mkdocs build --strict`` (warnings are errors), offline."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("index.html", "api/fisher/index.html", "quickstart/torch/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    html = (tmp_path / "site" / "api" / "fisher" / "index.html").read_text(encoding="utf-8")
    assert "fisherlib.fisher" in html and ":class:" not in html
