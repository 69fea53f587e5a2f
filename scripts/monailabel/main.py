"""The MONAI Label app of this bundle: gland suggestions in QuPath / the Digital Slide Archive, semi-supervised
retraining on the datastore, and active learning.

Start it from the repository root (see docs/monailabel.md)::

    PYTHONPATH=$PWD python -m monailabel.main start_server --app scripts/monailabel --studies /path/to/tiles \\
        --conf model_path models/model.pt

``--conf`` keys: ``bundle_root`` (default ``bundle``), ``model_path`` (the served ``model.pt``, default
``models/model.pt``, which ``train.json`` writes), ``device``, ``recipe`` (config files layered on ``train.json``
for retraining, comma-separated, e.g. ``bundle/configs/recipes/cpu.json``), ``train_overrides`` and
``infer_overrides`` (JSON objects of config keys), ``max_image_pixels`` (the largest tile, mask label or slide region
a request may make the server read, default 8192 x 8192), ``max_upload_mb`` (the largest request body, default 2048)
and ``keep_runs`` (training run folders kept, default 5). What the server refuses from clients, and why, is in
``scripts/monailabel/guard.py`` and docs/security.md.
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
from PIL import Image  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import DefaultLabelTag  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402
from monailabel.utils.others.pathology import create_asap_annotations_xml, create_dsa_annotations_json  # noqa: E402

from scripts.errors import ConfigError, RunError  # noqa: E402
from scripts.monailabel import guard  # noqa: E402
from scripts.monailabel.activelearning import MODEL_KEY, SCORE_KEY, EntropyScoring, EntropyStrategy  # noqa: E402
from scripts.monailabel.annotations import (TILE_SUFFIXES, LabelError, annotation_result, image_size, is_tile,  # noqa: E402
                                            mask_polygons, read_asap_polygons, read_label_mask)
from scripts.monailabel.infer import GlandInferTask, GlandPipeline, InputError  # noqa: E402
from scripts.monailabel.train import GlandTrainTask  # noqa: E402

logger = logging.getLogger(__name__)

MODEL = "gland"
EXTENSIONS = ["*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.bmp", "*.svs", "*.ndpi", "*.mrxs", "*.scn"]
# What clients may set in an image's info: the entropy score is a number, its model stamp a short string.
INFO_CHECKS = {SCORE_KEY: guard.finite_number, MODEL_KEY: guard.short_text}
INFO_RESERVED = ("name", "ts", "path")  # kept by the datastore itself


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


def _int_conf(conf: dict, key: str, default: int) -> int:
    text = conf.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise ConfigError(f"--conf {key} must be a positive whole number, got {text!r} (default {default}).")
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
    """The local datastore, with every client value checked before a file is written, read or removed.

    Image ids and label tags match ``guard.SAFE_NAME`` and every path stays inside the studies folder; uploads must be
    of the image / label types the app reads, tiles and mask labels are checked against the pixel cap from their
    header before decoding, a final label that does not fit its image is refused, an image that already has a final
    label is not replaced, and info that clients set cannot hold a non-numeric entropy score. Every refusal is a 4xx
    answer with the reason, and the upload's temporary file is removed in every case.

    Args:
        max_image_pixels: the largest tile or mask label, in pixels. Defaults to ``guard.DEFAULT_MAX_IMAGE_PIXELS``.
        Other arguments are ``LocalDatastore``'s.
    """

    IMAGE_SUFFIXES = tuple(pattern.lstrip("*") for pattern in EXTENSIONS)
    LABEL_SUFFIXES = (*TILE_SUFFIXES, ".xml")

    def __init__(self, *args, max_image_pixels: int = guard.DEFAULT_MAX_IMAGE_PIXELS, **kwargs):
        self.max_image_pixels = int(max_image_pixels)
        super().__init__(*args, **kwargs)

    def _inside(self, path: str) -> str:
        if not guard.inside(path, self._datastore_path):
            raise guard.RequestRefused(422, "The resolved path leaves the studies folder; refused.")
        return path

    def _known_image(self, image_id) -> str:
        guard.check_name(image_id, "image")
        if image_id not in self._datastore.objects:
            raise guard.RequestRefused(404, f"Image '{image_id}' is not in the datastore.")
        return image_id

    def add_image(self, image_id, image_filename, image_info):
        try:
            suffix = self._suffix(image_filename, self.IMAGE_SUFFIXES, "image")
            if not image_id:
                image_id = os.path.basename(image_filename)[: -len(suffix)]
            guard.check_name(image_id, "image")
            guard.check_info(image_info, INFO_CHECKS, INFO_RESERVED)
            if image_id in self._datastore.objects and image_id in self.get_labeled_images(DefaultLabelTag.FINAL.value):
                raise guard.RequestRefused(409, f"Image '{image_id}' already has a final label; upload the new image "
                                                "under another id, or remove the old one first.")
            if suffix in TILE_SUFFIXES:
                guard.check_pixels(image_filename, self.max_image_pixels, f"Image '{image_id}'")
            self._inside(os.path.join(self._datastore.image_path(), image_id + suffix))
            return super().add_image(image_id, image_filename, image_info)
        finally:
            guard.discard_upload(image_filename)

    def remove_image(self, image_id):
        self._known_image(image_id)
        path = self._inside(self.get_image_uri(image_id))
        if os.path.isdir(path) or os.path.islink(path):
            raise guard.RequestRefused(422, f"Image '{image_id}' is not a plain file; remove it on the server.")
        return super().remove_image(image_id)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        try:
            self._known_image(image_id)
            guard.check_name(label_tag, "tag")
            guard.check_info(label_info, {}, INFO_RESERVED)
            self._suffix(label_filename, self.LABEL_SUFFIXES, "label")
            self._inside(self._datastore.label_path(label_tag))
            if not str(label_filename).lower().endswith(".xml"):
                guard.check_pixels(label_filename, self.max_image_pixels, f"Label for '{image_id}'")
            image = self.get_image_uri(image_id)
            try:
                if is_tile(image):  # slides are not rasterised here; their XML is still read within its caps
                    height, width = image_size(image)
                    read_label_mask(label_filename, height, width, max_pixels=self.max_image_pixels)
                elif str(label_filename).lower().endswith(".xml"):
                    read_asap_polygons(label_filename)
            except LabelError as err:
                raise guard.RequestRefused(422, f"Label for '{image_id}' refused: {err}") from err
            return super().save_label(image_id, label_filename, label_tag, label_info)
        finally:
            guard.discard_upload(label_filename)

    def remove_label(self, label_id, label_tag):
        self._known_image(label_id)
        guard.check_name(label_tag, "tag")
        path = self.get_label_uri(label_id, label_tag)
        if not path:
            raise guard.RequestRefused(404, f"Image '{label_id}' has no label with tag '{label_tag}'.")
        self._inside(path)
        if os.path.isdir(path) or os.path.islink(path):
            raise guard.RequestRefused(422, f"Label '{label_id}' ({label_tag}) is not a plain file; remove it on the "
                                            "server.")
        return super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id, info):
        self._known_image(image_id)
        return super().update_image_info(image_id, guard.check_info(info, INFO_CHECKS, INFO_RESERVED))

    def update_label_info(self, label_id, label_tag, info):
        self._known_image(label_id)
        guard.check_name(label_tag, "tag")
        return super().update_label_info(label_id, label_tag, guard.check_info(info, {}, INFO_RESERVED))

    @staticmethod
    def _suffix(filename: str, allowed: tuple[str, ...], what: str) -> str:
        name = os.path.basename(str(filename)).lower()
        matches = [suffix for suffix in allowed if name.endswith(suffix)]
        if not matches:
            raise guard.RequestRefused(422, f"The uploaded {what} must be one of {sorted(set(allowed))}; got "
                                            f"'{os.path.basename(str(filename))[-40:]}'.")
        return max(matches, key=len)


class GlandApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.bundle_root = _resolve(conf.get("bundle_root", "bundle"))
        self.model_path = _resolve(conf.get("model_path", "models/model.pt"))
        self.max_image_pixels = _int_conf(conf, "max_image_pixels", guard.DEFAULT_MAX_IMAGE_PIXELS)
        self.max_upload_mb = _int_conf(conf, "max_upload_mb", guard.DEFAULT_MAX_UPLOAD_MB)
        # Pillow refuses to decode anything above twice this, whoever asks; requests are checked against it first.
        Image.MAX_IMAGE_PIXELS = self.max_image_pixels
        self.pipeline = GlandPipeline(self.bundle_root, self.model_path, conf.get("device"),
                                      _json_conf(conf, "infer_overrides"))
        recipes = [str(_resolve(p.strip())) for p in conf.get("recipe", "").split(",") if p.strip()]
        self.trainer = GlandTrainTask(self.bundle_root, self.model_path, overrides=_json_conf(conf, "train_overrides"),
                                      config_files=recipes, keep_runs=_int_conf(conf, "keep_runs", 5))
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
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
                                max_image_pixels=self.max_image_pixels)

    def init_infers(self):
        return {MODEL: GlandInferTask(self.pipeline)}

    def init_trainers(self):
        return {MODEL: self.trainer}

    def init_strategies(self):
        return {"entropy": EntropyStrategy(self.entropy_scoring), "random": Random()}

    def init_scoring_methods(self):
        return {"entropy": self.entropy_scoring}

    def on_init_complete(self):
        """In the server process: uploads in a private folder, request bodies capped, unused routes refused."""
        super().on_init_complete()
        guard.use_private_upload_dir()
        from monailabel.app import app as fastapi_app

        if not guard.install_request_guard(fastapi_app, self.max_upload_mb * 2**20, settings.MONAI_LABEL_API_STR):
            raise RuntimeError("The request guard could not be installed in front of MONAI Label's routes; this "
                               "MONAI Label / Starlette version is not supported (see requirements-monailabel.txt).")

    # ------------------------------------------------------------------------------------------- requests
    def _check_model(self, request: dict) -> None:
        _known("model", request.get("model"), self._infers)
        if not self.pipeline.available():
            raise HTTPException(status_code=409, detail=self.pipeline.missing_model())

    def _image_path(self, request: dict) -> str:
        """The file ``request['image']`` names: a datastore image or this request's upload, nothing else."""
        if request.get("save_label") not in (None, False) and guard.as_request_bool(request["save_label"], "save_label"):
            raise guard.RequestRefused(422, "'save_label' is refused: suggestions are never stored as labels; "
                                            "annotators submit labels with PUT /datastore/label.")
        if request.get("session") or request.get("session_id"):
            raise guard.RequestRefused(422, "Sessions are not used by this app: give an image id or upload the file.")
        image = request.get("image")
        if guard.is_upload(image):
            return image
        if not isinstance(image, str) or not image:
            raise guard.RequestRefused(422, "Give 'image' (an image id from /datastore) or upload the file.")
        if image not in self.datastore().list_images():
            shown = image if len(image) <= 80 else f"{image[:80]}..."
            raise guard.RequestRefused(404, f"Image '{shown}' is not in the datastore; give an image id from "
                                            "/datastore or upload the file.")
        return self.datastore().get_image_uri(image)

    @staticmethod
    def _options(request: dict) -> dict:
        """The request with the options this app reads checked and typed (``tta``, ``min_poly_area``)."""
        checked = {**request, "tta": guard.as_request_bool(request.get("tta", False), "tta"),
                   "min_poly_area": guard.as_number(request.get("min_poly_area") or 0, "min_poly_area", 0.0, 1e12)}
        for key in ("location", "size"):
            if request.get(key) is not None:
                checked[key] = [guard.as_int(v, key, 0, 10**7) for v in _pair(request[key], key)]
        return checked

    def _tile_request(self, request: dict) -> dict:
        path = self._image_path(request)
        if Path(path).suffix.lower() in TILE_SUFFIXES:
            guard.check_pixels(path, self.max_image_pixels)
        return {**self._options(request), "image": path}

    def infer(self, request, datastore=None):
        upload = request.get("image")
        try:
            request = self._tile_request(request)
            self._check_model(request)
            with _as_http_errors():
                return super().infer(request, datastore)
        finally:
            guard.discard_upload(upload)

    def infer_wsi(self, request, datastore=None):
        upload = request.get("image")
        try:
            path = self._image_path(request)
            request = self._options(request)
            self._check_model(request)
            slide = self._open_slide(path)
            if slide is None:  # a tile: the whole tile, polygons in its own coordinates
                request = {**request, "image": path, "location": [0, 0]}
                result = self.infer({**request, "result_write_to_file": False}, datastore)
                return self._annotations(request, [result["params"]])
            with slide:
                return self._infer_region(request, slide)
        finally:
            guard.discard_upload(upload)

    def _open_slide(self, path: str):
        from scripts.wsi.slide import open_slide

        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise HTTPException(status_code=404, detail=f"Image '{Path(path).name}' cannot be opened ({err.strerror}).") \
                from err
        try:
            slide = open_slide(path)
        except ConfigError:
            return None
        if slide.level_count == 1 and slide.level_shapes[0][0] * slide.level_shapes[0][1] <= self.max_image_pixels \
                and Path(path).suffix.lower() in TILE_SUFFIXES:
            slide.close()  # a plain (one-level) TIFF tile goes the tile path
            return None
        return slide

    def _infer_region(self, request: dict, slide) -> dict:
        """Segments one region of a slide as a whole: glands crossing tile borders stay one polygon."""
        from scripts.wsi.tissue import tissue_mask

        start = time.time()
        level = guard.as_int(request.get("level") or 0, "level", 0, 64)
        if level != 0:
            raise HTTPException(status_code=400, detail=f"Region requests are served at level 0 (full resolution, "
                                                        f"level-0 coordinates); got level {level}.")
        height, width = slide.level_shapes[level]
        x, y = request.get("location") or [0, 0]
        w, h = request.get("size") or [0, 0]
        min_area, tta = request["min_poly_area"], request["tta"]
        if w <= 0 or h <= 0:
            x, y, w, h = 0, 0, width, height
        w, h = min(w, width - x), min(h, height - y)
        if w <= 0 or h <= 0:
            raise HTTPException(status_code=400, detail=f"Region at {x}, {y} lies outside the {width} x {height} slide.")
        if w * h > self.max_image_pixels:
            raise guard.RequestRefused(413, f"Region {w} x {h} is larger than {self.max_image_pixels} pixels; select a "
                                            "smaller region, or segment the whole slide with inference_wsi.json "
                                            "(--conf max_image_pixels raises the limit).")
        with _as_http_errors():
            region = slide.read(level, y, x, h, w)
            mask = self.pipeline.segment(region, tta=tta)
        # The bundle's tissue detection, on an eighth of the region: no glands on glass.
        step = 8
        tissue, _ = tissue_mask(region[::step, ::step])
        tissue = tissue.repeat(step, 0).repeat(step, 1)[:h, :w]
        mask = mask * tissue
        polygons = mask_polygons(mask, offset=(x, y), min_area=min_area)
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


def _pair(value, key: str) -> list:
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise guard.RequestRefused(422, f"'{key}' is {value!r}; give two whole numbers [x, y].")
    return list(value[:2])
