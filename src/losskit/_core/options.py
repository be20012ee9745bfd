"""The options of the cross-entropy family, as one frozen object validated once.

``cross_entropy``, ``linear_cross_entropy``, their Modules and the vocabulary-parallel
losses all take the same options; they travel whole, from the public function down to the
CPU kernels, the Triton launchers and the custom ops, never as loose floats in positional
order. :func:`op_schema` spells them for a custom op's schema; the fused-op factory
(:mod:`losskit.kernels.fused_op`) crosses that boundary by field name, in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from .reduction import REDUCTIONS


@dataclass(frozen=True)
class CrossEntropyOptions:
    """How a cross-entropy is computed, beyond its tensors.

    Attributes:
        ignore_index: class-index target value that contributes neither loss nor gradient.
        label_smoothing: :math:`\\varepsilon` in ``[0, 1]``: the target becomes
            :math:`(1 - \\varepsilon)` one-hot plus :math:`\\varepsilon / C` everywhere.
        lse_square_scale: the z-loss scale :math:`s \\ge 0`: adds :math:`s \\,\\mathrm{lse}^2`
            per position that counts (PaLM).
        softcap: logits become :math:`\\text{cap} \\tanh(x / \\text{cap})` first (Gemma 2);
            None for none.
        temperature: :math:`T > 0`: the (capped) logits are divided by ``T`` before the
            softmax, as sampling with a temperature does (RL log-probs, distillation).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    softcap: float | None = None
    temperature: float = 1.0
    reduction: str = "mean"

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            raise ValueError(problem)

    def _problem(self) -> str | None:
        if not 0.0 <= self.label_smoothing <= 1.0:
            # torch 2.13 raises above 1 but computes the unsmoothed loss for a negative (or
            # nan) value, which would train without the smoothing asked for; losskit refuses
            # it (README: "Where losskit differs from torch").
            below = "" if self.label_smoothing > 1.0 else (
                " (torch ignores a negative or nan value silently; 0.0 is no smoothing)")
            return f"label_smoothing must be between 0.0 and 1.0; got {self.label_smoothing}{below}"
        if not self.lse_square_scale >= 0.0:
            return f"lse_square_scale must be >= 0; got {self.lse_square_scale}"
        if self.softcap is not None and not self.softcap > 0.0:
            return f"softcap must be a positive number or None; got {self.softcap}"
        if not 0.0 < self.temperature < math.inf:
            return f"temperature must be a positive, finite number; got {self.temperature}"
        if self.reduction not in REDUCTIONS:
            return f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {self.reduction!r}"
        return None

    @staticmethod
    def checked(fn: str, **options: Any) -> CrossEntropyOptions:
        """The options of a call of ``fn``; a ValueError that names ``fn`` when one is out of
        range. Equal options are built once (the same object serves every later call)."""
        try:
            # Built afresh while compiling: dynamo traces the dataclass, not the cache.
            return CrossEntropyOptions(**options) if torch.compiler.is_compiling() else _cached(**options)
        except ValueError as error:
            raise ValueError(f"{fn}: {error}") from None
        except TypeError:  # an unhashable value: build it uncached, with the same checks
            try:
                return CrossEntropyOptions(**options)
            except ValueError as error:
                raise ValueError(f"{fn}: {error}") from None

    @property
    def is_plain(self) -> bool:
        """No smoothing, z-loss, soft-capping or temperature: the bare cross-entropy."""
        return (
            self.label_smoothing == 0.0 and self.lse_square_scale == 0.0 and self.softcap is None
            and self.temperature == 1.0
        )


@functools.lru_cache(maxsize=256)
def _cached(**options: Any) -> CrossEntropyOptions:
    return CrossEntropyOptions(**options)


_SCHEMA_TYPES = {int: "int", float: "float", str: "str", bool: "bool", "int": "int", "float": "float",
                 "str": "str", "bool": "bool", "float | None": "float?", "int | None": "int?"}


def op_schema(cls: type) -> str:
    """The fields of a frozen options dataclass as custom-op schema arguments, in field
    order: ``int ignore_index, float label_smoothing, ..., float? softcap, ...``."""
    return ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(cls))
