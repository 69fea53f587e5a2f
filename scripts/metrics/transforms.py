"""The ground truth's objects for the object metrics, read from the mask file once per image."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.errors import ConfigError
from scripts.config import as_bool

from .gland_objects import instances

__all__ = ["GlandInstancesd"]


class GlandInstancesd(MapTransform):
    """Writes the instance map of each mask (1 x H x W, 0 = background, 1..N = glands) under a new key.

    Runs on the mask as read from its file, before it is turned into class indices, so that GlaS-style instance
    ids can be kept. How the mask's values are read is the data set's choice (config key ``instance_labels``):

    - ``instance_labels=True``: a mask with several foreground values is an instance map and its ids are kept
      (values at or below ``threshold`` are background); a mask with one foreground value, such as 0 / 255, is
      split into connected components;
    - ``instance_labels=False``: the objects are the connected components (8-connectivity) of
      ``mask > threshold``, the binary mask training uses. Grey-level or noisy masks (EBHI-SEG) need this: read
      as instance maps, every grey level would count as a gland of its own.

    Args:
        keys: the mask keys. Defaults to ``"label"``.
        names: the new keys, one per mask key. Defaults to ``"label_instances"``.
        instance_labels: see above (config key ``instance_labels``; ``"true"`` / ``"false"`` accepted too).
            Defaults to False.
        threshold: foreground is ``mask > threshold`` (config key ``label_threshold``). Defaults to 0.
        allow_missing_keys: skip absent keys instead of failing. Defaults to False.
    """

    def __init__(self, keys: KeysCollection = "label", names: str | Sequence[str] = "label_instances",
                 instance_labels: bool = False, threshold: float = 0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.names = [names] if isinstance(names, str) else list(names)
        if len(self.names) != len(self.keys):
            raise ConfigError(
                f"GlandInstancesd got {len(self.keys)} keys {list(self.keys)} but {len(self.names)} names "
                f"{self.names}; give one new name per mask key."
            )
        try:
            self.instance_labels = as_bool(instance_labels, "instance_labels")
        except ConfigError:
            raise ConfigError(
                f"Config key 'instance_labels' is {instance_labels!r}; use true (the mask's values are gland ids, "
                "as in GlaS) or false (glands are the connected components of mask > label_threshold)."
            ) from None
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key, name in self.key_iterator(d, self.names):
            mask = d[key]
            values = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            if values.ndim == 3:
                values = values[0]  # channel first; differing channels are refused by PrepareLabeld later
            if values.ndim != 2:
                raise ConfigError(f"Mask '{key}' has shape {tuple(values.shape)}; object metrics need 2D masks.")
            labels = torch.from_numpy(instances(values, self.threshold, self.instance_labels).astype(np.int32))[None]
            meta = dict(mask.meta) if isinstance(mask, MetaTensor) else {}
            d[name] = MetaTensor(labels, meta=meta)
        return d
