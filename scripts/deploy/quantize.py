"""int8 ONNX models for CPU servers: static quantisation calibrated on the user's own images, with its accuracy cost
measured against the float32 model and stored in the int8 model's record.

ONNX Runtime's static quantisation (``onnxruntime.quantization.quantize_static``, QDQ format) computes the scale of
every activation from calibration windows, here cut from the datalist's ``training`` and ``unlabeled`` images, read
and resized exactly as inference reads them. Only the convolutions and matrix products are quantised (weights int8
per output channel, activations uint8): they hold nearly all of the network's arithmetic, while quantising layer
norms, softmax and GELU costs accuracy and, between float operators, speed.

The int8 and float32 models then segment a labelled section (``test``, else ``validation``) through
``inference.json``'s pipeline (window, image scale, post-processing). Their Dice against the labels, the Dice lost
and the share of pixels on which the two masks agree go into the int8 model's record (the ONNX metadata entry
``scripts.networks.record.ONNX_RECORD_KEY``, under ``"int8"``); a loss above the user's threshold writes nothing.

Example::

    python -m scripts.cli export-onnx --ckpt models/model.pt --out models/model.onnx --int8 true \\
        --datalist data/glas/datalist.json
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from scripts.errors import ConfigError, RunError
from scripts.files import atomic_files

__all__ = ["export_int8", "quantize_onnx", "calibration_windows", "int8_accuracy", "mask_agreement", "mean_dice",
           "is_int8", "describe_int8", "INT8_RECORD_KEY", "QUANTIZED_OPS", "INT8_OP_TYPES", "CALIBRATION_SECTIONS"]

logger = logging.getLogger(__name__)

# Where the int8 figures sit in the model's record.
INT8_RECORD_KEY = "int8"
# Convolutions only by default: on GlaS (CPU recipe, 20 test images) quantising the ViT's matrix products as well
# lost 0.039 Dice, convolutions alone 0.004 (docs/benchmarks.md); ``--int8_ops Conv,MatMul,Gemm`` asks for all three.
QUANTIZED_OPS = ("Conv",)
INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")
CALIBRATION_SECTIONS = ("training", "unlabeled")
_EVAL_SECTIONS = ("test", "validation")
_CALIBRATION_BATCH = 8


def is_int8(metadata: Mapping[str, str]) -> bool:
    """Whether an ONNX model's metadata (``session.get_modelmeta().custom_metadata_map``) records an int8 model."""
    from scripts.networks.record import ONNX_RECORD_KEY

    text = metadata.get(ONNX_RECORD_KEY)
    return bool(text) and INT8_RECORD_KEY in json.loads(text)


def _sections(datalist: str | os.PathLike, wanted: Sequence[str], option: str) -> list[str]:
    """The sections of ``wanted`` that ``datalist`` holds; none of them is an error naming the file and option."""
    path = Path(datalist).expanduser()
    if not path.is_file():
        raise ConfigError(f"Datalist '{path}' (--datalist) does not exist; give the datalist JSON of your data.")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"Datalist '{path}' is not valid JSON: {err}. Fix the file and run again.") from err
    found = [name for name in wanted if isinstance(content, dict) and content.get(name)]
    if not found:
        held = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ConfigError(f"Datalist '{path}' has no non-empty section among {list(wanted)} ({option}); it holds "
                          f"{held}. Name its sections with {option}.")
    return found


def calibration_windows(images: Sequence[str | os.PathLike], preprocessing, roi_size: Sequence[int],
                        image_scale: float = 1.0, count: int = 64, seed: int = 0) -> list[np.ndarray]:
    """``count`` windows (each 3 x H x W float32) at random places of ``images``, as the network sees them.

    Every image is read with the inference ``preprocessing`` (loading, RGB, normalisation), resized by
    ``image_scale`` as ``ScaledInferer`` resizes it and padded with zeros up to the window, as the sliding window
    pads; the windows are spread evenly over up to ``count`` images chosen with ``seed``.
    """
    from scripts.inference.scale import rescale_image

    if count < 1:
        raise ConfigError(f"--int8_calibration_windows {count}: give 1 or more windows.")
    if not images:
        raise ConfigError("No calibration images: the datalist sections named for calibration are empty.")
    generator = np.random.default_rng(seed)
    chosen = [images[i] for i in generator.permutation(len(images))[:count]]
    height, width = (int(v) for v in roi_size)
    windows = []
    for index, image in enumerate(chosen):
        pixels = torch.as_tensor(preprocessing({"image": str(image)})["image"]).float()[None]
        pixels = rescale_image(pixels, float(image_scale))
        pixels = F.pad(pixels, (0, max(0, width - pixels.shape[-1]), 0, max(0, height - pixels.shape[-2])))
        per_image = count // len(chosen) + (index < count % len(chosen))
        for _ in range(per_image):
            top = int(generator.integers(0, pixels.shape[-2] - height + 1))
            left = int(generator.integers(0, pixels.shape[-1] - width + 1))
            windows.append(pixels[0, :, top:top + height, left:left + width].numpy().astype(np.float32))
    return windows


