"""A handler that ends training with one line a person can act on: the best validation score and its file."""

from __future__ import annotations

import logging
import os
import time

from ignite.engine import Engine, Events

from scripts.errors import ConfigError
from scripts.networks.checkpoint import TRAIN_FIRST

__all__ = ["TrainingSummary", "ProgressLogger", "require_checkpoint"]

logger = logging.getLogger(__name__)


class TrainingSummary:
    """Prints the evaluator's best key metric and the checkpoint path when training completes.

    Args:
        evaluator: the validation engine, whose ``state.best_metric`` MONAI keeps.
        checkpoint: path of the best-metric checkpoint.
        metric_label: how to name the metric in the line. Defaults to ``"Dice"``.
    """

    def __init__(self, evaluator: Engine, checkpoint: str, metric_label: str = "Dice"):
        self.evaluator = evaluator
        self.checkpoint = checkpoint
        self.metric_label = metric_label

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self._start, self._first_iteration = time.perf_counter(), engine.state.iteration

    def __call__(self, engine: Engine) -> None:
        state = self.evaluator.state
        best, epoch = getattr(state, "best_metric", -1), getattr(state, "best_metric_epoch", -1)
        message = (
            f"Training finished after {engine.state.epoch} epochs ({engine.state.iteration} iterations): "
            f"best validation {self.metric_label} {best:.4f} at epoch {epoch}; best model: {self.checkpoint}"
        )
        logger.info(message)
        print(message, flush=True)
        steps = engine.state.iteration - getattr(self, "_first_iteration", 0)
        if steps > 0 and hasattr(self, "_start"):
            import torch

            seconds = (time.perf_counter() - self._start) / steps
            speed = f"Training speed: {seconds:.3f} s/it over {steps} iterations of this run (validation included)"
            if torch.cuda.is_available():
                speed += f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
            logger.info(speed)
            print(speed, flush=True)


class ProgressLogger:
    """Logs ``<label> i/N images`` with the elapsed time after each iteration of an evaluation or inference run.

    Args:
        total: number of iterations expected (images, with batch size 1).
        label: the verb shown at the start of the line. Defaults to ``"Processed"``.
    """

    def __init__(self, total: int, label: str = "Processed"):
        self.total = total
        self.label = label
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        done = engine.state.iteration
        elapsed = time.perf_counter() - self._start
        logger.info("%s %d/%d images (%.1f s)", self.label, done, self.total, elapsed)


def require_checkpoint(path: str) -> str:
    """Returns ``path`` if the checkpoint exists, else stops with what to do."""
    if not os.path.isfile(path):
        raise ConfigError(f"Checkpoint '{path}' does not exist (config key 'ckpt_path'). "
                          + TRAIN_FIRST.format(key="ckpt_path"))
    return path
