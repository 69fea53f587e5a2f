"""The MONAI Label app of this bundle: gland suggestions in QuPath / the Digital Slide Archive, semi-supervised
retraining on the datastore, and active learning.

Start it from the repository root (see docs/monailabel.md)::

    PYTHONPATH=$PWD python -m monailabel.main start_server --app scripts/monailabel --studies /path/to/tiles \\
        --conf model_path models/model.pt

``--conf`` keys: ``bundle_root`` (default ``bundle``), ``model_path`` (the served ``model.pt``, default
``models/model.pt``, which ``train.json`` writes), ``device``, ``recipe`` (config files layered on ``train.json``
for retraining, comma-separated, e.g. ``bundle/configs/recipes/cpu.json``), ``train_overrides`` and
``infer_overrides`` (JSON objects of config keys).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # MONAI Label loads this file by path, in the server and in its task processes
    sys.path.insert(0, str(REPO))

from fastapi import HTTPException  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import DefaultLabelTag  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402
from monailabel.utils.others.pathology import create_asap_annotations_xml, create_dsa_annotations_json  # noqa: E402

from scripts.errors import ConfigError, RunError  # noqa: E402
from scripts.monailabel.activelearning import EntropyScoring, EntropyStrategy  # noqa: E402
from scripts.monailabel.annotations import (TILE_SUFFIXES, LabelError, annotation_result, image_size, is_tile,  # noqa: E402
                                            mask_polygons, read_label_mask)
from scripts.monailabel.infer import GlandInferTask, GlandPipeline, InputError  # noqa: E402
from scripts.monailabel.train import GlandTrainTask  # noqa: E402

logger = logging.getLogger(__name__)

MODEL = "gland"
EXTENSIONS = ["*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.bmp", "*.svs", "*.ndpi", "*.mrxs", "*.scn"]
MAX_REGION_PIXELS = 8192 * 8192


def _resolve(path: str) -> Path:
    path = Path(path)
    return path if path.is_absolute() else REPO / path


def _json_conf(conf: dict, key: str) -> dict:
    text = conf.get(key) or "{}"
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"--conf {key} must be a JSON object of config keys, got {text!r} ({err}).") from err
    if not isinstance(value, dict):
        raise ConfigError(f"--conf {key} must be a JSON object of config keys, got {text!r}.")
    return value


def _known(kind: str, name, served: dict) -> None:
    if name not in served:
        raise HTTPException(status_code=404, detail=f"Unknown {kind} '{name}'; this app has {sorted(served)}.")


@contextmanager
def _as_http_errors():
    """A client's mistake becomes a 4xx answer with the reason (MONAI Label would answer 500 for anything)."""
    try:
        yield
    except (InputError, LabelError) as err:  # an unreadable image; training with no label
        raise HTTPException(status_code=400, detail=str(err)) from err
    except RunError as err:  # damaged image data met while reading a slide region
        raise HTTPException(status_code=422, detail=str(err)) from err
    except (ConfigError, FileNotFoundError) as err:  # no trained model yet, or one that does not load
        raise HTTPException(status_code=409, detail=str(err)) from err


class CheckedDatastore(LocalDatastore):
    """The local datastore, refusing a final label that does not fit its image before it is stored."""

    def save_label(self, image_id, label_filename, label_tag, label_info):
        if label_tag == DefaultLabelTag.FINAL.value and image_id in self.list_images():
            image = self.get_image_uri(image_id)
            if is_tile(image):  # slides are not rasterised here
                try:
                    height, width = image_size(image)
                    read_label_mask(label_filename, height, width)
                except LabelError as err:
                    Path(label_filename).unlink(missing_ok=True)  # the upload's temporary copy: nothing is kept
                    raise HTTPException(status_code=422, detail=f"Label for '{image_id}' refused: {err}") from err
        return super().save_label(image_id, label_filename, label_tag, label_info)


class GlandApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.bundle_root = _resolve(conf.get("bundle_root", "bundle"))
        self.model_path = _resolve(conf.get("model_path", "models/model.pt"))
        self.pipeline = GlandPipeline(self.bundle_root, self.model_path, conf.get("device"),
                                      _json_conf(conf, "infer_overrides"))
        recipes = [str(_resolve(p.strip())) for p in conf.get("recipe", "").split(",") if p.strip()]
        self.trainer = GlandTrainTask(self.bundle_root, self.model_path, overrides=_json_conf(conf, "train_overrides"),
                                      config_files=recipes)
        self.entropy_scoring = EntropyScoring(self.pipeline)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="MPAMatch gland segmentation",
                         description="Gland segmentation of H&E tiles and slide regions, retrained semi-supervised "
                                     "(MPAMatch) on the datastore", version="1.0", labels=["gland"])
        # MONAI Label would re-score every tile in a new process after each training and sample request; the
        # entropy strategy scores on demand instead, with the model being served (scores remember it).
        self._auto_update_scoring = False

    def init_datastore(self):
        return CheckedDatastore(self.studies, extensions=EXTENSIONS,
                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self):
        return {MODEL: GlandInferTask(self.pipeline)}

    def init_trainers(self):
        return {MODEL: self.trainer}

    def init_strategies(self):
        return {"entropy": EntropyStrategy(self.entropy_scoring), "random": Random()}

    def init_scoring_methods(self):
        return {"entropy": self.entropy_scoring}

    # ------------------------------------------------------------------------------------------- requests
    def _check_model(self, request: dict) -> None:
        _known("model", request.get("model"), self._infers)
        if not self.pipeline.available():
            raise HTTPException(status_code=409, detail=self.pipeline.missing_model())

    def _check_image(self, request: dict) -> None:
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image) and image not in self.datastore().list_images():
            raise HTTPException(status_code=404, detail=f"Image '{image}' is not in the datastore ({self.studies}); "
                                                        "give an image id from /datastore or upload the file.")

    def infer(self, request, datastore=None):
        self._check_model(request)
        self._check_image(request)
        with _as_http_errors():
            return super().infer(request, datastore)

    def infer_wsi(self, request, datastore=None):
        self._check_model(request)
        self._check_image(request)
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            image = self.datastore().get_image_uri(image)
        slide = self._open_slide(image) if isinstance(image, str) else None
        if slide is None:  # a tile: the whole tile, polygons in its own coordinates
            request = {**request, "image": image, "location": [0, 0]} if isinstance(image, str) else request
            result = self.infer({**request, "result_write_to_file": False}, datastore)
            return self._annotations(request, [result["params"]])
        with slide:
            return self._infer_region(request, slide)

    @staticmethod
    def _open_slide(path: str):
        from scripts.wsi.slide import open_slide

        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise HTTPException(status_code=404, detail=f"Image '{path}' cannot be opened ({err}).") from err
        try:
            slide = open_slide(path)
        except ConfigError:
            return None
        if slide.level_count == 1 and slide.level_shapes[0][0] * slide.level_shapes[0][1] <= MAX_REGION_PIXELS \
                and Path(path).suffix.lower() in TILE_SUFFIXES:
            slide.close()  # a plain (one-level) TIFF tile goes the tile path
            return None
        return slide

    def _infer_region(self, request: dict, slide) -> dict:
        """Segments one region of a slide as a whole: glands crossing tile borders stay one polygon."""
        from scripts.wsi.tissue import tissue_mask

        start = time.time()
        level = int(request.get("level") or 0)
        if level != 0:
            raise HTTPException(status_code=400, detail=f"Region requests are served at level 0 (full resolution, "
                                                        f"level-0 coordinates); got level {level}.")
        height, width = slide.level_shapes[level]
        x, y = (int(v) for v in (request.get("location") or [0, 0])[:2])
        w, h = (int(v) for v in (request.get("size") or [0, 0])[:2])
        if w <= 0 or h <= 0:
            x, y, w, h = 0, 0, width, height
        w, h = min(w, width - x), min(h, height - y)
        if w <= 0 or h <= 0:
            raise HTTPException(status_code=400, detail=f"Region at {x}, {y} lies outside the {width} x {height} slide.")
        if w * h > MAX_REGION_PIXELS:
            raise HTTPException(status_code=400, detail=f"Region {w} x {h} is larger than {MAX_REGION_PIXELS} pixels; "
                                f"select a smaller region, or segment the whole slide with inference_wsi.json.")
        tta = str(request.get("tta", False)).lower() in ("1", "true", "yes")
        with _as_http_errors():
            region = slide.read(level, y, x, h, w)
            mask = self.pipeline.segment(region, tta=tta)
        # The bundle's tissue detection, on an eighth of the region: no glands on glass.
        step = 8
        tissue, _ = tissue_mask(region[::step, ::step])
        tissue = tissue.repeat(step, 0).repeat(step, 1)[:h, :w]
        mask = mask * tissue
        polygons = mask_polygons(mask, offset=(x, y), min_area=float(request.get("min_poly_area", 0) or 0))
        seconds = round(time.time() - start, 3)
        params = {"annotation": annotation_result(polygons),
                  "latencies": {"pre": 0.0, "infer": seconds, "post": 0.0, "total": seconds}}
        logger.info("Slide %s region %d,%d %dx%d at level %d: %d glands in %.1f s", slide.path, x, y, w, h, level,
                    len(polygons), seconds)
        return self._annotations({**request, "location": [x, y], "size": [w, h]}, [params])

    def _annotations(self, request: dict, tiles: list[dict]) -> dict:
        res_json = {
            "annotations": tiles, "name": f"MONAILabel Annotations - {MODEL} for {request.get('location')}",
            "description": self._infers[MODEL].description, "model": MODEL,
            "location": request.get("location"), "size": request.get("size"),
            "latencies": tiles[0].get("latencies", {}) if tiles else {},
        }
        output = request.get("output") or "dsa"
        if output == "asap":
            res_file, _ = create_asap_annotations_xml(res_json)
        elif output == "dsa":
            res_file, _ = create_dsa_annotations_json(res_json)
        else:
            res_file = None
        return {"file": res_file, "params": res_json}

    def train(self, request):
        _known("model", request.get("model"), self._trainers)
        with _as_http_errors():
            return super().train(request)

    def scoring(self, request, datastore=None):
        _known("scoring method", request.get("method"), self._scoring_methods)
        with _as_http_errors():
            return super().scoring(request, datastore)

    def next_sample(self, request):
        _known("strategy", request.get("strategy") or "random", self._strategies)
        with _as_http_errors():
            return super().next_sample(request)
