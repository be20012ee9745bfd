"""One catalog of every loss: what `losskit explain`, the documentation site and the tests
read.

Each :class:`Entry` describes one loss (all the names it goes by, in losskit, torch and
Keras), what its prediction and target must be, its formula and properties, its options,
a worked example and its common mistakes. Examples, mistakes and curves are code that runs
on demand against losskit itself, so that every number shown is computed, never typed in.
Importing the catalog costs nothing beyond losskit: the code runs only when asked.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Curve", "Entry", "Mistake", "ENTRIES", "FAMILIES", "lookup", "suggest", "run_code"]


@dataclass(frozen=True)
class Mistake:
    """A classic mistake: what goes wrong, and code whose last line is a dict of numbers."""

    title: str
    why: str
    code: str


@dataclass(frozen=True)
class Curve:
    """The loss of one sample as a function of a scalar prediction ``x``: ``code`` is an
    expression of ``x`` (a 1-D tensor of points) and the options, giving one loss per
    point; ``variants`` are option values drawn on one chart."""

    code: str
    x_label: str
    x_range: tuple[float, float]
    variants: tuple[dict[str, Any], ...] = ({},)


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
    example: str  # code; its last line is an expression whose value is shown
    mistakes: tuple[Mistake, ...] = ()
    torch_vs_keras: str = ""
    curve: Curve | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that finds this entry: key, losskit, torch and Keras names, aliases."""
        # info.* keep their prefix: info.cross_entropy (of distributions) is not cross_entropy.
        short = [c if c.startswith("info.") else c.split(".")[-1] for c in self.covers]
        return (self.key, *short, *(t.split(".")[-1] for t in self.torch), *(k.split(".")[-1] for k in self.keras),
                *self.aliases)


from .entries import ENTRIES, FAMILIES  # noqa: E402  (the data needs the classes above)

_INDEX: dict[str, Entry] = {}
for _entry in ENTRIES:
    for _name in _entry.names:
        _INDEX.setdefault(_name.lower(), _entry)


def lookup(name: str) -> Entry | None:
    """The entry any of its names finds, case-insensitively (``bce``, ``BCELoss``, ...)."""
    return _INDEX.get(name.strip().lower())


def suggest(name: str, n: int = 3) -> list[str]:
    """Close names for a misspelling."""
    return difflib.get_close_matches(name.strip().lower(), list(_INDEX), n=n, cutoff=0.6)


def run_code(code: str, warned: list[str] | None = None) -> Any:
    """Run catalog code against losskit and return the value of its last line. The
    warnings it raises are caught (appended to ``warned`` when given), never left on."""
    import warnings

    import torch

    import losskit.functional as F
    import losskit.info as info
    import losskit.keras as K
    import losskit.nn as nn

    namespace: dict[str, Any] = {"torch": torch, "F": F, "K": K, "nn": nn, "info": info}
    lines = code.strip().splitlines()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec("\n".join(lines[:-1]), namespace)  # noqa: S102 - the catalog's own code
        value = eval(lines[-1], namespace)  # noqa: S307
    if warned is not None:
        warned.extend(dict.fromkeys(str(w.message) for w in caught))
    return value


def by_family() -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {family: [] for family in FAMILIES}
    for entry in ENTRIES:
        out[entry.family].append(entry)
    return out


def covered(entries: Iterable[Entry] = ENTRIES) -> set[str]:
    return {name for entry in entries for name in entry.covers}
