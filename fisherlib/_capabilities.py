"""What runs where: the one record of which backend supports which feature.

style.md §2 (after scipy's ``xp_capabilities``): this table says, for each backend and each
feature, whether it is supported, and why not (or on what it depends) where it is not plainly
so. Everything else takes it from here:

- ``docs/backends.md`` holds :func:`render_markdown`'s table between the markers
  ``<!-- capabilities:start -->`` and ``<!-- capabilities:end -->``;
  ``python -m fisherlib._capabilities --write`` rewrites it, and ``tests/test_capabilities.py``
  fails when the page and the table differ;
- the tests take their skip marks from it (``tests/_backends.capability_marks``).

Each entry was checked against the adapters and the tests (tests/backends, tests/core,
tests/estimators). This module imports no array framework.
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "BACKENDS",
    "CAPABILITIES",
    "FEATURES",
    "LAYERS",
    "BackendInfo",
    "Feature",
    "LayerRule",
    "Requirement",
    "Status",
    "Support",
    "render_layers",
    "render_markdown",
    "support",
    "update_docs",
]

Requirement = Literal["gpu", "x64"]
"""A condition the test suite can check: ``"gpu"`` (a GPU for that backend), ``"x64"``
(``jax_enable_x64`` on)."""


class Status(enum.Enum):
    YES = "yes"
    DEPENDS = "depends"  # supported when a condition holds; the note says which
    NO = "no"


@dataclass(frozen=True)
class Support:
    """One cell: the status, a note (required unless YES), and a condition tests can check."""

    status: Status
    note: str = ""
    requires: Requirement | None = None

    def __post_init__(self):
        if self.status is not Status.YES and not self.note:
            raise ValueError(f"note: a {self.status.value!r} entry must say why")
        if self.requires is not None and self.status is not Status.DEPENDS:
            raise ValueError("requires: only a 'depends' entry has a condition")


@dataclass(frozen=True)
class Feature:
    key: str
    title: str  # the row's label in the docs (Markdown)
    short: str  # the label in the notes under the table


@dataclass(frozen=True)
class BackendInfo:
    """A column: the name (as ``fisherlib.backends.get`` takes it) and what all its entries assume."""

    name: str
    requires: Requirement | None = None
    note: str = ""


YES = Support(Status.YES)


def _no(note: str) -> Support:
    return Support(Status.NO, note)


def _yes(note: str) -> Support:
    return Support(Status.YES, note)


def _depends(note: str, requires: Requirement | None = None) -> Support:
    return Support(Status.DEPENDS, note, requires)


BACKENDS: tuple[BackendInfo, ...] = (
    BackendInfo("numpy"),
    BackendInfo("torch"),
    BackendInfo("jax"),
    BackendInfo("cupy", "gpu", "CuPy runs only on a CUDA GPU: every `cupy` entry assumes one."),
    BackendInfo(
        "array_api_strict",
        note="`array_api_strict` (the Array API's reference implementation) has no adapter of its "
        "own: the `numpy` adapter runs explicit-VJP models on its arrays.",
    ),
)

FEATURES: tuple[Feature, ...] = (
    Feature("core", "core functions (`simplex`, `hypercube`)", "core"),
    Feature("batched_vjp", "`linearize` + K cotangents pulled back in one call", "batched VJP"),
    Feature("per_example", "per-example VJPs (`per_example_vjp`)", "per-example"),
    Feature("layer_io", "layer I/O: per-example products from layer inputs and output cotangents "
            "(`layer_io`)", "layer I/O"),
    Feature("jvp", "Jacobian-vector products (`jvp`: F·v in `fisherlib.spectral`)", "JVP"),
    Feature("training_loop", "training-loop reuse (`loss_linearize`: a framework loss, its gradient "
            "and K probes pulled back through one forward; `RunningFisher`)", "training loop"),
    Feature("own_params", "models that own their parameters (`params=None`)", "own parameters"),
    Feature("jit", "jit / tracing", "jit"),
    Feature("float64", "float64", "float64"),
    Feature("reduced_precision", "float16 / bfloat16 (computed and accumulated in float32)", "float16 / bfloat16"),
    Feature("gpu", "GPU", "GPU"),
)

_EXPLICIT = (
    "explicit-VJP models only (`forward(params, x)` and `vjp(params, x, ct)`, e.g. "
    "`fisherlib.models`): {} has no automatic differentiation"
)
_CUPY_MODELS = "explicit-VJP models, or torch / JAX models fed CuPy data through DLPack"

CAPABILITIES: dict[str, dict[str, Support]] = {
    "numpy": {
        "core": YES,
        "batched_vjp": _depends(_EXPLICIT.format("NumPy")),
        "per_example": _depends(
            _EXPLICIT.format("NumPy") + "; without a `per_example_vjp` method, one `vjp` per input"
        ),
        "layer_io": _no("explicit-VJP models have no layers to recognise: per-example methods use "
                        "`per_example_vjp`"),
        "jvp": _depends(
            "explicit-VJP models that state `jvp(params, x, tangent)` (`fisherlib.models` do); "
            "without it `fisherlib.spectral` falls back to C per-example VJPs per input"
        ),
        "training_loop": _depends(
            "cross-entropy only (`loss=None`, computed in the core, through `linearize`): a "
            "framework loss needs `loss_linearize`, which explicit-VJP models lack"
        ),
        "own_params": _no("explicit-VJP models take their parameters as an argument"),
        "jit": _no("NumPy runs eagerly; there is nothing to compile"),
        "float64": YES,
        "reduced_precision": _depends("float16 only: NumPy has no bfloat16"),
        "gpu": _no("NumPy runs on the CPU only"),
    },
    "torch": {
        "core": YES,
        "batched_vjp": YES,  # one autograd.grad(is_grads_batched=True)
        "per_example": _yes(
            "`torch.func.vmap` runs each input as a batch of one: batch norm in training mode "
            "fails (call `model.eval()`)"
        ),
        "layer_io": _yes(
            "forward hooks on the recognised modules (see the supported-layers table in "
            "`docs/per-example.md`) and one batched `autograd.grad` to their outputs; other leaves "
            "take the per-example VJP"
        ),
        "jvp": _yes("`torch.func.jvp` of `functional_call`, K directions in one `torch.func.vmap`"),
        "training_loop": _yes("`loss_linearize`: the loss's logit gradient by autograd, then "
                              "[loss; K probes] through the forward's graph (one `autograd.grad` per row "
                              "on a CPU, one batched call elsewhere); `train_linearize` lets batch norm "
                              "update its running statistics as the plain step would"),
        "own_params": YES,  # an nn.Module's parameters with requires_grad=True
        "jit": _no(
            "`torch.compile` is not supported or tested (with torch 2.13 a compiled module failed "
            "in the batched VJP); pass the eager module"
        ),
        "float64": YES,
        "reduced_precision": YES,
        "gpu": _depends("CUDA: a CUDA build of torch and a GPU", "gpu"),
    },
    "jax": {
        "core": YES,
        "batched_vjp": YES,  # one vmap of the pullback
        "per_example": YES,  # jax.vmap, or jax.lax.map in chunks
        "layer_io": _yes(
            "layers found in the model's jaxpr (see the supported-layers table in "
            "`docs/per-example.md`), one `vmap` of one pullback to their outputs, jit-compiled per "
            "shape; other leaves take the per-example VJP"
        ),
        "jvp": _yes("`jax.jvp`; K directions through one `jax.linearize` and `vmap`, jit-compiled"),
        "training_loop": _yes("`loss_linearize` (`jax.value_and_grad` of the loss, `vmap` of the "
                              "pullback) and `compile` (`jax.jit` of the whole step with its probes and update); "
                              "the optax transformation traces inside your `jit`"),
        "own_params": _no(
            "JAX models are pure functions `f(params, x)`: pass the parameter pytree (flax "
            "variables, `eqx.partition`)"
        ),
        "jit": _yes(
            "`compile(fn, key=)`: `fisher()` (every structure, K-FAC and EK-FAC included) and "
            "`RunningFisher.step` compile each batch's whole "
            "step (forward or layer I/O, cotangents, pullback, reduction) once per model, options "
            "and shape, and a `FisherEstimate` from `fisher()` reads `value` and `stderr` in one "
            "compiled call; the core, the adapter and the estimators also trace inside your own `jit` "
            "(`tests/test_jit.py`); `backends.get(\"jax\", jit=False)` compiles nothing"
        ),
        "float64": _depends("needs `jax.config.update(\"jax_enable_x64\", True)`; else float32", "x64"),
        "reduced_precision": YES,
        "gpu": _depends("a GPU build of jaxlib and a GPU", "gpu"),
    },
    "cupy": {
        "core": YES,
        "batched_vjp": _depends(_CUPY_MODELS),
        "per_example": _depends(_CUPY_MODELS),
        "layer_io": _depends("a torch model fed CuPy data keeps the torch adapter's layer I/O"),
        "jvp": _no(
            "no `jvp` in the adapter: `fisherlib.spectral` falls back to the Jacobian rows, C "
            "per-example VJPs per input"
        ),
        "training_loop": _depends("cross-entropy only, through `linearize` (" + _CUPY_MODELS + ")"),
        "own_params": _depends("a torch `nn.Module` through DLPack (needs torch with CUDA)"),
        "jit": _no("CuPy runs eagerly (a torch or JAX model keeps its own adapter's behaviour)"),
        "float64": YES,
        "reduced_precision": _depends("float16 only: CuPy has no bfloat16"),
        "gpu": _yes("CUDA only: CuPy runs nowhere else"),
    },
    "array_api_strict": {
        "core": YES,
        "batched_vjp": _depends("through the `numpy` adapter: explicit-VJP models only"),
        "per_example": _depends("through the `numpy` adapter: explicit-VJP models only"),
        "layer_io": _no("through the `numpy` adapter: explicit-VJP models have no layers to recognise"),
        "jvp": _depends("through the `numpy` adapter: explicit-VJP models with a `jvp` method"),
        "training_loop": _depends("through the `numpy` adapter: explicit-VJP models, cross-entropy only"),
        "own_params": _no("explicit-VJP models take their parameters as an argument"),
        "jit": _no("an eager reference implementation"),
        "float64": YES,
        "reduced_precision": _no("the Array API standard has no float16 or bfloat16"),
        "gpu": _no("a CPU reference implementation (its extra devices are simulated)"),
    },
}


@dataclass(frozen=True)
class LayerRule:
    """A layer an adapter's ``layer_io`` recognises: what users write, its rule, the leaves it owns."""

    layer: str
    kind: str  # "dense", "embedding" or "scale_shift" (fisherlib/core/layers.py)
    leaves: str
    note: str = ""


