"""Import hygiene of the framework-free core (design.md, "The one idea"; style.md, house rules).

* ``import fisherlib`` loads no array framework: torch, jax and cupy stay out of sys.modules,
  also after computing with NumPy arrays.
* The modules of fisherlib/core import only the standard library and array-api-compat, and
  only ``_compat.py`` imports array-api-compat (checked on the source, with ``ast``).
* Every public function of the core runs on ``array_api_strict``, the reference implementation of
  the Array API, and returns arrays of that namespace.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fisherlib.core
from fisherlib.core import envelopes, hypercube, simplex, spectrum

CORE = Path(fisherlib.core.__file__).parent
FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy")


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "statement",
    [
        "import fisherlib",
        "import fisherlib.simplex, fisherlib.hypercube",
        "import fisherlib.core",
        "from fisherlib import simplex; import numpy as np; simplex.eigh(np.zeros((2, 3)))",
    ],
)
def test_import_loads_no_framework(statement):
    report = f"print(json.dumps(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))"
    loaded = _run(f"import json, sys\n{statement}\n{report}")
    assert loaded == [], f"`{statement}` imported {loaded}"


def _imports(path: Path) -> list[tuple[str, int]]:
    """(top-level module, line) for every absolute import in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
    return found


CORE_MODULES = sorted(CORE.glob("*.py"))


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: p.name)
def test_core_imports_only_stdlib_and_compat(path):
    allowed = set(sys.stdlib_module_names) | {"array_api_compat", "__future__"}
    bad = [(mod, line) for mod, line in _imports(path) if mod not in allowed]
    assert not bad, f"{path.name} imports {bad}: the core may import only the standard library and array-api-compat"
    if path.name != "_compat.py":
        compat = [line for mod, line in _imports(path) if mod == "array_api_compat"]
        assert not compat, f"{path.name}:{compat} imports array_api_compat directly; go through core/_compat.py"


def test_the_ast_check_sees_core_modules():
    """Guard against a vacuous pass: the core modules are found and they do import things."""
    names = {p.name for p in CORE_MODULES}
    assert {"_compat.py", "_lib.py", "simplex.py", "spectrum.py", "envelopes.py", "hypercube.py"} <= names
    assert any(m == "array_api_compat" for m, _ in _imports(CORE / "_compat.py"))


# ----------------------------------------------------------------------------- array_api_strict

PUBLIC = [
    (mod, name)
    for mod in (simplex, hypercube, spectrum, envelopes)
    for name in mod.__all__
    if inspect.isfunction(getattr(mod, name))
]


def _id(x):
    return x if isinstance(x, str) else x.__name__.rsplit(".", 1)[-1]


@pytest.mark.parametrize(("mod", "name"), PUBLIC, ids=_id)
def test_public_function_runs_on_array_api_strict(mod, name):
    xs = pytest.importorskip("array_api_strict")
    f = getattr(mod, name)
    z = xs.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)))
    params = [p for p in inspect.signature(f).parameters.values() if p.default is inspect.Parameter.empty]
    args = [z] + [xs.asarray(np.ones((2, 3, 5)))] * (len(params) - 1)
    out = f(*args)
    arrays = _arrays(out)
    assert arrays, f"{name} returned no arrays"
    for a in arrays:
        assert type(a).__module__.startswith("array_api_strict"), f"{name} returned {type(a)}"
        assert a.dtype == xs.float64


def _arrays(out):
    """The arrays in a result: an array, a tuple of arrays, or an envelope (through its methods)."""
    if isinstance(out, tuple):
        return [a for o in out for a in _arrays(o)]
    if hasattr(out, "to_dense"):
        import array_api_strict as xs

        v = xs.asarray(np.ones((2, 3, 5)))
        return [out.to_dense(), out.matvec(v), out.trace()]
    return [out]


def test_the_ast_check_catches_framework_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\ndef f():\n    import numpy as np\n    from torch import nn\n    from . import sibling\n")
    assert _imports(bad) == [("os", 1), ("numpy", 3), ("torch", 4)]
