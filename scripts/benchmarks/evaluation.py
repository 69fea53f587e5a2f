"""Evaluation against inference: the metrics ``evaluate.json`` computes, timed beside segmenting the same images.

    python -m scripts.benchmarks.evaluation [--images 8] [--fragments 300] [--recipe bundle/configs/recipes/cpu.json]

Evaluation is inference plus metrics, so the figure that matters is what the metrics add. The script makes
``--images`` GlaS-size cases (775 x 522): a ground-truth instance map of about 20 glands and a prediction that
covers most of them, merges two, misses one and holds ``--fragments`` small false objects (the speckle of a weakly
trained model; GlaS predictions can hold hundreds). For each case it times

- **inference**: ``inference.json``'s sliding window over the image with its network (random weights; speed does
  not depend on them), ``--recipe`` keys on top, softmax and argmax included;
- **metrics**: every metric ``evaluate.json`` computes, through the same metric classes and the same MONAI
  calls: pixel Dice, IoU, HD95 and symmetric surface distance, GlaS object F1, object Dice and object Hausdorff.

and prints seconds per image and the ratio ``(inference + metrics) / inference`` (goal: at most 2).
"""

from __future__ import annotations

import os
import time

import fire

from scripts.paths import CONFIG_DIR

__all__ = ["main", "make_case"]

CONFIGS = str(CONFIG_DIR)


def make_case(seed: int, fragments: int, height: int = 522, width: int = 775):
    """(ground-truth instance map, predicted class map) of one synthetic GlaS-size image, as numpy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    truth = np.zeros((height, width), np.int32)
    glands = []
    while len(glands) < 20:
        cy, cx = rng.uniform(40, height - 40), rng.uniform(40, width - 40)
        ry, rx = rng.uniform(18, 45), rng.uniform(18, 45)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if (truth[inside] > 0).any():
            continue
        glands.append((cy, cx, ry, rx))
        truth[inside] = len(glands)
    pred = np.zeros((height, width), np.uint8)
    for i, (cy, cx, ry, rx) in enumerate(glands):
        if i == 0:
            continue  # one gland missed
        scale = 1.4 if i in (1, 2) else rng.uniform(0.85, 1.1)  # glands 1 and 2 grow and may merge
        pred[((yy - cy) / (ry * scale)) ** 2 + ((xx - cx) / (rx * scale)) ** 2 <= 1] = 1
    for _ in range(fragments):
        y, x, r = rng.integers(0, height), rng.integers(0, width), rng.uniform(1.5, 4)
        pred[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 1
    return truth, pred


def _metric_objects():
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDistanceMetric

    from scripts.metrics import GlandObjectMetric

    pixel = [DiceMetric(include_background=False), MeanIoU(include_background=False),
             HausdorffDistanceMetric(include_background=False, percentile=95),
             SurfaceDistanceMetric(include_background=False, symmetric=True)]
    objects = [GlandObjectMetric(name) for name in ("object_f1", "object_dice", "object_hausdorff")]
    return pixel, objects


def main(images: int = 8, fragments: int = 300, recipe: str | None = None, encoder_name: str | None = None) -> dict:
    """Prints per-image seconds of inference and of the metrics, and their ratio; returns the figures."""
    import numpy as np
    import torch
    from monai.bundle import ConfigParser

    from scripts.networks import config_settings, model_record

    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, "inference.json")] + ([recipe] if recipe else []))
    # the network asked for, with random weights: never the record of a trained models/model.pt
    record = model_record(**config_settings(parser, {"encoder_name": encoder_name}))
    parser["model_settings"] = record
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = parser.get_parsed_content("network_def").eval().to(device)
    inferer = parser.get_parsed_content("inferer")
    pixel, objects = _metric_objects()
    infer_s, pixel_s, object_s, counts = [], [], [], []
    for seed in range(images):
        truth, pred = make_case(seed, fragments)
        image = torch.rand(1, 3, *truth.shape, device=device)
        start = time.perf_counter()
        with torch.no_grad():
            classes = torch.softmax(inferer(image, network), dim=1).argmax(1).cpu()
        infer_s.append(time.perf_counter() - start)
        onehot_pred = torch.nn.functional.one_hot(torch.as_tensor(pred, dtype=torch.long), 2).permute(2, 0, 1)[None]
        onehot_truth = torch.nn.functional.one_hot(torch.as_tensor(truth > 0, dtype=torch.long), 2).permute(2, 0, 1)[None]
        start = time.perf_counter()
        for metric in pixel:
            metric(y_pred=onehot_pred.float(), y=onehot_truth.float())
        pixel_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for metric in objects:
            metric(y_pred=onehot_pred, y=torch.as_tensor(truth)[None, None])
        object_s.append(time.perf_counter() - start)
        from scripts.metrics import instances

        counts.append(int(instances(pred).max()))
        del classes
    figures = {
        "images": images, "size": "775x522", "predicted_objects": round(float(np.mean(counts))),
        "inference_s": round(float(np.median(infer_s)), 3), "pixel_metrics_s": round(float(np.median(pixel_s)), 3),
        "object_metrics_s": round(float(np.median(object_s)), 3),
    }
    figures["ratio"] = round((figures["inference_s"] + figures["pixel_metrics_s"] + figures["object_metrics_s"])
                             / figures["inference_s"], 2)
    threads = torch.get_num_threads()
    print(f"{images} images of 775 x 522, about {figures['predicted_objects']} predicted objects each; "
          f"{'CUDA' if torch.cuda.is_available() else f'CPU, {threads} torch threads'}; network "
          f"{record['encoder_name']}, window {record['roi_size']}, image scale {record['image_scale']}")
    print("| inference (s / image) | pixel metrics: Dice, IoU, HD95, ASD (s) | object metrics: F1, Dice, Hausdorff (s) "
          "| (inference + metrics) / inference |\n|---|---|---|---|")
    print(f"| {figures['inference_s']} | {figures['pixel_metrics_s']} | {figures['object_metrics_s']} | "
          f"{figures['ratio']} |")
    return figures


if __name__ == "__main__":
    from scripts.errors import install_excepthook

    install_excepthook()
    fire.Fire(main)
