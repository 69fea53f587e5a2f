"""Test-only hook for tests/test_distributed.py: every process dumps the state it trained when training completes.

A test adds ``"$probe.dump_state(@train#trainer, '<folder>')"`` (with ``"$import tests.distributed_probe as
probe"`` among its ``imports``) to the config's ``initialize`` list; each process then writes
``<folder>/rank<r>.pt`` with its network, optimizer, prototype bank and text prompts, its process id, its count
of skipped steps and the indices its samplers give for one fixed epoch. ``poison_loss`` makes one process's loss
non-finite at one iteration.
"""

import os
from pathlib import Path

import torch
from ignite.engine import Events

from scripts.engines import process_rank, unwrap_network

PROBE_EPOCH = 12345


def _shard(loader) -> list[int]:
    sampler = loader.sampler
    sampler.set_epoch(PROBE_EPOCH)
    return list(iter(sampler))


def dump_state(trainer, folder: str) -> None:
    """Arms the dump of this process's state at the end of training."""

    def dump(engine) -> None:
        state = {
            "pid": os.getpid(),
            "iteration": engine.state.iteration,
            "skipped_steps": engine.state.skipped_steps,
            "network": unwrap_network(trainer.network).state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "prototype_bank": trainer.prototype_bank.state_dict(),
            "text_prototypes": None if trainer.text_prototypes is None else trainer.text_prototypes.state_dict(),
            "shards": {name: _shard(loader) for name, loader in trainer._loaders().items()},
        }
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(folder) / f"rank{process_rank()}.pt")

    trainer.add_event_handler(Events.COMPLETED, dump)


def poison_loss(trainer, rank: int, iteration: int) -> None:
    """Makes the training logits of process ``rank`` NaN at ``iteration`` (1-based), so its loss is not finite."""

    def poison(module, inputs, output):
        if module.training and process_rank() == rank and trainer.state.iteration == iteration:
            return output * float("nan")
        return output

    unwrap_network(trainer.network).segmentation_head.register_forward_hook(poison)
