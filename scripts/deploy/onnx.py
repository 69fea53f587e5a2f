"""ONNX export of a trained UNI-TransUNet and an ONNX Runtime segmenter that drops in where the network is used.

Export uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``), which keeps batch, height and width
dynamic for timm ViTs built with ``dynamic_img_size``; an example batch of two stops the exporter from fixing
the batch size to 1. Every export is checked against PyTorch before it is written as done.
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
from scripts.files import atomic_path

__all__ = ["export_onnx", "check_onnx_parity", "OnnxSegmenter", "onnx_providers", "inference_network"]

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "pred"


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
                record: Mapping[str, Any] | None = None) -> Path:
    """Exports ``network`` (eval mode, one logits output) with dynamic batch, height and width, then checks parity.

    Args:
        network: the trained network.
        out: output ``.onnx`` path; written through a temporary file.
        example_size: example input shape; batch >= 2 and sides multiples of the patch size.
        check_sizes: input shapes compared against PyTorch after export. Defaults to the example and a
            non-square size with another batch.
        opset: ONNX opset. Defaults to 18.
        record: the model's network and window record (``scripts.networks.model_record``), stored as JSON in the
            file's metadata so inference rebuilds the window from it. Defaults to None (no record).
    """
    batch, _, height, width = example_size
    if batch < 2:
        raise ConfigError(f"example_size batch {batch}: export with a batch of at least 2 so it stays dynamic.")
    patch = getattr(network, "patch_size", 16)
    if check_sizes is None:
        check_sizes = [tuple(example_size), (1, 3, height + 2 * patch, max(patch, width - patch))]
    network = network.eval().cpu()
    out = Path(out)
    with atomic_path(out, suffix=".onnx") as tmp:  # the file appears only once it passed the parity check
        worst = _export_checked(network, tmp, example_size, opset, record, check_sizes)
    logger.info("Exported %s; largest logit difference against PyTorch %.2e over shapes %s", out, worst,
                list(check_sizes))
    return out


def _export_checked(network: nn.Module, tmp: Path, example_size, opset: int, record, check_sizes) -> float:
    """Exports ``network`` to ``tmp``, adds the model's record, checks it against PyTorch; returns the largest
    logit difference."""
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    torch.onnx.export(network, (torch.randn(*example_size),), str(tmp), dynamo=True, opset_version=opset,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes={"x": dims},
                      external_data=False)
    if record is not None:
        import onnx

        from scripts.networks.record import ONNX_RECORD_KEY

        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = ONNX_RECORD_KEY, json.dumps(dict(record))
        onnx.save(model, str(tmp))
    return check_onnx_parity(network, tmp, check_sizes)


class OnnxSegmenter(nn.Module):
    """An exported model behind the ``nn.Module`` call the bundle's inferers and evaluators make.

    Args:
        path: the ``.onnx`` file.
        num_classes: classes the config expects; a model with another count is refused.
        providers: ONNX Runtime providers. Defaults to CUDA when available, else CPU.
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
            self.session = ort.InferenceSession(str(path), providers=providers or onnx_providers())
        except Exception as err:  # ONNX Runtime raises its own Fail / InvalidProtobuf / InvalidGraph types
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"ONNX model '{path}' cannot be loaded by ONNX Runtime: it is truncated, corrupt or not an ONNX file "
                f"({first[:200]}). Export it again with python -m scripts.cli export-onnx."
            ) from err
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
