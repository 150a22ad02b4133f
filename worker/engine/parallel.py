"""How the trainer shares one step's work between ranks: one device, or data parallel over several.

`SingleDevice` is the trainer's default and does nothing (no copies, no collectives), so the one-device
path costs what it did before. `DataParallel` is one rank of a torch.distributed job (launched by
`worker.engine.distributed`): every rank draws the same global batch with the shared generator and
trains its own slice of it; DistributedDataParallel averages the gradients, so every rank clips and
judges the same synchronized gradients; the loss is averaged here. Every decision the trainer takes
from these values (skip, rollback, lr cut, failure) is therefore the same on every rank, and the
few host-side flags that are not (a stop request, which only rank 0 hears) go through `agree`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class SingleDevice:
    """The whole batch on one device: every method is the identity."""

    rank = 0
    world_size = 1
    is_primary = True

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch."""
        return slice(0, batch_size)

    def micro_step(self, model: nn.Module, final: bool) -> AbstractContextManager[Any]:
        """Context of one micro-batch's backward (gradient synchronization is DDP's business)."""
        return nullcontext()

    def average(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a rank-local value (device tensor)."""
        return value

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is True on any (host flag)."""
        return flag

    def from_primary(self, flag: bool) -> bool:
        """Rank 0's value of a host flag, on every rank."""
        return flag

    def gather_rows(self, values: torch.Tensor, chunks: int) -> torch.Tensor:
        """Every rank's per-row values in the global batch's row order (host tensor).

        `values` holds `chunks` equal micro-batch slices one after the other."""
        return values.cpu()

    def gather_objects(self, obj: Any) -> list[Any]:
        """`obj` of every rank, by rank."""
        return [obj]


class DataParallel(SingleDevice):
    """Rank `rank` of `world_size` in an initialized default process group.

    Collectives on device tensors use the default group (NCCL on GPUs, gloo on CPU); host flags and
    objects go through a gloo group of their own, so they never wait on a GPU stream."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.is_primary = rank == 0
        self.device = device
        self.host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers are constants in these models (batchnorm is refused across devices): broadcasting
        # them before every forward would be a collective for nothing.
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    def rows(self, batch_size: int) -> slice:
        share = batch_size // self.world_size  # the spec requires divisibility
        return slice(self.rank * share, (self.rank + 1) * share)

    def micro_step(self, model: nn.Module, final: bool) -> AbstractContextManager[Any]:
        # Only the window's last backward all-reduces: earlier micro-batches accumulate locally.
        assert isinstance(model, DistributedDataParallel)
        return nullcontext() if final else model.no_sync()

    def average(self, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def agree(self, flag: bool) -> bool:
        box = torch.tensor([int(flag)])
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(box.item())

    def from_primary(self, flag: bool) -> bool:
        box = torch.tensor([int(flag)])
        dist.broadcast(box, src=0, group=self.host_group)
        return bool(box.item())

    def gather_rows(self, values: torch.Tensor, chunks: int) -> torch.Tensor:
        local = values.detach().float().cpu()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.host_group)
        # [rank, micro-batch, row] -> [micro-batch, rank, row]: the order one process would have drawn
        return torch.stack(parts).view(self.world_size, chunks, -1).transpose(0, 1).reshape(-1)

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.host_group)
        return out
