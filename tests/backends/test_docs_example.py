"""The Python examples in docs/backends.md and docs/write-your-own-adapter.md run as written."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks(page: str) -> list[str]:
    return BLOCK.findall((DOCS / page).read_text())


def _requires(block: str) -> list[str]:
    """Modules a block needs: its ``# requires:`` line, else the top-level imports it names."""
    first = block.lstrip().splitlines()[0]
    if first.startswith("# requires:"):
        return first.split(":", 1)[1].split()
    return re.findall(r"^(?:import|from) (\w+)", block, re.M)


def _gpu_ready(mods: list[str]) -> bool:
    if "cupy" not in mods:
        return True
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def test_write_your_own_adapter_runs_in_order(clean_registry):
    blocks = _blocks("write-your-own-adapter.md")
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "docs_example"}
    for block in blocks:
        exec(compile(block, "write-your-own-adapter.md", "exec"), namespace)
    assert "tinylite" not in clean_registry._ENTRIES  # the page tidies up after itself


@pytest.mark.parametrize("index", range(len(_blocks("backends.md"))))
def test_backends_page_examples(index, clean_registry):
    block = _blocks("backends.md")[index]
    mods = _requires(block)
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    if not _gpu_ready(mods):
        from fisherlib._capabilities import support

        pytest.skip(f"needs a GPU (cupy: {support('cupy', 'gpu').note})")
    exec(compile(block, f"backends.md block {index}", "exec"), {"__name__": "docs_example"})
