"""One catalog of every loss: what `losskit explain`, the documentation site and the tests
read.

Each :class:`Entry` describes one loss (all the names it goes by, in losskit, torch and
Keras), what its prediction and target must be, its formula and properties, its options,
a worked example and its common mistakes. The entries live one module per family
(``regression``, ``binary``, ``multiclass``, ``ranking``, ``segmentation``, ``sequence``,
``distribution``, ``posttraining``), each loss's functions just above its Entry: the worked example (a
function of no arguments whose value is shown), each mistake (a function returning a dict
of numbers) and the curve (a function of ``x`` and the options giving one loss per point).
They run against losskit itself, only when asked, so that every number shown is computed,
never typed in; importing the catalog runs none of them.

What a reader sees of such a function is :func:`snippet`: its body without the ``def``
line, the final ``return EXPR`` shown as ``EXPR`` (see :mod:`losskit.catalog.records`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from . import (binary, distillation, distribution, log_probs, multiclass, posttraining, ranking, regression,
               segmentation, sequence)
from .records import Curve, Entry, Mistake, run, session, snippet

__all__ = ["Curve", "Entry", "Mistake", "ENTRIES", "FAMILIES", "lookup", "suggest", "run", "session", "snippet"]

FAMILIES = {
    "regression": "Regression: predict a number",
    "binary": "Binary and multi-label classification",
    "multiclass": "Multi-class classification",
    "ranking": "Ranking, similarity and embeddings",
    "segmentation": "Segmentation: overlap of masks",
    "sequence": "Sequences without alignment",
    "distribution": "Distributions and information",
    "posttraining": "Fine-tuning language models",
}

# A family's entries may live in several modules (fine-tuning: preference and policy losses,
# distillation, log-probs), listed here in the order they are shown.
_MODULES = {"regression": (regression,), "binary": (binary,), "multiclass": (multiclass,), "ranking": (ranking,),
            "segmentation": (segmentation,), "sequence": (sequence,), "distribution": (distribution,),
            "posttraining": (log_probs, posttraining, distillation)}

ENTRIES: list[Entry] = [entry for family in FAMILIES for module in _MODULES[family] for entry in module.ENTRIES]

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


def by_family() -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {family: [] for family in FAMILIES}
    for entry in ENTRIES:
        out[entry.family].append(entry)
    return out


def covered(entries: Iterable[Entry] = ENTRIES) -> set[str]:
    return {name for entry in entries for name in entry.covers}
