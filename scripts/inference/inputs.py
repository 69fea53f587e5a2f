"""Inference inputs: every image of a folder is opened first; unreadable ones are reported, the rest processed.
Images whose outputs would share a name are refused before any is opened."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ignite.engine import Engine, Events

from scripts.data.datalist import list_images
from scripts.data.images import read_image
from scripts.errors import ConfigError

from .outputs import check_output_names

__all__ = ["InferenceInputs", "scan_inputs"]

logger = logging.getLogger(__name__)


class InferenceInputs:
    """The readable images of an input folder (``items``) and those that could not be read (``failures``).

    Attach it to the inference engine as a handler: when the run completes it raises a ``ConfigError`` naming
    every failed file, so the process exits with a non-zero status after the readable images were segmented.
    """

    def __init__(self, items: list[dict], failures: list[str], source: str):
        self.items, self.failures, self.source = items, failures, source

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.failures:
            total = len(self.items) + len(self.failures)
            raise ConfigError(
                f"{len(self.failures)} of {total} images in '{self.source}' could not be read and were skipped "
                f"(the other {len(self.items)} were segmented):\n  " + "\n  ".join(self.failures)
                + "\nReplace or remove these files, then segment them again."
            )


def scan_inputs(input_dir: str | os.PathLike) -> InferenceInputs:
    """Opens every image of ``input_dir`` once; unreadable files, and images whose mode cannot be made RGB, are
    logged and kept for the final report.

    Raises:
        ConfigError: when two images would write the same outputs (``a.png`` and ``a.jpg``: ``a_mask.png``), or
            when no image can be read.
    """
    listed = list_images(input_dir)
    check_output_names([item["image"] for item in listed], str(Path(input_dir)))
    items, failures = [], []
    for item in listed:
        _, problem = read_image(item["image"], rgb=True)
        if problem is None:
            items.append(item)
        else:
            failures.append(problem)
            logger.error("%s; it is skipped and reported at the end.", problem)
    if not items:
        raise ConfigError(f"None of the images in '{input_dir}' could be read:\n  " + "\n  ".join(failures))
    return InferenceInputs(items, failures, str(Path(input_dir)))
