"""Checkpoint handlers that write atomically (temporary file, then rename) and resume a run.

MONAI's ``CheckpointSaver`` writes in place, so a run killed mid-write can leave a truncated ``model.pt``
behind; these handlers never expose a partial file, and the previous good checkpoint stays until the new
one is complete.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events

from scripts.config import as_bool

__all__ = ["save_atomically", "BestMetricSaver", "TrainingStateSaver", "ResumeFromCheckpoint"]

logger = logging.getLogger(__name__)


def _state_of(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def _unwrap(obj: Any) -> Any:
    return obj.module if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else obj


def save_atomically(objects: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Saves the state dicts of ``objects`` to ``path`` through a temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {name: _state_of(_unwrap(obj)) for name, obj in objects.items() if obj is not None}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class BestMetricSaver:
    """Saves ``save_dict`` whenever the evaluator's key metric improves (attach to the evaluator).

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

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise KeyError(f"BestMetricSaver: metric '{name}' is not among {sorted(engine.state.metrics)}.")
        value = float(engine.state.metrics[name])
        if value > self.best:
            self.best = value
            save_atomically(self.save_dict, self.path)
            logger.info("New best %s %.4f: saved %s", name, value, self.path)


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
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        save_atomically(self.save_dict, self.path)


class ResumeFromCheckpoint:
    """Loads a ``TrainingStateSaver`` file when the trainer starts, if ``enabled`` and the file exists.

    The engine it is attached to is restored from ``"trainer"``, so epoch and iteration carry on.

    Args:
        path: the checkpoint file.
        load_dict: objects to restore besides the trainer, with the names they were saved under.
        enabled: whether to resume at all (config key ``resume``). Defaults to True.
    """

    def __init__(self, path: str, load_dict: Mapping[str, Any], enabled: bool = True):
        self.path = Path(path)
        self.load_dict = dict(load_dict)
        self.enabled = as_bool(enabled, "resume")

    def attach(self, engine: Engine) -> None:
        self.load_dict["trainer"] = engine
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled or not self.path.is_file():
            return
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        self.load_dict = {name: obj for name, obj in self.load_dict.items() if obj is not None}
        missing = sorted(set(self.load_dict) - set(state))
        if missing:
            raise KeyError(f"Checkpoint '{self.path}' lacks {missing}; delete it or set 'resume' to false.")
        max_epochs = engine.state.max_epochs
        for name, obj in self.load_dict.items():
            _unwrap(obj).load_state_dict(state[name])
        # The saved trainer state carries the old run's length; the config's value wins.
        engine.state.max_epochs = max_epochs
        logger.info("Resumed from %s at epoch %d, iteration %d", self.path, engine.state.epoch, engine.state.iteration)
