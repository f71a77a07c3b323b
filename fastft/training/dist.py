"""Data-parallel helpers: the process group (DDP / FSDP2 under ``torchrun``) and the decoder layers FSDP2 shards."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self):
        if self.active:
            torch.distributed.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(t)
        return t

    def shard(self, items: list, *, pad: bool) -> list[tuple[object, float]]:
        """This rank's ``items[rank::world]`` as ``(item, 1.0)``; with ``pad`` (FSDP2, whose every
        forward is a collective) topped up with ``(items[0], 0.0)`` so every rank runs as many."""
        mine = [(x, 1.0) for x in items[self.rank :: self.world]]
        if pad and items:
            mine += [(items[0], 0.0)] * (-(-len(items) // self.world) - len(mine))
        return mine


def _init_dist() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        created = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created)


def _decoder_layers(hf_model):
    from ..patching.checkpointing import find_decoder_stacks

    stacks, _, _ = find_decoder_stacks(hf_model)
    return [layer for _, stack in stacks for layer in stack]