def quantize_onnx(float_path: str | os.PathLike, out: str | os.PathLike, windows: Sequence[np.ndarray],
                  per_channel: bool = True, op_types: Sequence[str] = QUANTIZED_OPS) -> Path:
    """Writes the int8 (QDQ) model of the float32 ONNX model ``float_path`` to ``out``, calibrated on ``windows``.

    Args:
        float_path: the float32 model (``scripts.deploy.export_onnx``); its metadata (the model's record) is kept.
        out: the int8 model's path (written directly; ``export_int8`` writes it atomically).
        windows: calibration inputs, each 3 x H x W float32 as the network sees them.
        per_channel: one weight scale per output channel. Defaults to True.
        op_types: the operators to quantise. Defaults to convolutions and matrix products.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if not windows:
        raise ConfigError("quantize_onnx needs at least one calibration window.")
    class WindowReader(CalibrationDataReader):
        """Feeds the windows to ONNX Runtime in batches."""

        def __init__(self, batches: list[dict]):
            self.batches = iter(batches)

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    input_name = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    reader = WindowReader([{input_name: np.stack(windows[i:i + _CALIBRATION_BATCH])}
                           for i in range(0, len(windows), _CALIBRATION_BATCH)])
    quantize_static(str(float_path), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types))
    source = {entry.key: entry.value for entry in onnx.load(str(float_path), load_external_data=False).metadata_props}
    _set_metadata(out, source)
    return Path(out)


def _set_metadata(path: str | os.PathLike, entries: Mapping[str, str]) -> None:
    """Adds (or replaces) metadata entries of the ONNX model at ``path``."""
    import onnx

    model = onnx.load(str(path))
    kept = {entry.key: entry.value for entry in model.metadata_props}
    del model.metadata_props[:]
    for key, value in {**kept, **entries}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice of one image over classes 1..num_classes-1 (1 for a class absent from both)."""
    scores = []
    for c in range(1, num_classes):
        p, t = pred == c, label == c
        total = int(p.sum()) + int(t.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((p & t).sum()) / total)
    return float(np.mean(scores))


def mean_dice(masks: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int) -> float:
    """Foreground Dice of predicted masks against their labels, averaged over images (each its classes' mean)."""
    return float(np.mean([_dice(m, t, num_classes) for m, t in zip(masks, labels)]))


def mask_agreement(masks: Sequence[np.ndarray], others: Sequence[np.ndarray]) -> float:
    """The share of all pixels on which two sets of masks give the same class."""
    same = sum(int((a == b).sum()) for a, b in zip(masks, others))
    return same / sum(a.size for a in masks)


def _read_labels(items: Sequence[Mapping[str, Any]], num_classes: int, label_threshold: float) -> list[np.ndarray]:
    """Each item's label as H x W class indices, read as training and evaluation read them."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from scripts.data import PrepareLabeld

    read = Compose([LoadImaged("label", image_only=True, reader="PILReader", reverse_indexing=False),
                    EnsureChannelFirstd("label"), PrepareLabeld("label", num_classes, label_threshold)])
    return [np.asarray(read({"label": item["label"]})["label"])[0].astype(np.uint8) for item in items]


def int8_accuracy(float_path: str | os.PathLike, int8_path: str | os.PathLike, items: Sequence[Mapping[str, Any]],
                  config_file: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                  label_threshold: float = 0) -> dict:
    """Dice of the float32 and int8 models against the labels of ``items``, the Dice lost and the share of pixels
    where their masks agree, each model run through ``inference.json``'s pipeline (``InferencePipeline``: window,
    image scale, post-processing; the int8 model on ONNX Runtime's CPU provider)."""
    from scripts.inference import InferencePipeline

    pipelines = [InferencePipeline(path, config_file, backend="onnx", device="cpu", overrides=dict(overrides or {}))
                 for path in (float_path, int8_path)]
    num_classes = int(pipelines[0].parts()["settings"]["num_classes"])
    labels = _read_labels(items, num_classes, label_threshold)
    masks = [[pipeline.segment(item["image"]) for item in items] for pipeline in pipelines]
    for item, mask, label in zip(items, masks[0], labels):
        if mask.shape != label.shape:
            raise ConfigError(f"Label '{item['label']}' is {label.shape[1]} x {label.shape[0]} pixels but its image "
                              f"'{item['image']}' is {mask.shape[1]} x {mask.shape[0]}; fix the datalist entry.")
    dice_float, dice_int8 = (mean_dice(m, labels, num_classes) for m in masks)
    return {"dice_float32": round(dice_float, 6), "dice_int8": round(dice_int8, 6),
            "dice_loss": round(dice_float - dice_int8, 6), "pixel_agreement": round(mask_agreement(*masks), 6),
            "images": len(items)}


def describe_int8(figures: Mapping[str, Any]) -> str:
    """One line of the figures ``export_int8`` records: both Dice, the loss, the mask agreement and the section."""
    return (f"Dice float32 {figures['dice_float32']:.4f}, int8 {figures['dice_int8']:.4f} (loss "
            f"{figures['dice_loss']:.4f}), masks agree on {100 * figures['pixel_agreement']:.2f} % of pixels, over "
            f"the {figures['images']} images of section '{figures['eval_section']}'")


