"""Process group, ranks and seeds: the same for plain python, torchrun, one node or many."""

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only process that writes files and logs."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_single_process_env():
    """Let `python trainer.py` (no torchrun) run as a world of one."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def init_distributed() -> DistInfo:
    _default_single_process_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def shutdown_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def agree_on_seed(seed, info: DistInfo) -> int:
    """The run's seed: the given one, or one drawn on rank 0 and shared so that every rank agrees."""
    if seed is not None:
        return seed
    box = [int.from_bytes(os.urandom(4), "little") if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_seed(seed: int, rank: int) -> int:
    """A different, reproducible seed for each rank (noise and augmentation must differ across ranks)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
