"""The one factory of test inputs: seeded tensors of one dtype on one device.

Both the catalog cases (tests/cases.py: one fixed call of every loss, on CPU, ``meta`` and
under torch.compile) and the fuzz strategies (tests/fuzz_strategies.py: random calls
compared with torch) build their tensors here, so the same seed gives the same numbers on
every device, in every dtype and on every rebuild.

Values are drawn in float64 on the CPU (``normal``, ``uniform``, ``index``), may then be
edited (a target set to ``ignore_index``, an entry set to ``inf``), and become arguments
through ``leaf`` (requires grad) or ``const`` (no grad), which round them to the dtype and
move them to the device. ``x``, ``rand``, ``probs`` and ``sign`` are one-call shorthands
for the common arguments.
"""

from __future__ import annotations

import torch


class Inputs:
    """Deterministic tensors from one seed: the same values for every build.

    ``rounded_to``: the values are first rounded to this dtype, then cast to ``dtype`` (the
    float64 reference of a float16 fuzz run sees the float16 inputs). ``leaves`` lists the
    tensors made with ``leaf``, in order: what a gradient is taken with respect to.
    """

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 rounded_to: torch.dtype | None = None) -> None:
        self.device, self.dtype, self.rounded_to = device, dtype, rounded_to or dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.leaves: list[torch.Tensor] = []

    # ---- draws: float64 (index: int64) values, drawn on the CPU so every device sees them

    def normal(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=self.gen, dtype=torch.float64)

    def index(self, high: int, *shape: int, ignore: int | None = None) -> torch.Tensor:
        """Class indices in [0, high), on the device; with ``ignore``, the entry at flat
        position 1 (of two or more) is set to it."""
        t = torch.randint(0, max(high, 1), shape, generator=self.gen)
        if ignore is not None and t.numel() > 1:
            t.view(-1)[1] = ignore
        return t.to(self.device)

    # ---- arguments: drawn values rounded to the dtype, on the device

    def _cast(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(self.rounded_to).to(self.dtype).to(self.device)

    def leaf(self, values: torch.Tensor, layout: str = "contiguous", grad: bool = True) -> torch.Tensor:
        """values in the build dtype, as a leaf that requires grad, seen through ``layout``:
        'transposed' (same values, column-major storage) or 'expanded' (row 0 broadcast)."""
        if layout == "expanded" and values.dim() >= 1 and values.shape[0] > 0:
            base = self._cast(values[:1]).requires_grad_(grad)
            if grad:
                self.leaves.append(base)
            return base.expand(values.shape)
        base = self._cast(values)
        if layout == "transposed" and values.dim() >= 2:
            base = base.transpose(0, 1).contiguous().requires_grad_(grad)
            if grad:
                self.leaves.append(base)
            return base.transpose(0, 1)
        base = base.clone().requires_grad_(grad)
        if grad:
            self.leaves.append(base)
        return base

    def const(self, values: torch.Tensor, layout: str = "contiguous") -> torch.Tensor:
        """values in the build dtype, no gradient."""
        return self.leaf(values, layout, grad=False)

    # ---- shorthands: draw and make an argument in one call

    def x(self, *shape: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        """A standard normal float input, times ``scale``, that requires grad."""
        return self.leaf(self.normal(*shape, scale=scale), grad=grad)

    def rand(self, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """A float tensor that needs no gradient, uniform in [low, high)."""
        return self.const(self.uniform(*shape, low=low, high=high))

    def probs(self, *shape: int, grad: bool = False) -> torch.Tensor:
        """Probabilities along the last dimension (a softmax of normal draws)."""
        return self.leaf(self.normal(*shape).softmax(-1), grad=grad)

    def sign(self, *shape: int) -> torch.Tensor:
        """-1 or 1, as floats."""
        return self.const(torch.randint(0, 2, shape, generator=self.gen).double() * 2 - 1)
