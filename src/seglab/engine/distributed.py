"""Multi-process training on torch.distributed, as torchrun launches it.

``torchrun --nproc_per_node N -m seglab train ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`init_distributed` reads them once and joins the process group (gloo on
CPU, NCCL on CUDA) with a timeout, so a rank that dies takes the job down instead of leaving
the others waiting forever. Without torchrun everything here is a no-op for one process.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from seglab.errors import SeglabError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, logs and plots."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun described (idempotent); one process without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        try:
            timeout = timedelta(seconds=timeout_s)
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
            # torchrun keeps one store across elastic restarts: without keys of its own, a restarted
            # worker can read the address a dead worker of the last attempt left there, and fail
            # to connect ("Connection refused")
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"seglab/attempt_{attempt}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        except (RuntimeError, ValueError) as e:
            raise SeglabError(
                f"could not join the torch.distributed group (rank {rank} of {world}): "
                f"{str(e).splitlines()[0]}; check --rdzv-endpoint / MASTER_ADDR and that every "
                "node runs the same command"
            ) from None
    return DistInfo(rank, world, local_rank)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank. DDP sends them at the start of each
    forward pass, so after the last training step each rank still holds its own: validating or saving
    then would mix models."""
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def gather_objects(items: list) -> list:
    """Every rank's ``items`` (picklable, from this process's own code), concatenated in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(items)
    gathered: list[list] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def cleanup() -> None:
    """Leave the process group and free it while the interpreter is whole.

    destroy_process_group only forgets the group: gloo's worker threads stop when its last reference
    goes, and DistributedDataParallel sits in a reference cycle that holds one. Left to interpreter
    exit, a worker still holding a finished collective's tensor takes the GIL during finalization
    and the rank dies of SIGABRT after its work is done (1 two-node run in 12 did)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # the cycle goes now, and with it the group's threads
