"""losskit: loss functions for PyTorch, exact to torch.nn and keras.losses.

``losskit.functional`` mirrors ``torch.nn.functional``, ``losskit.nn`` mirrors the loss
Modules of ``torch.nn``, ``losskit.keras`` mirrors ``keras.losses`` on torch tensors, and
``losskit.info`` measures distributions. Importing losskit
loads torch and numpy only; the command line (``losskit``) loads the rest on demand.
"""

from . import functional, info, keras, nn

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "info", "keras", "nn"]
