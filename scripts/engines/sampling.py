"""Samplers that shuffle reproducibly per epoch and shard across processes under torch.distributed."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["epoch_sampler", "RepeatedSampler"]


def _replicas() -> tuple[int, int]:
    distributed = dist.is_available() and dist.is_initialized()
    return (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)


class RepeatedSampler(DistributedSampler):
    """A data set's indices repeated to ``length`` draws, shuffled per ``set_epoch`` and sharded like its parent.

    This is UniMatch's oversampling of the labeled set: with 9 labeled and 68 unlabeled images, one pass of the
    labeled loader is as long as one of the unlabeled loader, instead of ending (and being rebuilt) every few
    iterations. A pass is made of whole shuffled rounds of the data set (each round an independent permutation)
    cut to ``length``, so every index appears ``floor`` or ``ceil`` of ``length / len(dataset)`` times and no index
    is favoured from pass to pass. A ``length`` below ``len(dataset)`` is raised to it: no image is ever left out.

    Args:
        dataset: the data set to draw from.
        length: draws per pass (at least ``len(dataset)`` are made).
        seed: shuffling seed. Defaults to 0.
        shuffle: shuffle the draws. Defaults to True.
        drop_last: drop the tail that does not divide among processes. Defaults to False.

    Examples::

        sampler = RepeatedSampler(labeled_dataset, length=len(unlabeled_dataset), seed=0)
        loader = DataLoader(labeled_dataset, batch_size=8, sampler=sampler, drop_last=True)
    """

    def __init__(self, dataset: Dataset, length: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        size = len(dataset)
        if size == 0:
            raise ValueError("RepeatedSampler needs a non-empty data set.")
        if length <= 0:
            raise ValueError(f"RepeatedSampler length={length} must be positive.")
        replicas, rank = _replicas()
        super().__init__(range(max(int(length), size)), num_replicas=replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.dataset_size = size

    def __iter__(self) -> Iterator[int]:
        length, size = len(self.dataset), self.dataset_size
        rounds = -(-length // size)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.cat([torch.randperm(size, generator=generator) for _ in range(rounds)])[:length].tolist()
        else:
            order = [i % size for i in range(length)]
        if not self.drop_last:  # pad so that every process gets the same number of draws
            order += order[: self.total_size - len(order)]
        else:
            order = order[: self.total_size]
        return iter(order[self.rank:self.total_size:self.num_replicas])


def epoch_sampler(dataset: Dataset, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                  length: int | None = None) -> DistributedSampler:
    """A ``DistributedSampler`` whose order depends only on ``(seed, set_epoch(...))``.

    In a single process it covers the whole data set (one replica); under ``torch.distributed`` each rank gets its
    shard. The trainer calls ``set_epoch`` at every epoch and pass, so the order is reproducible on resume.

    Args:
        dataset: the data set to draw from.
        seed: shuffling seed. Defaults to 0.
        shuffle: shuffle per ``set_epoch``. Defaults to True.
        drop_last: drop the tail that does not divide among processes. Defaults to False.
        length: repeat the indices to this many draws per pass (``RepeatedSampler``), or None for one of each.
            Defaults to None.
    """
    if length is not None:
        return RepeatedSampler(dataset, length, seed=seed, shuffle=shuffle, drop_last=drop_last)
    replicas, rank = _replicas()
    return DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
