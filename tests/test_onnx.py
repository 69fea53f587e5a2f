"""ONNX export: dynamic sizes, parity with PyTorch, the ONNX Runtime backend of inference.json, clear errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.deploy import OnnxSegmenter, check_onnx_parity, export_onnx
from scripts.errors import ConfigError
from tests.helpers import NET_ARGS, run_python, tiny_network

REPO = Path(__file__).resolve().parent.parent






@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny network saved as model.pt and exported through the project CLI."""
    folder = tmp_path_factory.mktemp("onnx")
    network = tiny_network()
    torch.save({"model": network.state_dict()}, folder / "model.pt")
    result = run_python(["-m", "scripts.cli", "export-onnx", "--ckpt", folder / "model.pt", "--out", folder / "model.onnx",
                  "--example_size", "[2,3,64,96]", *NET_ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    return network, folder


def test_parity_over_batches_and_sizes(exported):
    network, folder = exported
    sizes = [(2, 3, 64, 96), (1, 3, 32, 48), (3, 3, 96, 32), (1, 3, 160, 160)]
    assert check_onnx_parity(network, folder / "model.onnx", sizes) <= 1e-4


def test_onnx_backend_gives_the_same_masks(exported, demo_data, tmp_path):
    _, folder = exported
    images = Path(demo_data).parent / "test" / "images"
    masks = {}
    for backend in ("pytorch", "onnx"):
        out = tmp_path / backend
        result = run_python(["-m", "monai.bundle", "run", "inference", "--config_file", REPO / "bundle/configs/inference.json",
                      *NET_ARGS, "--roi_size", "[32,32]", "--input_dir", images, "--backend", backend,
                      "--ckpt_path", folder / "model.pt", "--onnx_path", folder / "model.onnx", "--output_dir", out])
        assert result.returncode == 0, result.stderr[-3000:]
        masks[backend] = {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*_mask.png"))}
    assert masks["pytorch"].keys() == masks["onnx"].keys() and len(masks["onnx"]) == 2
    for name, mask in masks["pytorch"].items():
        assert (mask == masks["onnx"][name]).mean() > 0.999


def test_class_count_mismatch_is_refused(exported):
    _, folder = exported
    with pytest.raises(ConfigError, match="predicts 2 classes but the config has num_classes=3"):
        OnnxSegmenter(folder / "model.onnx", num_classes=3)
    with pytest.raises(ConfigError, match="does not exist"):
        OnnxSegmenter(folder / "absent.onnx", num_classes=2)


def test_export_refuses_batch_one(tmp_path):
    with pytest.raises(ConfigError, match="batch of at least 2"):
        export_onnx(tiny_network(), tmp_path / "m.onnx", example_size=(1, 3, 64, 64))


def test_checkpoint_that_does_not_fit_is_named(exported, tmp_path):
    _, folder = exported
    result = run_python(["-m", "scripts.cli", "export-onnx", "--ckpt", folder / "model.pt", "--out", tmp_path / "m.onnx",
                  "--encoder_name", "vit_tiny", "--encoder_kwargs", "{'depth': 1}"])
    assert result.returncode != 0
    assert f"ERROR: Checkpoint '{folder / 'model.pt'}' does not fit the network" in result.stderr


def test_monai_bundle_onnx_export_with_dynamo(exported, tmp_path):
    network, folder = exported
    result = run_python(["-m", "monai.bundle", "onnx_export", "network_def", "--filepath", tmp_path / "monai.onnx",
                  "--ckpt_file", folder / "model.pt", "--key_in_ckpt", "model",
                  "--config_file", REPO / "bundle/configs/inference.json", "--input_shape", "[2,3,64,64]",
                  "--use_trace", "true", "--converter_kwargs",
                  "{'dynamo': True, 'dynamic_axes': {'x': {0: 'batch', 2: 'height', 3: 'width'}}}", *NET_ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    segmenter = OnnxSegmenter(tmp_path / "monai.onnx", num_classes=2, providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 64, 64), (1, 3, 96, 32)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = network(x)
        assert segmenter(x).shape == expected.shape
        assert float((segmenter(x) - expected).abs().max()) <= 1e-4


def test_export_rebuilds_the_recorded_network_and_stores_the_record(tmp_path):
    from scripts.networks import model_record, stored_record

    network = tiny_network()
    record = model_record(num_classes=2, encoder_name="vit_tiny", encoder_kwargs={"depth": 1}, n_skip=3,
                          skip_channels=[16, 8, 8], decoder_channels=[16, 16, 8, 8], embed_dim=512, hybrid=False,
                          roi_size=[64, 64], image_scale=0.5)
    torch.save({"model": network.state_dict(), "config": record}, tmp_path / "model.pt")
    # another recorded model where the config's own ckpt_path points: export must follow --ckpt, not it
    other = tmp_path / "other" / "models"
    other.mkdir(parents=True)
    torch.save({"model": {}, "config": {**record, "skip_channels": [32, 8, 8], "roi_size": [96, 96]}}, other / "model.pt")
    # no network overrides: without the record the config's default network would not fit these weights
    result = run_python(["-m", "scripts.cli", "export-onnx", "--ckpt", tmp_path / "model.pt", "--out", tmp_path / "model.onnx",
                  "--example_size", "[2,3,64,64]", "--bundle_root", tmp_path / "other"])
    assert result.returncode == 0, result.stderr[-3000:]
    # a record without class names (an older model.pt) gains the config's in the exported one
    assert stored_record(tmp_path / "model.onnx") == {**record, "class_names": ["background", "gland"]}
