"""The polynomial learning-rate decay of the method, in closed form so a resumed run can be extended."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["PolyLR"]


class PolyLR(LRScheduler):
    """``lr = base_lr * (1 - t / total_iters) ** power``, stepped once per iteration (UniMatch's schedule).

    Unlike ``torch.optim.lr_scheduler.PolynomialLR``, which multiplies the previous rate by a factor, each rate is
    computed from the step count alone, and ``total_iters`` is the config's, not the checkpoint's: a run resumed
    with more iterations follows the schedule of a run planned that long from the start, instead of staying at
    the rate 0 its old end reached.

    Args:
        optimizer: the optimizer whose parameter groups' rates are set.
        total_iters: steps until the rate reaches 0 (the run's total iterations).
        power: the decay exponent. Defaults to 0.9.
        last_epoch: index of the last step taken, -1 for a new run. Defaults to -1.

    Examples::

        scheduler = PolyLR(optimizer, total_iters=600, power=0.9)
        for batch in batches:
            ...
            optimizer.step()
            scheduler.step()
    """

    def __init__(self, optimizer: Optimizer, total_iters: int, power: float = 0.9, last_epoch: int = -1):
        if int(total_iters) <= 0:
            raise ValueError(f"PolyLR: total_iters must be positive, got {total_iters}.")
        self.total_iters = int(total_iters)
        self.power = float(power)
        super().__init__(optimizer, last_epoch)

    def _rates(self) -> list[float]:
        progress = min(max(self.last_epoch, 0), self.total_iters) / self.total_iters
        return [base * (1.0 - progress) ** self.power for base in self.base_lrs]

    def get_lr(self) -> list[float]:
        return self._rates()

    def load_state_dict(self, state_dict: dict) -> None:
        total, power = self.total_iters, self.power
        super().load_state_dict(state_dict)
        self.total_iters, self.power = total, power
        # The optimizer's restored rates belong to the saved schedule; set the ones this schedule gives.
        self._last_lr = self._rates()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr
