"""The MONAI Deploy application: load every image of the input folder, segment it with the ONNX model, write masks.

Paths come from the SDK's options and variables: ``-i`` / ``HOLOSCAN_INPUT_PATH`` (folder of images),
``-o`` / ``HOLOSCAN_OUTPUT_PATH`` (mask folder), ``-m`` / ``HOLOSCAN_MODEL_PATH`` (``.onnx`` file or a folder
holding one). The segmentation is the bundle's ``inference.json`` (backend onnx); the ``inference`` section of the
YAML file named by ``HOLOSCAN_CONFIG_PATH`` (set inside a MAP), else of the ``app.yaml`` next to this module,
overrides its keys.
Importing this module needs the MONAI Deploy App SDK.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, init_app_context

from .compute import ImageFolderLoader, MaskWriter, TiledOnnxSegmenter
from .operators import LoadImagesOperator, OnnxSegmentationOperator, WriteMasksOperator

__all__ = ["GlandSegmentationApp", "APP_CONFIG", "main"]

APP_CONFIG = Path(__file__).resolve().parent / "app.yaml"

logger = logging.getLogger(__name__)


class GlandSegmentationApp(Application):
    """Image folder -> ``LoadImagesOperator`` -> ``OnnxSegmentationOperator`` -> ``WriteMasksOperator`` -> masks.

    After ``run()``, ``loader.report()`` raises a ``ConfigError`` naming any file that could not be read.

    Examples::

        app = GlandSegmentationApp(["app", "-i", "tiles/", "-o", "masks/", "-m", "model.onnx"])
        app.config(str(APP_CONFIG))
        app.run()
        app.loader.report()
    """

    name = "mpamatch_gland_segmentation"
    description = "Gland segmentation of pathology tiles with the exported UNI-TransUNet (ONNX Runtime)."
    version = str(yaml.safe_load(APP_CONFIG.read_text())["application"]["version"])  # one place: app.yaml

    def compose(self):
        context = init_app_context(self.argv)
        overrides = dict(self.kwargs("inference") or {})
        self.loader = ImageFolderLoader(context.input_path, overrides=overrides)
        segmenter = TiledOnnxSegmenter(context.model_path, overrides)
        logger.info("Segmenting %d images of %s with %s (%s) into %s", len(self.loader.paths), context.input_path,
                    segmenter.network.path, segmenter.network.session.get_providers()[0], context.output_path)
        load = LoadImagesOperator(self, CountCondition(self, len(self.loader.paths)), loader=self.loader,
                                  name="load_images")
        segment = OnnxSegmentationOperator(self, segmenter=segmenter, name="segment")
        self.writer = WriteMasksOperator(self, writer=MaskWriter(context.output_path, segmenter.num_classes),
                                         name="write_masks")
        self.add_flow(load, segment, {("image", "image")})
        self.add_flow(segment, self.writer, {("image", "image"), ("pred", "pred")})


def main(argv: list[str] | None = None) -> GlandSegmentationApp:
    """Runs the application on ``argv`` (default: the command line) and reports unreadable files at the end."""
    app = GlandSegmentationApp(argv)
    app.config(os.environ.get("HOLOSCAN_CONFIG_PATH") or str(APP_CONFIG))
    app.run()
    logger.info("Wrote %d masks", len(app.writer.written))
    app.loader.report()
    return app
