"""The processes of one rsp train run under torchrun (which sets WORLD_SIZE and RANK).

Every rank holds the data, draws the same global batch and trains on its slice; gradients are averaged once
per step. Rank 0 alone reads and writes the run folder and decides for every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import ConfigError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for, but no CUDA device is available (use --device cpu or auto)")
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(name)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls, device: torch.device) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def from_main(self, values: list, device: torch.device) -> list:
        """Rank 0's values, on every rank (picklable objects)."""
        if self.world <= 1:
            return values
        import torch.distributed as dist

        box = list(values)
        dist.broadcast_object_list(box, 0, device=device if device.type == "cuda" else None)
        return box

    def average_gradients(self, model: nn.Module) -> None:
        """Average gradients over ranks (what DDP does), once per step over one flat buffer.

        rsp does not wrap the model in DistributedDataParallel: attacks run many forward/backward passes
        w.r.t. inputs between optimizer steps, which DDP's reducer would try to synchronise.
        """
        import torch.distributed as dist

        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        for b in model.buffers():  # BatchNorm statistics follow rank 0, as DDP's broadcast_buffers
            if b.dtype.is_floating_point or b.dtype == torch.int64:
                dist.broadcast(b, 0)
