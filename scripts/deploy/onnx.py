"""ONNX export of a trained UNI-TransUNet and an ONNX Runtime segmenter that drops in where the network is used.

Export uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``), which keeps batch, height and width
dynamic for timm ViTs built with ``dynamic_img_size``; an example batch of two stops the exporter from fixing
the batch size to 1. Every export is checked against PyTorch before it is written as done.

Protobuf caps one file at 2 GB, so the weights of a large model (UNI2-h's are 2.8 GB in float32) go to an external
data file beside the ``.onnx`` (``<name>.onnx.data``), which the ``.onnx`` names by its relative path; ONNX Runtime
reads it from the ``.onnx``'s folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from scripts.errors import ConfigError, RunError
from scripts.files import atomic_files
from scripts.paths import config_path

__all__ = ["export_onnx", "export_trained_model", "check_onnx_parity", "OnnxSegmenter", "onnx_providers", "inference_network",
           "EXTERNAL_DATA_THRESHOLD"]

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "pred"
# Weights larger than this (bytes) go to an external data file, leaving room for the graph under protobuf's 2 GB cap
# on a file (PyTorch's exporter switches at the same size): UNI2-h's 2.8 GB do, UNI's 1.3 GB stay in the .onnx.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024


def _external_data_name(onnx_path: str | os.PathLike) -> str:
    """The name of the external data file that ``export_onnx`` writes beside ``onnx_path``: ``<name>.onnx.data``."""
    return f"{Path(onnx_path).name}.data"


def onnx_providers() -> list[str]:
    """The CUDA execution provider first when this machine has CUDA and ONNX Runtime offers it, then the CPU one."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider"] if torch.cuda.is_available() and "CUDAExecutionProvider" in available else []
    return wanted + ["CPUExecutionProvider"]


