"""Samplers that shuffle reproducibly per epoch and shard across processes under torch.distributed."""

from __future__ import annotations

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["epoch_sampler"]


def epoch_sampler(dataset: Dataset, seed: int = 0, shuffle: bool = True, drop_last: bool = False) -> DistributedSampler:
    """A ``DistributedSampler`` whose order depends only on ``(seed, set_epoch(...))``.

    In a single process it covers the whole data set (one replica); under ``torch.distributed`` each rank gets its
    shard. The trainer calls ``set_epoch`` at every epoch and pass, so the order is reproducible on resume.
    """
    distributed = dist.is_available() and dist.is_initialized()
    replicas = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    return DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
