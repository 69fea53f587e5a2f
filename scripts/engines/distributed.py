"""Training on several processes with ``torchrun``: the process group, the DDP network and the few collectives.

``bundle/configs/multi_gpu_train.json`` calls these; a single process never reaches a collective, because every
helper here does nothing when no process group is initialised. docs/scale.md says what is sharded and what is not.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scripts.errors import ConfigError
from scripts.handlers import BestMetricSaver, TrainingStateSaver, TrainingSummary

__all__ = ["init_distributed", "destroy_distributed", "is_distributed", "process_rank", "world_size",
           "main_process_first", "distributed_network", "unwrap_network", "main_process_handlers",
           "check_validation_shards", "all_reduce_sum_", "average_gradients_", "broadcast_state_", "all_processes_agree"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(backend: str, device: torch.device | str) -> torch.device:
    """Joins the process group that ``torchrun`` describes in the environment and selects this process's device.

    Args:
        backend: ``"nccl"`` for GPUs, ``"gloo"`` for CPUs (config key ``backend``).
        device: this process's device, ``cuda:<LOCAL_RANK>`` or ``cpu`` (config key ``device``).

    Returns:
        ``device``.

    Raises:
        ConfigError: the process was not started by ``torchrun`` (no ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``).
    """
    missing = [key for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing and not dist.is_initialized():
        raise ConfigError(
            f"bundle/configs/multi_gpu_train.json needs the process environment of torchrun ({', '.join(missing)} "
            "not set). Start it as: torchrun --nproc_per_node=N -m monai.bundle run training --config_file "
            "\"['bundle/configs/train.json','bundle/configs/multi_gpu_train.json']\", or drop multi_gpu_train.json "
            "to train in one process."
        )
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    logger.info("Process %d of %d on %s (backend %s).", dist.get_rank(), dist.get_world_size(), device, backend)
    return device


def destroy_distributed() -> None:
    """Leaves the process group, if any (config ``finalize``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_process_first(make: Callable[..., T], *args, **kwargs) -> T:
    """``make(*args, **kwargs)`` on rank 0 first, then on the other ranks, e.g. to generate the demo data once."""
    if is_distributed() and process_rank() > 0:
        dist.barrier()
    result = make(*args, **kwargs)
    if is_distributed() and process_rank() == 0:
        dist.barrier()
    return result


def distributed_network(network: nn.Module, device: torch.device | str, sync_batchnorm: bool = True,
                        find_unused_parameters: bool = False) -> nn.Module:
    """``network`` wrapped in ``DistributedDataParallel`` inside a process group, else ``network`` itself.

    DDP averages the network's gradients over processes in the backward pass and starts every process from rank
    0's weights. Code that needs the network's own methods (``parameter_groups``, ``out_channels``) reaches them
    through ``unwrap_network`` or ``.module``.

    Args:
        network: the network, already on ``device``.
        device: this process's device.
        sync_batchnorm: convert BatchNorm layers to ``SyncBatchNorm`` (statistics over the global batch). Only on
            CUDA: torch's SyncBatchNorm refuses CPU tensors, so on CPU each process normalises with its own batch.
            Defaults to True.
        find_unused_parameters: let DDP look for parameters that a step does not use (needed by the presets
            without contrast, whose projection head is idle). Defaults to False.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return network
    device = torch.device(device)
    if sync_batchnorm and device.type == "cuda":
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
    elif sync_batchnorm:
        logger.info("SyncBatchNorm needs CUDA; on %s each process's BatchNorm uses its own batch statistics.", device)
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_network(network: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, or ``network`` itself."""
    return network.module if isinstance(network, (DistributedDataParallel, nn.DataParallel)) else network


def main_process_handlers(handlers: Sequence) -> list:
    """All ``handlers`` on rank 0; on the other ranks only those that keep the training state in step.

    Left out on ranks above 0: the handlers that log, write files or report (MONAI's ``StatsHandler`` and
    ``TensorBoardStatsHandler``, the checkpoint savers, the closing summary, the prototype-bank log line, the
    TensorBoard overlays, the progress bar, and the inference report of unreadable input files, which every process
    found when it scanned the folder), so one process writes each file and each log line.
    """
    if process_rank() == 0:
        return list(handlers)
    from scripts.handlers import PrototypeBankLogger, TensorBoardOverlays, TerminalProgressBar
    from scripts.inference import InferenceInputs

    reporting = (StatsHandler, TensorBoardStatsHandler, BestMetricSaver, TrainingStateSaver, TrainingSummary,
                 PrototypeBankLogger, TensorBoardOverlays, TerminalProgressBar, InferenceInputs)
    return [handler for handler in handlers if not isinstance(handler, reporting)]


def check_validation_shards(images: int, section: str = "validation") -> None:
    """Stops when some process would get no image of ``section`` (each process takes its share of the set).

    Raises:
        ConfigError: fewer images than processes.
    """
    if images < world_size():
        raise ConfigError(
            f"The '{section}' set has {images} images, fewer than the {world_size()} processes, which take a "
            f"share each. Start fewer processes (--nproc_per_node) or add '{section}' images."
        )


def shard_sampler(dataset, section: str = "input"):
    """MONAI's ``DistributedSampler`` over ``dataset`` for evaluation or inference: process r takes items r, r + N,
    r + 2N, ... (no shuffling, no padding, so each item is done once).

    Raises:
        ConfigError: fewer items than processes (a process would have nothing to do, which Ignite refuses).
    """
    from monai.data import DistributedSampler

    check_validation_shards(len(dataset), section)
    return DistributedSampler(dataset, even_divisible=False, shuffle=False)


def process_share(items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` (items r, r + N, ...; all of them without a process group), e.g. the
    slides one process of a sharded whole-slide run segments."""
    return list(items)[process_rank()::world_size()]


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sums each tensor over all processes, in place (nothing without a process group)."""
    if is_distributed():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def average_gradients_(parameters: Iterable[nn.Parameter]) -> None:
    """Averages the gradients of parameters that DDP does not manage (the text prompts) over all processes.

    Every process must hold gradients for the same parameters (the same method preset guarantees it).
    """
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def broadcast_state_(module: nn.Module | None, buffers_only: bool = False) -> None:
    """Copies rank 0's parameters and buffers (only the buffers with ``buffers_only``) of ``module`` to every process."""
    if module is None or not is_distributed():
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def all_processes_agree(flag: bool, device: torch.device | str) -> bool:
    """True when ``flag`` is True on every process (``flag`` itself without a process group)."""
    if not is_distributed():
        return flag
    value = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value > 0)