def check_onnx_parity(network: nn.Module, onnx_path: str | os.PathLike, sizes: Sequence[Sequence[int]],
                      tolerance: float = 1e-4, seed: int = 0) -> float:
    """The largest absolute logit difference between PyTorch and ONNX Runtime over random inputs of ``sizes``.

    Raises:
        RunError: when the difference exceeds ``tolerance``.
    """
    network = network.eval().cpu()
    segmenter = OnnxSegmenter(onnx_path, network.out_channels, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for size in sizes:
        x = torch.randn(*size, generator=generator)
        with torch.no_grad():
            worst = max(worst, float((segmenter(x) - network(x)).abs().max()))
    if worst > tolerance:
        raise RunError(f"ONNX model '{onnx_path}' differs from PyTorch by {worst:.3g} (> {tolerance}); do not deploy it.")
    return worst


def export_onnx(network: nn.Module, out: str | os.PathLike, example_size: Sequence[int] = (2, 3, 256, 256),
                check_sizes: Sequence[Sequence[int]] | None = None, opset: int = 18,
                record: Mapping[str, Any] | None = None,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Exports ``network`` (eval mode, one logits output) with dynamic batch, height and width, then checks parity.

    Args:
        network: the trained network.
        out: output ``.onnx`` path. It is written in a temporary folder with its data file and appears only after
            the parity check (``scripts.files.atomic_files``).
        example_size: example input shape; batch >= 2 and sides multiples of the patch size.
        check_sizes: input shapes compared against PyTorch after export. Defaults to the example and a
            non-square size with another batch.
        opset: ONNX opset. Defaults to 18.
        record: the model's network and window record (``scripts.networks.model_record``), stored as JSON in the
            file's metadata so inference rebuilds the window from it. Defaults to None (no record).
        external_data_threshold: weights larger than this many bytes go to ``<out name>.data`` beside ``out``
            (0: always). Defaults to 1.5 GiB; protobuf cannot write a file over 2 GB.
    """
    batch, _, height, width = example_size
    if batch < 2:
        raise ConfigError(f"example_size batch {batch}: export with a batch of at least 2 so it stays dynamic.")
    if external_data_threshold < 0:
        raise ConfigError(f"external_data_threshold={external_data_threshold}: give a size in bytes, 0 or more.")
    patch = getattr(network, "patch_size", 16)
    if check_sizes is None:
        check_sizes = [tuple(example_size), (1, 3, height + 2 * patch, max(patch, width - patch))]
    network = network.eval().cpu()
    out = Path(out)
    with atomic_files(out) as folder:  # the .onnx (and its data file) appear only once they passed the parity check
        worst, external = _export_checked(network, folder / out.name, example_size, opset, record, check_sizes,
                                          external_data_threshold)
    if not external:  # a data file beside it belonged to the export this one replaced
        out.with_name(_external_data_name(out)).unlink(missing_ok=True)
    logger.info("Exported %s%s; largest logit difference against PyTorch %.2e over shapes %s", out,
                f" with its weights in {_external_data_name(out)}" if external else "", worst, list(check_sizes))
    return out


def _export_checked(network: nn.Module, path: Path, example_size, opset: int, record, check_sizes,
                    external_data_threshold: int) -> tuple[float, bool]:
    """Exports ``network`` to ``path`` with the model's record in its metadata and, above the threshold, its weights
    in a data file beside it; checks it against PyTorch. Returns the largest logit difference and whether the
    weights went to a data file."""
    from onnxscript import ir

    from scripts.networks.record import ONNX_RECORD_KEY

    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.onnx.export(network, (torch.randn(*example_size),), dynamo=True, opset_version=opset,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes={"x": dims})
    if record is not None:
        program.model.metadata_props[ONNX_RECORD_KEY] = json.dumps(dict(record))
    weights = sum(value.const_value.nbytes for value in program.model.graph.initializers.values()
                  if value.const_value is not None)
    external = weights > external_data_threshold
    ir.save(program.model, path, external_data=_external_data_name(path) if external else None)
    return check_onnx_parity(network, path, check_sizes), external


def _missing_data_files(path: str | os.PathLike) -> list[str]:
    """The external data files that the ``.onnx`` at ``path`` names and its folder lacks (none when it cannot be
    read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a readable model: ONNX Runtime's own error says more
        return []
    locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    return sorted(name for name in locations if not (Path(path).parent / name).is_file())


def session_options():
    """ONNX Runtime session options of the bundle's models: the CPU threads sleep when a run ends instead of
    spinning. Between two runs the bundle blends windows, traces polygons and writes tiles in Python; spinning
    threads took the cores from that work (on 2 cores the demo slide took 3.2 - 5.9 s in int8 with spinning,
    3.0 - 3.5 s without; docs/benchmarks.md)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxSegmenter(nn.Module):
    """An exported model behind the ``nn.Module`` call the bundle's inferers and evaluators make.

    Args:
        path: the ``.onnx`` file.
        num_classes: classes the config expects; a model with another count is refused.
        providers: ONNX Runtime providers. Defaults to CUDA when available, else CPU; an int8 model
            (``scripts.deploy.quantize``) runs on the CPU.
    """

    def __init__(self, path: str | os.PathLike, num_classes: int, providers: list[str] | None = None):
        super().__init__()
        import onnxruntime as ort

        if not Path(path).is_file():
            raise ConfigError(
                f"ONNX model '{path}' does not exist (config key 'onnx_path'); export one with "
                "python -m scripts.cli export-onnx."
            )
        try:
            self.session = ort.InferenceSession(str(path), session_options(), providers=providers or onnx_providers())
        except Exception as err:  # ONNX Runtime raises its own Fail / InvalidProtobuf / InvalidGraph types
            missing = _missing_data_files(path)
            if missing:
                raise ConfigError(
                    f"ONNX model '{path}' keeps its weights in {', '.join(missing)}, which is not in its folder "
                    f"'{Path(path).parent}': move the data file together with the .onnx (same folder, same name)."
                ) from err
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"ONNX model '{path}' cannot be loaded by ONNX Runtime: it is truncated, corrupt or not an ONNX file "
                f"({first[:200]}). Export it again with python -m scripts.cli export-onnx."
            ) from err
        from .quantize import is_int8

        if (providers is None and self.session.get_providers()[0] != "CPUExecutionProvider"
                and is_int8(self.session.get_modelmeta().custom_metadata_map)):  # int8 kernels are the CPU provider's
            self.session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        shape = self.session.get_outputs()[0].shape
        channels = shape[1] if len(shape) == 4 else None
        if isinstance(channels, int) and channels != num_classes:
            raise ConfigError(
                f"ONNX model '{path}' predicts {channels} classes but the config has num_classes={num_classes}; "
                "export the matching model or set num_classes."
            )
        self.num_classes = num_classes
        self.path = str(path)
        # Our exporter names the tensors image / pred; MONAI's onnx_export leaves the exporter's names (x, ...).
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().numpy()
        logits = self.session.run([self.output_name], {self.input_name: array})[0]
        return torch.from_numpy(logits).to(x.device)


def inference_network(backend: str, network: nn.Module, onnx_path: str, num_classes: int,
                      device: torch.device | str = "cpu") -> nn.Module:
    """The network inference.json runs: the PyTorch model (``backend: pytorch``) or the exported one (``onnx``)."""
    if backend == "pytorch":
        return network.to(device)
    if backend == "onnx":
        return OnnxSegmenter(onnx_path, num_classes)
    raise ConfigError(f"backend='{backend}' is not 'pytorch' or 'onnx' (config key 'backend').")


def export_trained_model(ckpt: str = "models/model.pt", out: str = "models/model.onnx", config_file: str | None = None,
                example_size: Sequence[int] = (2, 3, 256, 256),
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, int8: bool = False, int8_out: str | None = None,
                datalist: str | None = None, dataset_dir: str | None = None,
                int8_calibration_sections: str = "training,unlabeled", int8_calibration_windows: int = 64,
                int8_eval_section: str | None = None, int8_max_dice_loss: float = 0.005, label_threshold: float = 0,
                int8_ops: str = "Conv", **overrides) -> str:
    """Builds the network ``ckpt`` records (or, for an older file, that of ``config_file`` with ``--key value``
    overrides, as for training; ``config_file`` defaults to the bundle's ``inference.json``), loads ``ckpt`` strictly and exports it to ``out`` with dynamic batch, height and
    width and the model's record (if it has one) in the file's metadata; fails if ONNX Runtime and PyTorch differ by
    more than 1e-4. Weights over ``external_data_threshold`` bytes (default 1.5 GiB; 0: always) go to
    ``<out>.data`` beside ``out``.

    Example: ``python -m scripts.cli export-onnx --ckpt models/model.pt --out models/model.onnx``

    ``--int8 true --datalist FILE`` also writes an int8 model for CPU servers (``scripts.deploy.quantize``) to
    ``--int8_out`` (default ``<out>`` with ``.int8.onnx``), calibrated on ``--int8_calibration_windows`` windows of
    the ``--int8_calibration_sections`` images, with the Dice of both models on ``--int8_eval_section`` (default
    ``test``, else ``validation``; foreground above ``--label_threshold``) and their mask agreement in its record;
    it is refused, with those figures, when it loses more than ``--int8_max_dice_loss`` Dice. ``--int8_ops`` names
    the operator types quantised (default ``Conv``; ``Conv,MatMul,Gemm`` quantises the ViT's products too).
    """
    from monai.bundle import ConfigParser

    from scripts.config import as_bool
    from scripts.networks import (RECORD_KEYS, config_settings, load_trained_weights, network_from_record,
                                  stored_record, trained_settings)

    int8 = as_bool(int8, "int8")
    if int8 and not datalist:
        raise ConfigError("--int8 true calibrates on your training images: add --datalist FILE (its training and "
                          "unlabeled sections calibrate, its test or validation section measures the Dice).")
    config_file = config_file or str(config_path("inference.json"))
    parser = ConfigParser()
    parser.read_config(config_file)
    for key, value in overrides.items():
        parser[key] = value
    # the record keys the config or the command line gives (for an older file); the others come from the record
    settings = trained_settings(ckpt, config_settings(parser), key="--ckpt")
    network = network_from_record(settings)
    load_trained_weights(network, ckpt, key="--ckpt")
    # A file without a record (written before records existed) exports without one: its window is not known.
    record = settings if stored_record(ckpt, "--ckpt") is not None else None
    exported = export_onnx(network, out, tuple(example_size), record=record,
                      external_data_threshold=int(external_data_threshold))
    if not int8:
        return str(exported)
    from scripts.deploy.quantize import describe_int8, export_int8

    # the measuring pipelines read the exported file's record; without one, they get the settings built here
    measured = {key: value for key, value in overrides.items() if key not in RECORD_KEYS}
    if record is None:
        measured["model_overrides"] = settings
    quantized, figures = export_int8(exported, int8_out or exported.with_suffix(".int8.onnx"), datalist, dataset_dir,
                                     int8_calibration_sections, int(int8_calibration_windows), int8_eval_section,
                                     float(int8_max_dice_loss), config_file, measured, float(label_threshold),
                                     ops=int8_ops)
    return f"{exported}\n{quantized}: {describe_int8(figures)}"
