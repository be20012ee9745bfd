"""losskit: loss functions for PyTorch, exact to torch.nn and keras.losses.

``losskit.functional`` mirrors ``torch.nn.functional``, ``losskit.nn`` mirrors the loss
Modules of ``torch.nn``, ``losskit.keras`` mirrors ``keras.losses`` on torch tensors, and
``losskit.info`` measures distributions; ``losskit.checks(mode)`` sets how input values
are checked (see :mod:`losskit._core.checks`). Importing losskit
loads torch and numpy only; the command line (``losskit``) loads the rest on demand.
"""

from . import functional, info, keras, nn
from ._core.checks import checks, checks_mode

__version__ = "0.1.0"

__all__ = ["__version__", "checks", "checks_mode", "functional", "info", "keras", "nn"]
