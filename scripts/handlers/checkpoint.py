"""Checkpoint handlers that write atomically (temporary file, then rename), resume a run, and load trained weights.

MONAI's ``CheckpointSaver`` writes in place, so a run killed mid-write can leave a truncated ``model.pt``
behind; these handlers never expose a partial file, and the previous good checkpoint stays until the new
one is complete. The best-metric record travels in the training checkpoint, so a resumed run keeps the best
model of the epochs before the interruption instead of overwriting it with its first validation.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.config import as_bool
from scripts.errors import ConfigError
from scripts.files import atomic_path
from scripts.networks.weights import load_trained_weights, read_checkpoint

__all__ = ["save_atomically", "BestMetricSaver", "TrainingStateSaver", "ResumeFromCheckpoint", "TrainedWeightsLoader",
           "RandomState"]

logger = logging.getLogger(__name__)


def _state_of(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def _unwrap(obj: Any) -> Any:
    return obj.module if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else obj


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Deletes temporary files a killed ``save_atomically`` left beside ``path`` (the run lock makes them stale)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        logger.warning("Removing %s, left by a run killed while writing %s.", stale, path.name)
        stale.unlink(missing_ok=True)


def save_atomically(objects: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Saves the state dicts of ``objects`` to ``path`` through a temporary file in the same folder."""
    payload = {name: _state_of(_unwrap(obj)) for name, obj in objects.items() if obj is not None}
    with atomic_path(path, suffix=".tmp", fsync=True) as tmp:  # ".<name>.<pid>.partial.tmp"
        torch.save(payload, tmp)


class BestMetricSaver:
    """Saves ``save_dict`` whenever the evaluator's key metric improves (attach to the evaluator).

    Its record (best value and epoch) is checkpointable (``state_dict`` / ``load_state_dict``): put it in the
    training checkpoint so a resumed run compares against the best of the whole run. Loading the record also
    sets the evaluator's ``best_metric`` / ``best_metric_epoch``, which the end-of-training summary reports.

    Args:
        save_dir: output folder.
        save_dict: objects to save, e.g. ``{"model": network}``.
        filename: file name in ``save_dir``. Defaults to ``"model.pt"``.
        metric_name: metric to watch. Defaults to the evaluator's key metric.
    """

    def __init__(self, save_dir: str, save_dict: Mapping[str, Any], filename: str = "model.pt", metric_name: str | None = None):
        self.path = Path(save_dir) / filename
        self.save_dict = save_dict
        self.metric_name = metric_name
        self.best = -float("inf")
        self.best_epoch = -1
        self._engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        remove_stale_temporaries(self.path)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise KeyError(f"BestMetricSaver: metric '{name}' is not among {sorted(engine.state.metrics)}.")
        value = float(engine.state.metrics[name])
        if value > self.best:
            self.best, self.best_epoch = value, int(engine.state.epoch)
            save_atomically(self.save_dict, self.path)
            logger.info("New best %s %.4f: saved %s", name, value, self.path)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        if self._engine is not None and self.best_epoch >= 0:
            self._engine.state.best_metric = self.best
            self._engine.state.best_metric_epoch = self.best_epoch


class TrainingStateSaver:
    """Saves the full training state (network, optimizer, scheduler, trainer) every ``interval`` epochs.

    The engine it is attached to is saved as ``"trainer"`` (so the config needs no circular reference to it).

    Args:
        save_dir: output folder.
        save_dict: objects to save besides the trainer, e.g. network, optimizer and scheduler.
        filename: file name in ``save_dir``. Defaults to ``"checkpoint.pt"``.
        interval: epochs between saves. Defaults to 1.
    """

    def __init__(self, save_dir: str, save_dict: Mapping[str, Any], filename: str = "checkpoint.pt", interval: int = 1):
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.interval = interval

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        remove_stale_temporaries(self.path)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        save_atomically(self.save_dict, self.path)


