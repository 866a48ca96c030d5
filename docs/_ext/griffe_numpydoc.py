"""A griffe extension that lets numpydoc (reStructuredText) docstrings render as Markdown.

fisherlib's docstrings follow numpydoc, which Sphinx reads as reStructuredText. mkdocstrings
renders docstring text as Markdown, so two reStructuredText constructs would show raw:

- cross-reference roles, ``:class:`Sketch``` or ``:func:`~fisherlib.fisher```: rendered as
  inline code (``~`` keeps the last dotted component, as in Sphinx);
- simple tables (columns framed by ``=====  =====`` rules): rewritten as Markdown tables;
- doctest blocks outside an ``Examples`` section (a module's summary, say): fenced as code.

The docstrings themselves stay valid numpydoc. Used by ``mkdocs.yml`` (mkdocstrings' python
handler, ``extensions``); nothing else imports it.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|ref|doc):`(~?)([^`]+)`")
RULE = re.compile(r"^(\s*)(=+)( +=+)*\s*$")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    target = target.strip()
    if "<" in target and target.endswith(">"):  # :ref:`text <target>`
        target = target[: target.index("<")].strip()
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _columns(rule: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"=+", rule)]


def _cells(line: str, cols: list[tuple[int, int]]) -> list[str]:
    cells = []
    for i, (start, _) in enumerate(cols):
        end = cols[i + 1][0] if i + 1 < len(cols) else len(line)
        cells.append(line[start:end].strip().replace("|", "\\|"))
    return cells


def _tables(text: str) -> str:
    """Rewrite reStructuredText simple tables (header, rule, body, rule) as Markdown tables."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = RULE.match(lines[i])
        if m and len(_columns(lines[i])) >= 2:
            # The frame: rule, header row(s), rule, body rows, rule.
            rules = [j for j in range(i, len(lines)) if RULE.match(lines[j])][:3]
            if len(rules) == 3 and all(lines[j].strip() for j in range(rules[0], rules[2] + 1)):
                cols = _columns(lines[i])
                indent = m.group(1)
                header = [_cells(lines[j], cols) for j in range(rules[0] + 1, rules[1])]
                head = [" ".join(c).strip() for c in zip(*header)] if header else [""] * len(cols)
                out.append(indent + "| " + " | ".join(head) + " |")
                out.append(indent + "|" + "---|" * len(cols))
                for j in range(rules[1] + 1, rules[2]):
                    out.append(indent + "| " + " | ".join(_cells(lines[j], cols)) + " |")
                i = rules[2] + 1
                continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


SECTION = re.compile(r"^\s*-{3,}\s*$")


def _doctests(text: str) -> str:
    """Fence ``>>>`` blocks (with their output) found outside a numpydoc Examples section."""
    lines = text.split("\n")
    out: list[str] = []
    in_examples = False
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and SECTION.match(lines[i + 1]) and lines[i].strip():
            in_examples = lines[i].strip() == "Examples"
        if not in_examples and lines[i].lstrip().startswith(">>>"):
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            out += [indent + "```pycon", *lines[i:j], indent + "```"]
            i = j
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


class NumpydocAsMarkdown(Extension):
    """Rewrite reStructuredText roles and simple tables in every docstring griffe loads."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_role, _doctests(_tables(obj.docstring.value)))
