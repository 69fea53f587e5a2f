"""Training engines: the semi-supervised trainer that runs every method preset, the presets, and multi-process helpers."""

from .averaging import WeightAverage
from .distributed import (all_processes_agree, all_reduce_sum_, average_gradients_, broadcast_state_,
                          check_validation_shards, destroy_distributed, distributed_network, init_distributed,
                          is_distributed, main_process_first, main_process_handlers, process_rank, process_share,
                          shard_sampler, unwrap_network, world_size)
from .lr import PolyLR
from .presets import METHOD_PRESETS, MethodConfig, resolve_method
from .semi_supervised import (SemiSupervisedTrainer, TrainingDivergedError, epoch_seed, gather_contrast_pixels,
                              training_schedule)
from .sampling import RepeatedSampler, epoch_sampler

__all__ = ["WeightAverage", "PolyLR", "METHOD_PRESETS", "MethodConfig", "resolve_method", "SemiSupervisedTrainer", "TrainingDivergedError",
           "epoch_seed", "epoch_sampler", "RepeatedSampler", "gather_contrast_pixels", "training_schedule",
           "init_distributed", "destroy_distributed", "is_distributed", "process_rank", "world_size",
           "main_process_first", "distributed_network", "unwrap_network", "main_process_handlers",
           "check_validation_shards", "shard_sampler", "process_share", "all_reduce_sum_", "average_gradients_", "broadcast_state_",
           "all_processes_agree"]
