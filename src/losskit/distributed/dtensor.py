"""cross_entropy of a DTensor sharded on the class dimension, without gathering it.

losskit.functional.cross_entropy sends such a DTensor here (torch's ``loss_parallel()``
does the same for torch's loss, without label smoothing or the z-loss/softcap options).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

__all__ = ["is_class_sharded", "class_sharded_cross_entropy"]


def is_class_sharded(input: Tensor) -> bool:
    """Whether ``input`` is a DTensor with its class dimension sharded. Free when DTensor
    is not in use: a DTensor exists only once torch.distributed.tensor is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or not isinstance(input, module.DTensor):
        return False
    class_dim = 0 if input.dim() == 1 else 1
    return any(isinstance(p, module.Shard) and p.dim == class_dim for p in input.placements)


def class_sharded_cross_entropy(input: Tensor, target: Any, fn: str, weight: Any, options: Any) -> Tensor:
    """The vocabulary-parallel loss of the local shard: a plain tensor, the same on every
    rank of the mesh, whose gradient reaches ``input`` as a DTensor sharded like it."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from .vocab_parallel import sharded_cross_entropy

    class_dim = 0 if input.dim() == 1 else 1
    mesh = input.device_mesh
    if mesh.ndim != 1 or not isinstance(input.placements[0], Shard):
        raise NotImplementedError(
            f"{fn}: a DTensor input must be sharded on its class dimension over a 1-D device mesh; got placements "
            f"{input.placements} on a {mesh.ndim}-D mesh"
        )
    if isinstance(target, DTensor):
        if not all(isinstance(p, Replicate) for p in target.placements):
            raise NotImplementedError(f"{fn}: a DTensor target must be replicated; got {target.placements}")
        target = target.to_local()
    if target.is_floating_point():
        raise NotImplementedError(f"{fn}: class-probability targets of a class-sharded DTensor are not supported")
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    _, offset = compute_local_shape_and_global_offset(input.shape, mesh, input.placements)
    return sharded_cross_entropy(
        input.to_local(), target, mesh.get_group(0), int(offset[class_dim]), int(input.shape[class_dim]), weight,
        options,
    )
