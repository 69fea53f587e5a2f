"""The evaluation report: a per-image CSV, a summary JSON (overall and per subset) and contour overlays."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image

from scripts.config import as_bool
from scripts.data.images import draw_overlay, read_rgb

__all__ = ["EvaluationReport", "TensorBoardOverlays"]

logger = logging.getLogger(__name__)

def _stats(values: Sequence[float]) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": float(np.mean(finite)) if finite else None,
        "std": float(np.std(finite)) if finite else None,
        "n": len(finite),
        "n_not_finite": len(values) - len(finite),
    }


def _mask(data: torch.Tensor) -> np.ndarray:
    """Class map of a one-hot (C x H x W) or single-channel prediction or label."""
    return (data.argmax(0) if data.shape[0] > 1 else data[0]).cpu().numpy()


class TensorBoardOverlays:
    """Writes contour overlays of the first validation images to TensorBoard after every validation.

    Each image appears under ``validation/<image name>`` with the prediction's contours in green and the ground
    truth's in yellow (as ``draw_overlay``), one step per validation (the trainer's epoch), so TensorBoard's slider
    shows how the masks change during training. Images are drawn from their files at their own size and shrunk to
    at most ``max_size`` pixels a side.

    Args:
        log_dir: TensorBoard folder (the trainer's ``output_dir``).
        max_images: how many validation images to show; 0 turns the overlays off. Defaults to 4.
        max_size: longest side of a written image. Defaults to 768.
    """

    def __init__(self, log_dir: str, max_images: int = 4, max_size: int = 768):
        self.log_dir = str(log_dir)
        self.max_images = int(max_images)
        self.max_size = int(max_size)
        if self.max_images < 0 or self.max_size < 16:
            raise ValueError(f"TensorBoardOverlays: max_images={max_images} must be >= 0 (config key "
                             f"'val_overlays') and max_size={max_size} >= 16.")
        self._writer = None
        self._images: list[tuple[str, np.ndarray]] = []

    def attach(self, engine: Engine) -> None:
        if self.max_images == 0:
            return
        engine.add_event_handler(Events.STARTED, lambda _: self._images.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            if len(self._images) >= self.max_images:
                return
            source = str(getattr(item["image"], "meta", {}).get("filename_or_obj", f"image_{len(self._images)}"))
            label = out.get("label")
            overlay = draw_overlay(read_rgb(source), _mask(out["pred"]), None if label is None else _mask(label))
            picture = Image.fromarray(overlay)
            picture.thumbnail((self.max_size, self.max_size))
            self._images.append((os.path.splitext(os.path.basename(source))[0], np.asarray(picture)))

    def _write(self, engine: Engine) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        for name, image in self._images:
            self._writer.add_image(f"validation/{name}", image, global_step=engine.state.epoch, dataformats="HWC")
        self._writer.flush()


class EvaluationReport:
    """Writes ``per_image.csv``, ``summary.json`` and, optionally, ``overlays/<name>_overlay.png``.

    Under torchrun (``multi_gpu_evaluate.json``) every process draws the overlays of its own images, and the first
    process writes one report of all images, in the data set's order, as one process would.

    Per-image values come from the evaluator's metric details (the metrics are computed once, by their
    handlers). Rows carry the datalist's grouping fields when present (``subset`` for GlaS testA / testB,
    ``class`` for EBHI-SEG, ``grade``, ``model``), and the summary gives mean, std and count overall and for each
    value of each grouping field.

    Args:
        output_dir: folder for the report.
        metric_names: metrics of the evaluator to report (each must keep its details).
        group_keys: datalist fields to group by. Defaults to ``("subset", "class", "grade", "model")``.
        overlays: write contour overlays. Defaults to True.
    """

    def __init__(self, output_dir: str, metric_names: Sequence[str],
                 group_keys: Sequence[str] = ("subset", "class", "grade", "model"), overlays: bool = True):
        self.output_dir = Path(output_dir)
        self.metric_names = list(metric_names)
        self.group_keys = list(group_keys)
        self.overlays = as_bool(overlays, "eval_overlays")
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        for item, out in zip(batch, output):
            source = str(getattr(item["image"], "meta", {}).get("filename_or_obj", f"image_{len(self.rows)}"))
            row = {"image": source}
            for key in self.group_keys:
                if key in item:
                    row[key] = str(item[key])
            self.rows.append(row)
            if self.overlays:
                pred = _mask(out["pred"])
                label = out.get("label")
                truth = None if label is None else _mask(label)
                rgb = read_rgb(source)
                folder = self.output_dir / "overlays"
                folder.mkdir(parents=True, exist_ok=True)
                stem = os.path.splitext(os.path.basename(source))[0]
                Image.fromarray(draw_overlay(rgb, pred, truth)).save(folder / f"{stem}_overlay.png")

    def _gathered_rows(self) -> tuple[list[dict], list[int]]:
        """Every process's rows, concatenated in process order (the order MONAI gathers metric details in), and
        the permutation that puts them back in the data set's order.

        Under torchrun the test set is split as ``multi_gpu_evaluate.json``'s ``DistributedSampler`` splits it (no
        shuffling, no padding): process r holds images r, r + N, r + 2N, ... With one process nothing moves.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.rows, list(range(len(self.rows)))
        shards: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shards, self.rows)
        offsets = np.cumsum([0] + [len(shard) for shard in shards])
        total, count = int(offsets[-1]), len(shards)
        order = [int(offsets[k % count]) + k // count for k in range(total)]
        return [row for shard in shards for row in shard], order

    def _write(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", {})
        rows, order = self._gathered_rows()
        for name in self.metric_names:
            values = details.get(name)
            if values is None:
                raise KeyError(f"EvaluationReport: metric '{name}' kept no per-image details (save_details).")
            values = torch.as_tensor(values).float().reshape(len(rows), -1).nanmean(dim=1)
            for row, value in zip(rows, values.tolist()):
                row[name] = value
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # the first process writes the report of all
        self.rows = [rows[i] for i in order]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        columns = ["image"] + [k for k in self.group_keys if any(k in r for r in self.rows)] + self.metric_names
        with open(self.output_dir / "per_image.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        summary: dict = {"n_images": len(self.rows), "overall": {m: _stats([r[m] for r in self.rows]) for m in self.metric_names}}
        for key in self.group_keys:
            groups = sorted({r[key] for r in self.rows if key in r})
            if groups:
                summary[f"by_{key}"] = {
                    g: {m: _stats([r[m] for r in self.rows if r.get(key) == g]) for m in self.metric_names} for g in groups
                }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("Evaluation report written to %s (%d images)", self.output_dir, len(self.rows))