LAYERS: dict[str, tuple[LayerRule, ...]] = {
    "torch": (
        LayerRule("`nn.Linear`", "dense", "weight, bias",
                  "any leading axes: positions (a sequence) share the weight"),
        LayerRule("HuggingFace `Conv1D` (GPT, GPT-2)", "dense", "weight, bias",
                  "a linear layer with its weight stored (in, out)"),
        LayerRule("`nn.Conv1d`, `nn.Conv2d`, `nn.Conv3d`", "dense", "weight, bias",
                  "over unfolded patches; stride, padding (numbers, 'same', 'valid', every padding "
                  "mode), dilation, groups"),
        LayerRule("`nn.Embedding`", "embedding", "weight",
                  "padding_idx rows get nothing; not with sparse=True or scale_grad_by_freq"),
        LayerRule("`nn.LayerNorm`, `nn.RMSNorm`", "scale_shift", "weight, bias",
                  "the normalised input x̂ from the framework's own function"),
        LayerRule("`nn.GroupNorm`", "scale_shift", "weight, bias", "per channel, shared over positions"),
        LayerRule("`nn.BatchNorm1d/2d/3d`", "scale_shift", "weight, bias",
                  "eval mode only (running statistics); training mode is refused by per-example methods"),
    ),
    "jax": (
        LayerRule("`dot_general` with a parameter operand (`x @ W`, `einsum`, flax `Dense`/`DenseGeneral`/"
                  "`nnx.Linear`, equinox `Linear` under `vmap`)", "dense", "kernel, bias",
                  "any stored layout (I, O), (O, I) or multi-axis; other free axes of x share the "
                  "kernel; the bias is a parameter added right after"),
        LayerRule("`conv_general_dilated` (flax `Conv`, equinox `Conv` under `vmap`)", "dense", "kernel, bias",
                  "over patches; strides, padding, input and kernel dilation, feature groups"),
        LayerRule("`jnp.take` / `W[idx]` of whole rows of a 2-D table (flax `Embed`, equinox "
                  "`Embedding`)", "embedding", "table", "clip and fill modes"),
        LayerRule("a parameter multiplied in (`x * scale`: `LayerNorm`, `RMSNorm`, `GroupNorm`, "
                  "`BatchNorm` with running averages)", "scale_shift", "scale",
                  "constant factors such as flax's `rsqrt(var + eps)` are folded into x̂"),
        LayerRule("a parameter added (`x + bias`, positional embeddings)", "scale_shift", "bias", ""),
    ),
}
"""Per adapter, the layers whose leaves the layer-I/O rules cover; every other leaf takes the
generic per-example VJP (``docs/per-example.md``)."""


