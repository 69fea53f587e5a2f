"""Handlers of the contrastive branch: the image-prototype bank's log line and the random-state snapshot."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.prototypes import PrototypeBank

__all__ = ["PrototypeBankLogger", "RandomState"]

logger = logging.getLogger(__name__)


class PrototypeBankLogger:
    """Logs the image-prototype bank's statistics every ``log_interval`` iterations (the trainer updates the bank).

    Args:
        bank: the ``PrototypeBank`` the trainer reads and updates.
        log_interval: iterations between log lines of prototype statistics. Defaults to 50.
    """

    def __init__(self, bank: PrototypeBank, log_interval: int = 50):
        self.bank = bank
        self.log_interval = log_interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.log_interval and engine.state.iteration % self.log_interval == 0:
            stats = self.bank.statistics()
            engine.state.prototype_stats = stats
            logger.info("Image prototypes at iteration %d: %s", engine.state.iteration,
                        ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))


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
