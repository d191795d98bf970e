"""Data-parallel helpers: gathering a tensor from every rank, with or without gradients.

Relational losses (RKD, PKT, SP, CC, CRD's in-batch negatives) compare the samples of a batch. Under data
parallelism "the batch" is one device's slice unless the features of all ranks are gathered first.
:func:`gather_with_grad` does that and keeps the autograd graph: its backward sums every rank's gradient for
the local slice, so after DDP averages the parameter gradients over the N ranks, N devices with batch B give
exactly the loss and gradients of one device with batch N x B.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) of every rank along dim 0, differentiably; ``x`` itself on one process.

    All ranks must pass the same shape (Lightning's samplers pad the last batch for that).
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` of every rank along dim 0 without a graph (for memory-bank updates)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
