"""The application's MONAI Deploy operators: thin ports around the plain classes of ``compute.py``.

One image travels through the graph per tick of the loader, so a folder of any length is processed in constant
memory. Importing this module needs the MONAI Deploy App SDK (``scripts/deploy/app/requirements.txt``).
"""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from .compute import ImageFolderLoader, MaskWriter, TiledOnnxSegmenter

__all__ = ["LoadImagesOperator", "OnnxSegmentationOperator", "WriteMasksOperator"]


class LoadImagesOperator(Operator):
    """Emits the next image of ``loader`` on its ``image`` port each time it runs; an unreadable one emits nothing.

    Run it with a ``CountCondition`` of ``len(loader.paths)``.
    """

    def __init__(self, fragment: Fragment, *args, loader: ImageFolderLoader, **kwargs):
        self.loader = loader
        self._next = 0
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("image")

    def compute(self, op_input, op_output, context):
        path = self.loader.paths[self._next]
        self._next += 1
        image = self.loader.load(path)
        if image is not None:
            op_output.emit(image, "image")


class OnnxSegmentationOperator(Operator):
    """Receives an image on ``image`` and emits it on ``image`` with its class indices on ``pred``."""

    def __init__(self, fragment: Fragment, *args, segmenter: TiledOnnxSegmenter, **kwargs):
        self.segmenter = segmenter
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("image")
        spec.output("image")
        spec.output("pred")

    def compute(self, op_input, op_output, context):
        image = op_input.receive("image")
        op_output.emit(image, "image")
        op_output.emit(self.segmenter(image), "pred")


class WriteMasksOperator(Operator):
    """Writes the mask received on ``pred`` under the name of the image received on ``image``."""

    def __init__(self, fragment: Fragment, *args, writer: MaskWriter, **kwargs):
        self.writer = writer
        self.written = []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("image")
        spec.input("pred")

    def compute(self, op_input, op_output, context):
        self.written.append(self.writer(op_input.receive("image"), op_input.receive("pred")))
