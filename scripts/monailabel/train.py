"""The MONAI Label train task ``gland``: this bundle's semi-supervised trainer over the datastore.

A MONAI Label datastore is MPAMatch's own setting: a few images a pathologist labelled and many without labels.
The task writes a datalist from it (final labels as ``training`` and ``validation``, every other tile as
``unlabeled``; ASAP XML labels are rasterised), runs ``train.json`` in a child process (its log lines are the
task's progress in ``GET /train``), and publishes the run's best ``model.pt`` atomically in place of the served one,
which the infer task then reloads. With no unlabeled tiles the ``supervised`` preset trains instead, and says so.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask
from PIL import Image

from scripts.files import atomic_path, write_text_atomically
from scripts.monailabel.guard import checked_train_request
from scripts.monailabel.annotations import LabelError, image_size, is_tile, read_label_mask
from scripts.networks import stored_record

__all__ = ["GlandTrainTask", "build_datalist"]

logger = logging.getLogger(__name__)

SEMI_SUPERVISED_MINIMUM = 4  # the unlabeled stream needs at least one batch ('unlabeled_batch_size' 4 by default)


def build_datalist(datastore: Datastore, folder: Path, validation_fraction: float = 0.2, seed: int = 0) -> dict:
    """The datalist of the datastore's tiles: labelled ones split into training / validation, the rest unlabeled.

    Labels are the ``final`` tag (what annotators submitted; the model's own ``original`` suggestions do not count).
    Every label is read, checked against its image's size and written as a 0 / 1 PNG under ``folder/labels``. Slides
    and unreadable files are listed in ``skipped`` with the reason, never dropped silently.
    """
    labelled_ids = set(datastore.get_labeled_images(label_tag=DefaultLabelTag.FINAL.value))
    labels_dir = folder / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    labelled, unlabeled, skipped = [], [], []
    for image_id in sorted(datastore.list_images()):
        image = datastore.get_image_uri(image_id)
        if not is_tile(image):
            skipped.append({"image": image, "reason": "not a single-page PNG / JPEG / TIFF / BMP tile (slides are "
                                                      "annotated and served, not trained on whole)"})
            continue
        if image_id not in labelled_ids:
            unlabeled.append({"image": image})
            continue
        label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL.value)
        try:
            height, width = image_size(image)
            mask = read_label_mask(label, height, width)
        except LabelError as err:
            skipped.append({"image": image, "label": label, "reason": str(err)})
            continue
        target = labels_dir / f"{image_id}.png"  # ids are single names: the datastore's files or checked uploads
        Image.fromarray(mask * 255).save(target)
        labelled.append({"image": image, "label": str(target)})
    rng = random.Random(seed)
    rng.shuffle(labelled)
    n_val = 0 if len(labelled) < 2 else max(1, int(round(validation_fraction * len(labelled))))
    validation, training = labelled[:n_val], labelled[n_val:]
    if len(labelled) == 1:
        # One label: it is trained on and validated on. The datalist check refuses one file in two sections, so
        # validation reads a copy (the log says so).
        entry = labelled[0]
        copy = folder / "validation" / Path(entry["image"]).name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry["image"], copy)
        validation = [{"image": str(copy), "label": entry["label"]}]
    return {"training": training, "validation": validation, "unlabeled": unlabeled, "skipped": skipped}


class GlandTrainTask(TrainTask):
    """Trains the bundle on the datastore and publishes the best model to ``model_path``.

    Args:
        bundle_root: the bundle folder (``configs/train.json``).
        model_path: the served ``model.pt`` the new model replaces.
        work_dir: where each run keeps its datalist, checkpoints and logs. Defaults to ``<model dir>/monailabel``.
        overrides: ``train.json`` keys every run gets (e.g. the CPU recipe's or a small network for a demo).
        config_files: extra config files layered on ``train.json`` (e.g. ``configs/recipes/cpu.json``).
        keep_runs: run folders kept in ``work_dir``, the newest ones; older ones are removed after each run.
            Defaults to 5.
    """

    def __init__(self, bundle_root: str | os.PathLike, model_path: str | os.PathLike, work_dir: str | os.PathLike | None = None,
                 overrides: dict | None = None, config_files: list[str] | None = None, keep_runs: int = 5,
                 description: str = "Semi-supervised MPAMatch training on the datastore's labelled and unlabeled tiles"):
        super().__init__(description)
        if int(keep_runs) < 1:
            raise ValueError(f"keep_runs must be at least 1, got {keep_runs}.")
        self.keep_runs = int(keep_runs)
        self.bundle_root = Path(bundle_root)
        self.model_path = Path(model_path)
        self.work_dir = Path(work_dir) if work_dir else self.model_path.parent / "monailabel"
        self.overrides = dict(overrides or {})
        self.config_files = [str(self.bundle_root / "configs" / "train.json"), *(config_files or [])]

    def config(self) -> dict[str, Any]:
        # 0 epochs / iterations: the run length of the config (train.json, or the recipe's iteration budget)
        return {"method": "mpamatch", "num_epochs": 0, "num_iterations": 0, "finetune": True, "validation_fraction": 0.2,
                "seed": 0}

    def stats(self) -> dict[str, Any]:
        path = self.work_dir / "last_run.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _command(self, datalist: Path, run_dir: Path, request: dict) -> tuple[list[str], str]:
        """The child's command line and its settings file. ``request`` is checked (``checked_train_request``): every
        value a client gave is a preset name, a number or a bool, never a string MONAI's parser would evaluate."""
        settings = {**self.overrides}
        method = request.get("method") or "mpamatch"
        settings["method"] = method
        settings["seed"] = request.get("seed", 0)
        if request.get("labeled_batch_size"):
            settings["labeled_batch_size"] = request["labeled_batch_size"]
        if (request.get("num_iterations") or 0) > 0:
            settings["num_iterations"] = request["num_iterations"]
        elif (request.get("num_epochs") or 0) > 0:  # epochs asked for: a recipe's iteration budget must not win
            settings["num_epochs"], settings["num_iterations"] = request["num_epochs"], None
        finetune = request.get("finetune", True)
        record = stored_record(self.model_path) if finetune and self.model_path.is_file() else None
        if record is not None:
            # Fine-tuning keeps the served network's shape: train.json builds it from init_weights' record. The class
            # count also sizes the data check and the prototypes, which train.json reads from num_classes.
            settings["init_weights"] = str(self.model_path)
            settings["num_classes"] = record["num_classes"]
        settings.update({"datalist": str(datalist), "ckpt_dir": str(run_dir / "models"),
                         "output_dir": str(run_dir / "runs"), "bundle_root": str(self.bundle_root), "resume": False})
        # The settings travel as a config file of their own (last, so they win): on the command line fire would
        # turn null / true / false inside values into strings.
        overrides = run_dir / "overrides.json"
        write_text_atomically(overrides, json.dumps(settings, indent=1))
        config = "[" + ",".join(f"'{path}'" for path in [*self.config_files, str(overrides)]) + "]"
        return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config], method

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        start = time.time()
        request = checked_train_request({**self.config(), **request}, strict=False)  # the server checked it strictly
        self.work_dir.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("run_%Y%m%d_%H%M%S_"), dir=self.work_dir))
        try:
            return self._run(request, datastore, run_dir, start)
        finally:
            self._remove_old_runs(keep=run_dir)

    def _remove_old_runs(self, keep: Path) -> None:
        """Keeps the newest ``keep_runs`` run folders (always ``keep``, the run that just ended)."""
        runs = sorted((p for p in self.work_dir.glob("run_*") if p.is_dir() and not p.is_symlink() and p != keep),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        for old in runs[max(0, self.keep_runs - 1):]:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("Removed the old training run %s (keep_runs %d)", old, self.keep_runs)

    def _run(self, request: dict, datastore: Datastore, run_dir: Path, start: float) -> dict[str, Any]:
        data = build_datalist(datastore, run_dir, request.get("validation_fraction", 0.2), request.get("seed", 0))
        for entry in data["skipped"]:
            logger.warning("Not trained on %s: %s", entry["image"], entry["reason"])
        if not data["training"] and not data["validation"]:
            raise LabelError("No tile in the datastore has a final label: submit at least one label "
                             "(PUT /datastore/label) before training.")
        if not data["training"]:
            data["training"] = list(data["validation"])
        if len(data["validation"]) == 1 and data["validation"] == data["training"]:
            logger.warning("Only one labelled tile: it is trained on and validated on; label more for a fair "
                           "model selection.")
        method = request.get("method") or "mpamatch"
        unlabeled_batch = int(self.overrides.get("unlabeled_batch_size", SEMI_SUPERVISED_MINIMUM))
        if method != "supervised" and len(data["unlabeled"]) < unlabeled_batch:
            logger.warning("The datastore has %d unlabeled tiles, fewer than one unlabeled batch (%d): training the "
                           "'supervised' preset instead of '%s'. Add unlabeled tiles to train semi-supervised.",
                           len(data["unlabeled"]), unlabeled_batch, method)
            request["method"] = "supervised"
        labeled_batch = request.get("labeled_batch_size") or int(self.overrides.get("labeled_batch_size", 4))
        if len(data["training"]) < labeled_batch:
            logger.info("Labelled batch size %d -> %d (the number of labelled training tiles).", labeled_batch,
                        len(data["training"]))
            request["labeled_batch_size"] = len(data["training"])
        datalist = run_dir / "datalist.json"
        write_text_atomically(datalist, json.dumps({k: data[k] for k in ("training", "validation", "unlabeled")},
                                                    indent=1))
        cmd, method = self._command(datalist, run_dir, request)
        logger.info("Training '%s' on %d labelled (%d validation) and %d unlabeled tiles in %s", method,
                    len(data["training"]), len(data["validation"]), len(data["unlabeled"]), run_dir)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(self.bundle_root.parent),
                                                                         os.environ.get("PYTHONPATH", "")]))}
        log_path = run_dir / "train.log"
        with subprocess.Popen(cmd, cwd=str(self.bundle_root.parent), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as process, open(log_path, "w") as log:
            for line in process.stdout:
                log.write(line)
                if " - INFO - " in line or "ERROR" in line or "Error" in line:
                    print(line.rstrip(), flush=True)  # the server shows the last lines in GET /train
        if process.returncode != 0:
            tail = log_path.read_text().strip().splitlines()[-5:]
            raise RuntimeError(f"Training failed (exit code {process.returncode}); see {log_path}. Last lines: "
                               + " | ".join(tail))
        best = run_dir / "models" / "model.pt"
        if not best.is_file():
            raise RuntimeError(f"Training finished without a model ({best}); see {log_path}.")
        with atomic_path(self.model_path, ".pt") as tmp:
            shutil.copyfile(best, tmp)
        summary = [line for line in log_path.read_text().splitlines() if "Training finished after" in line]
        stats = {
            "method": method, "run_dir": str(run_dir), "model": str(self.model_path),
            "labelled": len(data["training"]), "validation": len(data["validation"]),
            "unlabeled": len(data["unlabeled"]), "skipped": len(data["skipped"]),
            "seconds": round(time.time() - start, 1),
            "summary": summary[-1].split(" - INFO - ")[-1] if summary else None,
            "published": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_text_atomically(self.work_dir / "last_run.json", json.dumps(stats, indent=1))
        logger.info("Published %s: %s", self.model_path, stats["summary"])
        return stats
