"""DTensor params (FSDP2's ``fully_shard``, tensor parallelism): what the backends need to step them.

Elementwise rules do not care how a tensor is sharded, so the fused kernel runs on the local shards
(``to_local()``) of the param, its grad and its state, when all of them are sharded alike. State is
created like the param (``zeros_like`` of a DTensor is a DTensor) and ``step`` stays a plain tensor,
as in torch.optim, so ``torch.distributed.checkpoint`` saves and reshards it. The for-loop and
foreach paths run torch ops on the DTensors themselves (DTensor's dispatch).

``torch.distributed.tensor`` is never imported here: it is slow to import, and no DTensor can exist
before someone else has imported it.
"""

from __future__ import annotations

import sys

import torch


def dtensor_type() -> type | None:
    """The DTensor class, or None while torch.distributed.tensor is not imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a :class:`torch.distributed.tensor.DTensor`."""
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors) -> bool:
    """Whether one of ``tensors`` is a DTensor."""
    cls = dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def shards_fit(p: torch.Tensor, g: torch.Tensor, state: dict, names: list[str], also=None) -> bool:
    """Whether a fused kernel may step DTensor ``p`` on its local shard: the grad and the state
    sharded like ``p``, the grad of its dtype and each state of its dtype or ``also`` (the
    group's ``state_dtype``), and every local shard contiguous (the kernel walks shards as flat
    arrays). Else its step takes foreach (torch ops through DTensor's dispatch, which
    redistributes what it must). The kernel stays the one the param's device takes."""
    states = [state[n] for n in names if n in state]
    for t in (g, *states):
        if not is_dtensor(t) or t.device_mesh != p.device_mesh or t.placements != p.placements:
            return False
        if t.shape != p.shape or not t.to_local().is_contiguous():
            return False
        if t.dtype != p.dtype and (t is g or t.dtype != also):
            return False
    return p.to_local().is_contiguous()


def local_shards(p: torch.Tensor, g: torch.Tensor, state: dict, names: list[str]):
    """``(param, grad, state)`` with each DTensor replaced by its local shard (no copy: the kernel
    writes through it); plain tensors are returned as they are."""
    if not is_dtensor(p):
        return p, g, state
    return p.to_local(), g.to_local(), {n: state[n].to_local() for n in names}


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather) for a DTensor; ``t`` itself otherwise."""
    return t.full_tensor() if is_dtensor(t) else t


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The full tensor ``t`` (the same on every rank) sharded as ``ref``; ``t`` for a plain ``ref``.

    Each rank keeps its own shard of its own copy: no communication.
    """
    if not is_dtensor(ref):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, ref.device_mesh, ref.placements, src_data_rank=None)
