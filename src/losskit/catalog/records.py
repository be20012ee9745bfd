"""The catalog's records (Entry, Mistake, Curve) and how their code is shown and run.

Worked examples, mistakes and curves are plain functions (one module per family beside
this one), so that linters, refactoring tools and tests see them. What a reader is shown
is :func:`snippet`: the function's body as written, without its ``def`` line and
docstring, and with the final ``return EXPR`` shown as ``EXPR``: the expression whose
value is printed beside it. The snippet runs as pasted after ``import torch``,
``import losskit.functional as F``, ``import losskit.keras as K`` and
``import losskit.info as info`` (the names every catalog module imports).
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Curve", "Entry", "Mistake", "REDUCTION", "run", "session", "snippet"]

REDUCTION = "'mean' (default), 'sum', or 'none' (one loss per element)"


@dataclass(frozen=True)
class Mistake:
    """A classic mistake: what goes wrong (``why``), and ``demo``, a function of no
    arguments returning a dict of the numbers (or error messages) that show it."""

    title: str
    why: str
    demo: Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class Curve:
    """The loss of one sample as a function of a scalar prediction ``x``: ``loss(x,
    **options)`` takes a 1-D tensor of points and returns one loss per point; ``variants``
    are option values drawn on one chart. ``x_symbol`` names the axis variable in the
    gradient's label (d loss / d x_symbol)."""

    loss: Callable[..., Any]
    x_label: str
    x_range: tuple[float, float]
    variants: tuple[dict[str, Any], ...] = ({},)
    x_symbol: str = "x"


@dataclass(frozen=True)
class Entry:
    key: str
    title: str
    family: str
    problems: tuple[str, ...]
    covers: tuple[str, ...]  # every public losskit name of this loss, as 'module.name'
    torch: tuple[str, ...]
    keras: tuple[str, ...]
    aliases: tuple[str, ...]
    prediction: str  # what the input must be
    target: str
    output_layer: str  # what the model's last layer should give
    formula: str  # LaTeX
    formula_text: str  # the same for a terminal
    summary: str
    properties: dict[str, str]
    options: dict[str, str]
    example: Callable[[], Any]  # a function of no arguments; its return value is shown
    mistakes: tuple[Mistake, ...] = ()
    torch_vs_keras: str = ""
    curve: Curve | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)  # paragraphs shown after the summary (Markdown code spans)
    # Further reading on the documentation site: (text, page path relative to the site's
    # root, with an optional #anchor), e.g. ("its speed and memory", "performance.md#linear-cross-entropy").
    links: tuple[tuple[str, str], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that finds this entry: key, losskit, torch and Keras names, aliases."""
        # info.* keep their prefix: info.cross_entropy (of distributions) is not cross_entropy.
        short = [c if c.startswith("info.") else c.split(".")[-1] for c in self.covers]
        return (self.key, *short, *(t.split(".")[-1] for t in self.torch), *(k.split(".")[-1] for k in self.keras),
                *self.aliases)


def run(fn: Callable[..., Any], *args: Any, warned: list[str] | None = None, **kwargs: Any) -> Any:
    """Call a catalog function and return its value. The warnings it raises are caught
    (their messages appended, once each, to ``warned`` when given), never left on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn(*args, **kwargs)
    if warned is not None:
        warned.extend(message for message in dict.fromkeys(str(w.message) for w in caught) if message not in warned)
    return value


def _function(source: str) -> ast.FunctionDef:
    tree = ast.parse(source)
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        raise TypeError("a catalog snippet comes from one plain function (def, no decorator)")
    return tree.body[0]


def _header_end(source: str) -> int:
    """The 1-based line on which the ``def`` line's closing colon stands."""
    depth = 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.OP:
            if token.string in "([{":
                depth += 1
            elif token.string in ")]}":
                depth -= 1
            elif token.string == ":" and depth == 0:
                return token.start[0]
    raise ValueError("no ':' ends the def line")


def snippet(fn: Callable[..., Any]) -> str:
    """The code shown for a catalog function: its body, dedented, without the ``def``
    line or docstring; a final ``return EXPR`` becomes ``EXPR`` (the value shown beside
    it). Comments are kept. Raises TypeError for anything but a plain ``def``."""
    source = textwrap.dedent(inspect.getsource(fn))
    func = _function(source)
    if func.decorator_list:
        raise TypeError(f"{fn.__qualname__}: a catalog function has no decorator")
    lines = source.splitlines()
    body = func.body
    start = _header_end(source)  # 0-based index of the first line after the def line
    if ast.get_docstring(func, clean=False) is not None:
        start = body[0].end_lineno  # skip the docstring
        body = body[1:]
    last = body[-1] if body else None
    if isinstance(last, ast.Return) and last.value is not None:
        row, col = last.lineno - 1, last.col_offset
        cut = last.value.col_offset - col  # 'return ' and any spaces after it
        lines[row] = lines[row][:col] + lines[row][col + cut:]
        # Continuation lines aligned under the returned expression move left with it.
        for r in range(row + 1, last.end_lineno):
            if lines[r][:col + cut].strip() == "":
                lines[r] = lines[r][:col] + lines[r][col + cut:]
    text = textwrap.dedent("\n".join(lines[start:]))
    return text.strip("\n")


def session(code: str) -> str:
    """A snippet as an interactive session: '>>> ' before the first line of each statement
    (and each comment line between statements), '... ' before its continuation lines."""
    lines = code.splitlines()
    continuation: set[int] = set()
    for node in ast.parse(code).body:
        continuation.update(range(node.lineno, node.end_lineno))  # 0-based: all but the first line
    return "\n".join(("... " if i in continuation else ">>> ") + line if line.strip() else "..."
                     for i, line in enumerate(lines))