class ResumeFromCheckpoint:
    """Loads a ``TrainingStateSaver`` file when the trainer starts, if ``enabled`` and the file exists.

    The engine it is attached to is restored from ``"trainer"``, so epoch and iteration carry on. The file is read
    with ``weights_only=True``. The config's run length wins over the saved one: a longer run carries on to its
    new end (a ``PolyLR`` schedule follows), a run shorter than the epochs already finished is refused, and so is
    a different epoch length (another batch size or ``epoch_iterations``), which would misplace every later step.

    Args:
        path: the checkpoint file.
        load_dict: objects to restore besides the trainer, with the names they were saved under.
        enabled: whether to resume at all (config key ``resume``). Defaults to True.
        optional: names in ``load_dict`` that files written by older versions may lack (they keep their fresh
            state, with a warning). Defaults to ``("best_metric",)``.
    """

    def __init__(self, path: str, load_dict: Mapping[str, Any], enabled: bool = True,
                 optional: tuple[str, ...] = ("best_metric",)):
        self.path = Path(path)
        self.load_dict = dict(load_dict)
        self.enabled = as_bool(enabled, "resume")
        self.optional = tuple(optional)

    def attach(self, engine: Engine) -> None:
        self.load_dict["trainer"] = engine
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled or not self.path.is_file():
            return
        remedy = ("Delete it to start afresh, or set 'resume' to false (--resume false) to train from the start and "
                  "overwrite it.")
        state = read_checkpoint(self.path, "resume", remedy)
        objects = {name: obj for name, obj in self.load_dict.items() if obj is not None}
        missing = sorted(set(objects) - set(state) - set(self.optional))
        if missing:
            raise ConfigError(f"Checkpoint '{self.path}' lacks {missing}, which this config trains. {remedy}")
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        saved = state["trainer"]
        if int(saved.get("epoch_length", epoch_length)) != epoch_length:
            raise ConfigError(
                f"Checkpoint '{self.path}' was written with {saved['epoch_length']} iterations an epoch; this config "
                f"gives {epoch_length} (batch sizes, data, the number of processes or 'epoch_iterations' changed). Resume with the settings "
                f"of that run, or set 'resume' to false to start afresh."
            )
        done = int(saved["iteration"]) // epoch_length
        if done > max_epochs:
            raise ConfigError(
                f"Checkpoint '{self.path}' has finished {done} epochs, more than the {max_epochs} this config trains "
                f"('num_epochs' / 'num_iterations'). Ask for at least {done} epochs ({done * epoch_length} "
                "iterations) to carry on, or set 'resume' to false to start afresh."
            )
        for name, obj in objects.items():
            if name in state:
                _unwrap(obj).load_state_dict(state[name])
            else:
                logger.warning("Checkpoint %s has no '%s' record (written by an older version); it starts afresh.",
                               self.path, name)
        # The saved trainer state carries the old run's length; the config's value wins.
        engine.state.max_epochs = max_epochs
        if int(saved.get("max_epochs", max_epochs)) != max_epochs:
            logger.info("The run now trains %d epochs (%d iterations) instead of %s.", max_epochs,
                        max_epochs * epoch_length, saved["max_epochs"])
        logger.info("Resumed from %s at epoch %d, iteration %d", self.path, engine.state.epoch, engine.state.iteration)


class TrainedWeightsLoader:
    """Loads a trained ``model.pt`` strictly into ``network`` when the engine starts (evaluation and inference).

    Like MONAI's ``CheckpointLoader``, but every failure (a missing, truncated, corrupt or foreign file, weights of
    another network shape) stops with an error that names the file and what to do.

    Args:
        path: the checkpoint file.
        network: the network the config builds.
        key: the config key that named ``path``, for the error messages. Defaults to ``"ckpt_path"``.
    """

    def __init__(self, path: str, network: torch.nn.Module, key: str = "ckpt_path"):
        self.path = path
        self.network = network
        self.key = key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        load_trained_weights(_unwrap(self.network), self.path, self.key)
        logger.info("Loaded trained weights from %s", self.path)


class RandomState:
    """The torch, numpy and python random states as a checkpointable object (``state_dict`` / ``load_state_dict``).

    The trainer also re-seeds everything at each epoch start, so resuming from an end-of-epoch checkpoint is exact
    either way; the snapshot documents the state and restores it for code that draws outside the epochs.
    """

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos),
            "numpy_gauss": [int(has_gauss), float(gauss)],
            "python": [list(random.getstate()[1]), random.getstate()[0]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        has_gauss, gauss = state["numpy_gauss"]
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss))
        internal, version = state["python"]
        random.setstate((version, tuple(internal), None))
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
