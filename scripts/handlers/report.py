"""Progress and the end of a run: a line per epoch with the time left, a terminal progress bar, and one closing line a
person can act on (the best validation score and its file)."""

from __future__ import annotations

import logging
import os
import time

from ignite.engine import Engine, Events

from scripts.errors import ConfigError
from scripts.networks.weights import TRAIN_FIRST

__all__ = ["TrainingSummary", "ProgressLogger", "TerminalProgressBar", "require_checkpoint"]

logger = logging.getLogger(__name__)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class TrainingSummary:
    """Logs the progress after every epoch and prints the evaluator's best key metric and the checkpoint path when
    training completes.

    The epoch line (``Epoch 3/24: iteration 150/1200, 2:10 elapsed, about 15:10 left``) extrapolates the time left
    from this run's speed so far, validation included, so a log file shows when a long run will end.

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
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self._start, self._first_iteration = time.perf_counter(), engine.state.iteration

    def _epoch_completed(self, engine: Engine) -> None:
        state = engine.state
        total = state.max_epochs * state.epoch_length
        steps = state.iteration - getattr(self, "_first_iteration", 0)
        elapsed = time.perf_counter() - getattr(self, "_start", time.perf_counter())
        line = f"Epoch {state.epoch}/{state.max_epochs}: iteration {state.iteration}/{total}, {_clock(elapsed)} elapsed"
        if steps > 0 and state.iteration < total:
            line += f", about {_clock(elapsed / steps * (total - state.iteration))} left"
        logger.info(line)

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


class TerminalProgressBar:
    """Ignite's ``ProgressBar`` (tqdm) on an engine, attached from a config; off unless ``enabled``.

    The bundle's configs enable it when standard error is a terminal (config key ``progress_bar``): a bar redrawn in
    place is what a person at a terminal wants, and noise in a log file, which gets the epoch lines of
    ``TrainingSummary`` instead.

    Args:
        enabled: attach the bar. Defaults to True.
        output_keys: keys of a trainer's output shown beside the bar (its ``engine.state.output`` is a one-item list
            of dicts, as in MONAI). Defaults to ``("loss",)``; empty for evaluators.
        desc: text before the bar. Defaults to None (Ignite's epoch counter only).
    """

    def __init__(self, enabled: bool = True, output_keys: tuple[str, ...] | list[str] = ("loss",),
                 desc: str | None = None):
        from scripts.config import as_bool

        self.enabled = as_bool(enabled, "progress_bar")
        self.output_keys = list(output_keys)
        self.desc = desc

    def _output(self, output) -> dict:
        item = output[0] if isinstance(output, (list, tuple)) and output else output
        return {k: item[k] for k in self.output_keys if isinstance(item, dict) and k in item}

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar

        bar = ProgressBar(persist=False, desc=self.desc) if self.desc else ProgressBar(persist=False)
        bar.attach(engine, output_transform=self._output if self.output_keys else None)


def require_checkpoint(path: str) -> str:
    """Returns ``path`` if the checkpoint exists, else stops with what to do."""
    if not os.path.isfile(path):
        raise ConfigError(f"Checkpoint '{path}' does not exist (config key 'ckpt_path'). "
                          + TRAIN_FIRST.format(key="ckpt_path"))
    return path
