"""Distributed data parallel under ``torchrun``: process group set-up and the few collectives the loop needs."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cellcls.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(strategy: str, device: torch.device) -> DistEnv:
    """Join the process group ``torchrun`` describes (NCCL on GPUs, gloo on the CPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "none" or world == 1:
        if strategy == "ddp" and world == 1:
            log.warning("trainer.strategy=ddp outside torchrun (WORLD_SIZE unset): training in one process")
        return DistEnv()
    if strategy not in ("auto", "ddp"):
        raise ConfigError(f"trainer.strategy={strategy!r} is not valid; allowed values: auto, ddp, none")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over all processes (a no-op alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's value of ``flag`` on every process, so all take the same branch."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([int(flag)])
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_run_dir(path: str) -> str:
    """Hydra's run folder for this process: ``path`` on rank 0; a throw-away folder on the other ranks,
    which write nothing, so a torchrun job has one run folder."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        return path
    return os.path.join(tempfile.gettempdir(), f"cellcls-rank{rank}-{os.getpid()}")
