"""Docstring text shared by many losses, written once and filled in at import."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=Callable[..., object])

LEGACY_ARGS = """\
size_average: deprecated, as in torch (see ``reduction``).
reduce: deprecated, as in torch (see ``reduction``)."""


def fill_doc(**pieces: str) -> Callable[[T], T]:
    """Replace each docstring line that is exactly ``{name}`` with ``pieces[name]``, indented
    like that line. Whole-line markers only, so braces in formulas are left alone."""

    def decorate(obj: T) -> T:
        lines = []
        for line in (obj.__doc__ or "").splitlines():
            key = line.strip()[1:-1] if line.strip().startswith("{") and line.strip().endswith("}") else None
            if key in pieces:
                indent = line[: len(line) - len(line.lstrip())]
                lines.extend(indent + piece if piece else "" for piece in pieces[key].splitlines())
            else:
                lines.append(line)
        obj.__doc__ = "\n".join(lines)
        return obj

    return decorate
