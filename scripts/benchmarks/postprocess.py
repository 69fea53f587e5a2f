"""Choose gland post-processing on images you may tune on: sweep its settings over saved predictions.

    python -m scripts.benchmarks.postprocess --masks eval/masks --datalist datalist.json --section validation \
        [--min_sizes 0,100,400,1600] [--label_threshold 0] [--instance_labels true]

``--masks`` holds the predicted 0/255 masks of the section's images (``<image stem>_mask.png`` as inference
writes them, or ``<image stem>.png``). For every combination of ``min_object_size`` and ``fill_holes`` (and
``split_touching``) it prints the mean pixel Dice, object F1 and object Dice against the section's labels. Run it
on the validation section, never on the test images: the settings chosen go into ``inference.json`` /
``evaluate.json`` and the test figures must not have picked them.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import fire
import numpy as np
from PIL import Image

from scripts.config import as_bool
from scripts.errors import ConfigError
from scripts.inference.postprocess import postprocess_mask
from scripts.metrics import instances, object_dice, object_f1

__all__ = ["sweep"]


def _prediction(masks: Path, image: str) -> np.ndarray:
    stem = Path(image).stem
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (masks / name).is_file():
            return np.asarray(Image.open(masks / name)) > 0
    raise ConfigError(f"No predicted mask for '{image}' in '{masks}' (looked for {stem}_mask.png and {stem}.png).")


def sweep(masks: str, datalist: str, section: str = "validation", min_sizes: str = "0,100,400,1600",
          split_touching: str = "false", label_threshold: int = 0, instance_labels: bool | str = True) -> list[dict]:
    """Prints (and returns) mean pixel Dice, object F1 and object Dice for every post-processing setting.

    Args:
        masks: folder of the predicted 0/255 masks.
        datalist: the datalist JSON; its paths are relative to its folder.
        section: the section with labels to measure on. Defaults to ``"validation"``.
        min_sizes: comma-separated ``min_object_size`` values (pixels at the input's size). Defaults to
            ``"0,100,400,1600"``.
        split_touching: ``false``, ``true`` or ``both``. Defaults to ``"false"``.
        label_threshold: ground truth is ``label > label_threshold``. Defaults to 0.
        instance_labels: the labels are instance maps (GlaS). Defaults to True.
    """
    root = Path(datalist).expanduser().resolve().parent
    entries = json.loads(Path(datalist).read_text()).get(section)
    if not entries:
        raise ConfigError(f"Datalist '{datalist}' has no '{section}' section with images.")
    sizes = [int(v) for v in str(min_sizes).split(",")] if not isinstance(min_sizes, (tuple, list)) else list(min_sizes)
    splits = [False, True] if str(split_touching).lower() == "both" else [as_bool(split_touching, "split_touching")]
    instance_labels = as_bool(instance_labels, "instance_labels")
    pairs = []
    for entry in entries:
        truth = instances(np.asarray(Image.open(os.path.join(root, entry["label"]))), label_threshold, instance_labels)
        pairs.append((_prediction(Path(masks), entry["image"]), truth))
    rows = []
    for size, fill, split in itertools.product(sizes, [False, True], splits):
        scores = {"dice": [], "object_f1": [], "object_dice": []}
        for pred, truth in pairs:
            mask = postprocess_mask(pred.astype(np.uint8), min_object_size=size, fill_holes=fill, split_touching=split) > 0
            gland = truth > 0
            denominator = mask.sum() + gland.sum()
            scores["dice"].append(1.0 if denominator == 0 else 2.0 * (mask & gland).sum() / denominator)
            scores["object_f1"].append(object_f1(mask.astype(np.uint8), truth))
            scores["object_dice"].append(object_dice(mask.astype(np.uint8), truth))
        rows.append({"min_object_size": size, "fill_holes": fill, "split_touching": split,
                     **{k: float(np.mean(v)) for k, v in scores.items()}})
    print(f"{len(pairs)} images of section '{section}' of {datalist}")
    print("| min_object_size | fill_holes | split_touching | Dice | object F1 | object Dice |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['min_object_size']} | {row['fill_holes']} | {row['split_touching']} | {row['dice']:.4f} | "
              f"{row['object_f1']:.4f} | {row['object_dice']:.4f} |")
    return rows


def main() -> None:
    fire.Fire(lambda **kwargs: None if sweep(**kwargs) else None)


if __name__ == "__main__":
    from scripts.errors import install_excepthook

    install_excepthook()
    main()
