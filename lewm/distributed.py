"""DDP set-up for `lewm train` under torchrun: which rank this process is, and the process group.

A run started without torchrun (WORLD_SIZE unset or 1) is rank 0 of 1 and never touches
torch.distributed. The SIGReg statistic's all-reduce lives with its formula (lewm/sigreg.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """This process's place in the torchrun job (gloo on the CPU, NCCL on CUDA); Dist() alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(d: Dist) -> None:
    """Wait for every rank, then leave the process group (no-op in a single process)."""
    if d.world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
