"""Handlers of the contrastive branch: the image-prototype bank's log line (the trainer itself updates the bank)."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events

from scripts.prototypes import PrototypeBank

__all__ = ["PrototypeBankLogger"]

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