def _op_types(ops: str | Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(str(o).strip() for o in _section_list(ops) if str(o).strip())
    unknown = [o for o in chosen if o not in INT8_OP_TYPES]
    if not chosen or unknown:
        raise ConfigError(f"--int8_ops {ops!r}: give one or more of {', '.join(INT8_OP_TYPES)}, comma-separated "
                          f"(default {','.join(QUANTIZED_OPS)}).")
    return chosen


def _section_list(sections: str | Sequence[str]) -> list[str]:
    return [s.strip() for s in sections.split(",") if s.strip()] if isinstance(sections, str) else list(sections)


def export_int8(float_path: str | os.PathLike, out: str | os.PathLike, datalist: str | os.PathLike,
                dataset_dir: str | os.PathLike | None = None,
                calibration_sections: str | Sequence[str] = CALIBRATION_SECTIONS, calibration_windows_count: int = 64,
                eval_section: str | None = None, max_dice_loss: float = 0.005,
                config_file: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                label_threshold: float = 0, per_channel: bool = True, seed: int = 0,
                ops: str | Sequence[str] = QUANTIZED_OPS) -> tuple[Path, dict]:
    """Quantises the float32 model ``float_path`` to int8, measures what it costs and writes it to ``out`` with the
    figures in its record, unless the Dice lost exceeds ``max_dice_loss``.

    Args:
        float_path: the exported float32 ``.onnx`` (with its record).
        out: the int8 ``.onnx``; it appears only once measured and accepted (``scripts.files.atomic_files``).
        datalist: the datalist of the images the model was trained on.
        dataset_dir: the folder its relative paths start from. Defaults to the datalist's folder.
        calibration_sections: datalist sections whose images calibrate. Defaults to ``training`` and ``unlabeled``
            (those the datalist has).
        calibration_windows_count: windows cut from them. Defaults to 64.
        eval_section: the labelled section both models segment. Defaults to ``test``, else ``validation``.
        max_dice_loss: the largest Dice (float32 minus int8) the int8 model may lose. Defaults to 0.005.
        config_file: the inference config. Defaults to the bundle's ``configs/inference.json``.
        overrides: keys of that config (as ``InferencePipeline`` takes them).
        label_threshold: foreground is ``label > label_threshold`` in binary tasks, as in training. Defaults to 0.
        per_channel: one weight scale per output channel. Defaults to True.
        seed: chooses the calibration images and windows. Defaults to 0.
        ops: the ONNX operator types to quantise, a list or a comma-separated string of ``Conv``, ``MatMul`` and
            ``Gemm``. Defaults to ``Conv`` (``QUANTIZED_OPS``).

    Returns:
        ``out`` and the figures stored in its record under ``"int8"``.

    Raises:
        RunError: the Dice lost exceeds ``max_dice_loss``; the message gives the figures and nothing is written.
    """
    from scripts.data import load_datalist
    from scripts.inference import InferencePipeline
    from scripts.networks.record import ONNX_RECORD_KEY, stored_record

    ops = _op_types(ops)
    calibration = _sections(datalist, _section_list(calibration_sections), "--int8_calibration_sections")
    evaluation = _sections(datalist, [eval_section] if eval_section else _EVAL_SECTIONS, "--int8_eval_section")[0]
    images = [item["image"] for name in calibration
              for item in load_datalist(datalist, dataset_dir, key=name, require_label=False)]
    items = load_datalist(datalist, dataset_dir, key=evaluation, require_label=True)
    pipeline = InferencePipeline(float_path, config_file, backend="onnx", device="cpu", overrides=dict(overrides or {}))
    settings = pipeline.parts()["settings"]
    windows = calibration_windows(images, pipeline.parts()["preprocessing"], settings["roi_size"],
                                  settings["image_scale"], calibration_windows_count, seed)
    out = Path(out)
    with atomic_files(out) as folder:  # nothing appears unless measured and accepted
        draft = quantize_onnx(float_path, folder / out.name, windows, per_channel=per_channel, op_types=ops)
        figures = int8_accuracy(float_path, draft, items, config_file, overrides, label_threshold)
        figures.update(eval_section=evaluation, calibration_sections=calibration, calibration_windows=len(windows),
                       calibration_images=min(len(images), len(windows)), max_dice_loss=float(max_dice_loss),
                       per_channel=bool(per_channel), quantized_ops=list(ops))
        shown = describe_int8(figures)
        if figures["dice_loss"] > max_dice_loss:
            raise RunError(f"int8 model refused: {shown}; the loss exceeds --int8_max_dice_loss {max_dice_loss}. "
                           f"Nothing was written to '{out}'. Deploy the float32 model '{float_path}', or calibrate "
                           f"on more windows (--int8_calibration_windows), or quantise fewer operator types than "
                           f"{','.join(ops)} (--int8_ops), or accept a larger loss.")
        record = {**(stored_record(float_path) or {}), INT8_RECORD_KEY: figures}
        _set_metadata(draft, {ONNX_RECORD_KEY: json.dumps(record)})
    logger.info("Wrote int8 model %s: %s.", out, shown)
    return out, figures
