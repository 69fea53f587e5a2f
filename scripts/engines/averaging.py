"""An exponential moving average of the network's weights, validated and saved in place of the live weights.

With few labeled images the live weights of a semi-supervised run swing from step to step: validation Dice on GlaS
moved by 0.1-0.2 between validations 25 iterations apart, so the "best" checkpoint was partly chance. The average
of the recent weights is smoother and is what validation scores, ``model.pt`` stores and evaluation and inference
load. Training itself is unchanged: the optimizer steps the live network, and the trainer folds each counted step
into the average (``SemiSupervisedTrainer(weight_average=...)``), so no handler can leave it stale.

``decay`` 0 (the default of ``train.json``) turns averaging off: ``network`` is then the live network itself.
"""

from __future__ import annotations

import copy

import torch

from scripts.engines.distributed import unwrap_network
from scripts.errors import ConfigError

__all__ = ["WeightAverage"]


class WeightAverage:
    """Keeps ``average = d * average + (1 - d) * live`` of every floating-point weight and buffer of ``network``.

    The decay warms up as ``d_t = min(decay, t / (10 + t))`` at the t-th update (t = 0, 1, ...): the first update
    copies the live weights, and the average follows the quickly changing weights of the first steps instead of
    remembering the random initialisation. Integer
    buffers (BatchNorm's batch counter) are copied.

    Args:
        network: the trained network (a DDP wrapper is unwrapped).
        decay: the averaging decay in [0, 1); 0 disables averaging. Config key ``ema_decay``.
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.0):
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema_decay={decay} must be in [0, 1): 0 turns weight averaging off, 0.99 averages over "
                              "about the last 100 steps.")
        self.decay = decay
        self.source = network
        self.updates = 0
        if self.enabled:
            self.network = copy.deepcopy(unwrap_network(network))
            self.network.requires_grad_(False)
            self.network.eval()
        else:
            self.network = unwrap_network(network)

    @property
    def enabled(self) -> bool:
        return self.decay > 0.0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        t = self.updates
        return min(self.decay, t / (10.0 + t))

    @torch.no_grad()
    def update(self) -> None:
        """Folds the live network's current weights into the average (a no-op when averaging is off)."""
        if not self.enabled:
            return
        decay = self.current_decay()
        live = unwrap_network(self.source).state_dict()
        for name, average in self.network.state_dict().items():
            value = live[name].detach()
            if average.is_floating_point():
                average.lerp_(value.to(average.dtype), 1.0 - decay)
            else:
                average.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        state = {"decay": self.decay, "updates": self.updates}
        if self.enabled:
            state["network"] = self.network.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores the average of a checkpoint; a checkpoint written without averaging starts it from the live weights."""
        if not self.enabled:
            return
        if "network" in state:
            self.network.load_state_dict(state["network"])
            self.updates = int(state.get("updates", 0))
        else:
            self.network.load_state_dict(unwrap_network(self.source).state_dict())
            self.updates = 0