def render_layers() -> str:
    """The supported-layers table as Markdown, one section per adapter."""
    lines = [f"<!-- generated from fisherlib/_capabilities.py; regenerate with `{REGENERATE}` -->", ""]
    for backend, rules in LAYERS.items():
        lines += [f"**`{backend}`**", "", "| layer | rule | leaves | notes |", "|---|---|---|---|"]
        lines += [f"| {r.layer} | {r.kind} | {r.leaves} | {r.note} |" for r in rules]
        lines.append("")
    return "\n".join(lines)


def _check_table() -> None:
    names = [b.name for b in BACKENDS]
    keys = [f.key for f in FEATURES]
    if list(CAPABILITIES) != names:
        raise AssertionError(f"CAPABILITIES: backends {list(CAPABILITIES)}, expected {names}")
    for name, row in CAPABILITIES.items():
        if list(row) != keys:
            raise AssertionError(f"CAPABILITIES[{name!r}]: features {list(row)}, expected {keys}")


_check_table()


def backend_info(backend: str) -> BackendInfo:
    for info in BACKENDS:
        if info.name == backend:
            return info
    raise ValueError(f"backend: unknown {backend!r}; known: {', '.join(b.name for b in BACKENDS)}")


def feature_info(feature: str) -> Feature:
    for f in FEATURES:
        if f.key == feature:
            return f
    raise ValueError(f"feature: unknown {feature!r}; known: {', '.join(f.key for f in FEATURES)}")


def support(backend: str, feature: str) -> Support:
    """The entry for ``backend`` ("numpy", "torch", "jax", "cupy", "array_api_strict") and ``feature``."""
    backend_info(backend)
    feature_info(feature)
    return CAPABILITIES[backend][feature]


def requirements(backend: str, feature: str) -> tuple[Requirement, ...]:
    """The checkable conditions of an entry: the backend's own (CuPy: a GPU), then the entry's."""
    out = [backend_info(backend).requires, support(backend, feature).requires]
    return tuple(dict.fromkeys(r for r in out if r is not None))


# -- the docs' table ------------------------------------------------------------------------------

START = "<!-- capabilities:start -->"
END = "<!-- capabilities:end -->"
REGENERATE = "python -m fisherlib._capabilities --write"


def render_markdown() -> str:
    """The table as Markdown (features as rows, backends as columns) with numbered notes."""
    notes: list[str] = []

    def cell(backend: str, feature: Feature) -> str:
        s = CAPABILITIES[backend][feature.key]
        if not s.note:
            return s.status.value
        notes.append(f"{len(notes) + 1}. `{backend}`, {feature.short}: {s.note}.")
        label = {Status.YES: "yes", Status.DEPENDS: "yes, if", Status.NO: "no"}[s.status]
        return f"{label} [{len(notes)}]"

    head = "| feature | " + " | ".join(f"`{b.name}`" for b in BACKENDS) + " |"
    rule = "|---" * (len(BACKENDS) + 1) + "|"
    rows = [f"| {f.title} | " + " | ".join(cell(b.name, f) for b in BACKENDS) + " |" for f in FEATURES]
    lines = [
        f"<!-- generated from fisherlib/_capabilities.py; regenerate with `{REGENERATE}` -->",
        "",
        head,
        rule,
        *rows,
        "",
        *(line for b in BACKENDS if b.note for line in (b.note, "")),
        *notes,
    ]
    return "\n".join(lines) + "\n"


def _block(start: str, end: str) -> re.Pattern:
    return re.compile(re.escape(start) + r"\n(.*?)" + re.escape(end), re.S)


_BLOCK = _block(START, END)
LAYERS_START = "<!-- layers:start -->"
LAYERS_END = "<!-- layers:end -->"
LAYERS_PAGE = "docs/per-example.md"
_LAYERS_BLOCK = _block(LAYERS_START, LAYERS_END)


def _between(text: str, block: re.Pattern, start: str, end: str) -> str:
    m = block.search(text)
    if m is None:
        raise ValueError(f"text: no {start} ... {end} block")
    return m.group(1)


def docs_table(text: str) -> str:
    """The text between the markers of a page (ValueError without them)."""
    return _between(text, _BLOCK, START, END)


def layers_table(text: str) -> str:
    """The text between the supported-layers markers of a page (ValueError without them)."""
    return _between(text, _LAYERS_BLOCK, LAYERS_START, LAYERS_END)


def update_docs(path: str | Path = "docs/backends.md") -> bool:
    """Write the rendered table between the markers of ``path``; True when the file changed.

    Also rewrites the supported-layers table of ``docs/per-example.md`` beside it.
    """
    path = Path(path)
    layers = path.parent / Path(LAYERS_PAGE).name
    changed = False
    if layers.exists():
        text = layers.read_text(encoding="utf-8")
        layers_table(text)
        new = _LAYERS_BLOCK.sub(lambda _: f"{LAYERS_START}\n{render_layers()}{LAYERS_END}", text, count=1)
        if new != text:
            layers.write_text(new, encoding="utf-8")
            changed = True
    text = path.read_text(encoding="utf-8")
    docs_table(text)  # the markers must be there
    new = _BLOCK.sub(lambda _: f"{START}\n{render_markdown()}{END}", text, count=1)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return changed or new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fisherlib._capabilities",
        description="Print the capability table as Markdown, or write it into the docs page.",
    )
    parser.add_argument("--write", nargs="?", const="docs/backends.md", metavar="PAGE",
                        help="rewrite the table between the markers of PAGE (default docs/backends.md)")
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(render_markdown())
        return 0
    changed = update_docs(args.write)
    print(f"{args.write}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
