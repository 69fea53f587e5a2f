"""Active learning for the ``gland`` model: which unlabeled tile should a pathologist label next?

``EntropyScoring`` (MONAI Label scoring method ``entropy``) segments each unlabeled tile with flip test-time
augmentation and records the mean binary entropy of the averaged gland probability in the datastore's image info
(``gland_entropy``, with the ``model.pt`` it was computed with). ``EntropyStrategy`` (strategy ``entropy``) returns
the unlabeled tile the current model is least sure of, scoring tiles that have no score for the current model first.
MONAI Label's own ``random`` strategy stays available.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from scripts.monailabel.annotations import is_tile
from scripts.monailabel.infer import GlandPipeline, InputError

__all__ = ["EntropyScoring", "EntropyStrategy", "mean_entropy"]

logger = logging.getLogger(__name__)

SCORE_KEY = "gland_entropy"
MODEL_KEY = "gland_entropy_model"


def mean_entropy(probabilities: torch.Tensor) -> float:
    """Mean per-pixel entropy (in bits, 0..log2 C) of softmax probabilities C x H x W."""
    p = probabilities.clamp_min(1e-8)
    return float(-(p * p.log2()).sum(0).mean())


def _model_stamp(pipeline: GlandPipeline) -> str:
    stat = pipeline.model_path.stat()
    return f"{stat.st_mtime_ns}:{stat.st_size}"


def _unlabeled_tiles(datastore: Datastore) -> list[str]:
    labelled = set(datastore.get_labeled_images(label_tag=DefaultLabelTag.FINAL.value))
    return [i for i in sorted(datastore.list_images()) if i not in labelled and is_tile(datastore.get_image_uri(i))]


def _stored_score(value) -> float | None:
    """A score read back from the datastore, or None if it is not a finite number (the datastore file is shared)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class EntropyScoring(ScoringMethod):
    """Scores every unlabeled tile that has no score for the current model (flip-TTA entropy)."""

    def __init__(self, pipeline: GlandPipeline):
        super().__init__("Mean flip-TTA prediction entropy of each unlabeled tile (higher: label it sooner)")
        self.pipeline = pipeline

    def score(self, datastore: Datastore, image_ids: list[str], force: bool = False) -> dict[str, float]:
        if not self.pipeline.available():
            raise FileNotFoundError(self.pipeline.missing_model())
        stamp = _model_stamp(self.pipeline)
        scores = {}
        for image_id in image_ids:
            info = datastore.get_image_info(image_id)
            if not force and info.get(MODEL_KEY) == stamp and SCORE_KEY in info:
                stored = _stored_score(info[SCORE_KEY])
                if stored is not None:
                    scores[image_id] = stored
                    continue
                logger.warning("Tile %s has a stored '%s' that is not a number (%r); scoring it again.", image_id,
                               SCORE_KEY, info[SCORE_KEY])
            try:
                probabilities = self.pipeline.probabilities(datastore.get_image_uri(image_id), tta=True)
            except InputError as err:
                logger.warning("Not scored: %s", err)
                continue
            value = mean_entropy(probabilities)
            datastore.update_image_info(image_id, {SCORE_KEY: value, MODEL_KEY: stamp})
            scores[image_id] = value
        return scores

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        start = time.time()
        tiles = _unlabeled_tiles(datastore)
        force = str(request.get("force", False)).lower() in ("1", "true", "yes")
        scores = self.score(datastore, tiles, force=force)
        logger.info("Scored %d unlabeled tiles in %.1f s", len(scores), time.time() - start)
        return {"method": "entropy", "scored": len(scores), "scores": scores, "seconds": round(time.time() - start, 2)}


class EntropyStrategy(Strategy):
    """The unlabeled tile with the highest ``gland_entropy`` under the current model."""

    def __init__(self, scoring: EntropyScoring):
        super().__init__("Unlabeled tile the model is least sure of (mean flip-TTA entropy)")
        self.scoring = scoring

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        tiles = _unlabeled_tiles(datastore)
        if not tiles:
            return {}
        scores = self.scoring.score(datastore, tiles)
        if not scores:
            return {}
        image_id = max(sorted(scores), key=lambda i: scores[i])
        value = scores[image_id]
        logger.info("Next tile to label: %s (entropy %.4f bits, %d candidates)", image_id, value, len(scores))
        return {"id": image_id, "entropy": value, "candidates": len(scores)}
