"""A griffe extension (mkdocs.yml: mkdocstrings' ``extensions``) that renders the
reStructuredText bits of losskit's docstrings on the site, leaving the docstrings as they
are for ``help()``:

- a ``.. math::`` block becomes a ```` ```math ```` fence and ``:math:`x``` becomes
  ``$`x`$``, both rendered by markdown-katex at build time, as on the rest of the site;
- a doctest becomes a fenced ``pycon`` block;
- ``:func:`name```, ``:class:``, ``:mod:``, ``:meth:``, ``:attr:``, ``:data:``, ``:exc:`` and
  ``:ref:`` become links to the object's entry in the API reference when it has one
  (``build/docs/api-objects.txt``, written by docs/generate.py), inline code otherwise;
  ``~`` shows the last part of the name only, as in Sphinx.

docs/check_site.py fails the build if any reStructuredText is left on a page.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import griffe

OBJECTS = Path(__file__).resolve().parents[1] / "build" / "docs" / "api-objects.txt"
ROLE = re.compile(r":(?:py:)?(func|class|mod|meth|attr|data|exc|obj|ref|math):`([^`]+)`")
MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. (?P<kind>math|note|warning|seealso)::[ \t]*(?P<inline>\S.*)?$")


def convert_math_blocks(text: str) -> str:
    """``.. math::`` and its indented body -> a ```math fence at the directive's indent;
    ``.. note::`` (``warning``, ``seealso``) -> an admonition."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = MATH_BLOCK.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["inline"]] if match["inline"] else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        body_text = textwrap.dedent("\n".join(body)).strip("\n")
        trailing_blank = body and not body[-1].strip()
        if match["kind"] == "math":
            out += [f"{indent}```math", *(f"{indent}{line}" if line else "" for line in body_text.splitlines()),
                    f"{indent}```"]
        else:
            kind = {"seealso": "info"}.get(match["kind"], match["kind"])
            out += [f"{indent}!!! {kind}", "", *(f"{indent}    {line}" if line else "" for line in body_text.splitlines())]
        if trailing_blank or i < len(lines):
            out.append("")
    return "\n".join(out)


def fence_doctests(text: str) -> str:
    """A doctest (``>>>`` lines and the output under them, up to a blank line) -> a fenced
    ``pycon`` block at its indent: Markdown would read ``>>>`` as nested quotes."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class RstRoles(griffe.Extension):
    def __init__(self) -> None:
        super().__init__()
        self.objects: set[str] | None = None

    def _documented(self) -> set[str]:
        if self.objects is None:
            self.objects = set(OBJECTS.read_text().split()) if OBJECTS.exists() else set()
        return self.objects

    def _target(self, name: str, where: str) -> str | None:
        """The documented object ``name`` means, seen from the object at path ``where``."""
        documented = self._documented()
        candidates = [name, f"losskit.{name}"]
        package = where.rsplit(".", 1)[0]
        while package:
            candidates.append(f"{package}.{name}")
            package = package.rpartition(".")[0]
        for candidate in candidates:
            if candidate in documented:
                return candidate
        ending = [path for path in documented if path.endswith(f".{name}")]
        return ending[0] if len(ending) == 1 else None

    def convert(self, text: str, where: str) -> str:
        text = fence_doctests(convert_math_blocks(text))

        def role(match: re.Match) -> str:
            kind, content = match.groups()
            if kind == "math":
                return f"$`{content}`$"
            content = content.strip()
            if kind == "ref" and "<" in content:  # :ref:`text <label>`
                return content.split("<", 1)[0].strip()
            shown_name = content.lstrip("~")
            shown = shown_name.rsplit(".", 1)[-1] if content.startswith("~") else shown_name
            shown = f"{shown}()" if kind in ("func", "meth") and not shown.endswith(")") else shown
            target = self._target(shown_name.removesuffix("()"), where)
            return f"[`{shown}`][{target}]" if target else f"`{shown}`"

        return ROLE.sub(role, text)

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and obj.docstring.value:
            obj.docstring.value = self.convert(obj.docstring.value, obj.path)
