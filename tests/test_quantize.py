"""int8 export for CPU servers: static quantisation calibrated on the datalist's images, the accuracy cost measured
against the float32 model and stored in the record, refusal above the threshold, the ONNX Runtime backend."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.deploy import OnnxSegmenter
from scripts.deploy.quantize import (INT8_RECORD_KEY, calibration_windows, export_int8, mask_agreement, mean_dice,
                                     quantize_onnx)
from scripts.errors import ConfigError, RunError
from scripts.inference import InferencePipeline
from scripts.networks import stored_record
from tests.helpers import tiny_network, tiny_record

# tiny_network()'s record, with the window the demo fixture's 96 x 128 images are segmented in.
RECORD = tiny_record(roi_size=[64, 64])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_data):
    """tiny_network() saved as model.pt with its record and exported by the CLI's export-onnx with --int8 true,
    calibrated on the demo datalist: returns the float32 and the int8 model and the line the export prints about it."""
    from scripts.deploy.onnx import export_trained_model as export_command

    folder = tmp_path_factory.mktemp("int8")
    torch.save({"model": tiny_network().state_dict(), "config": RECORD}, folder / "model.pt")
    printed = export_command(ckpt=str(folder / "model.pt"), out=str(folder / "model.onnx"), example_size=[2, 3, 64, 64],
                             int8="true", datalist=str(demo_data), int8_calibration_windows=6, int8_max_dice_loss=1.0)
    lines = printed.split("\n")
    assert lines[0] == str(folder / "model.onnx") and lines[1].startswith(f"{folder / 'model.int8.onnx'}: Dice float32")
    return folder / "model.onnx", folder / "model.int8.onnx", lines[1]


def test_record_holds_the_measured_figures(exported, demo_data):
    float_path, int8_path, printed = exported
    record = stored_record(int8_path)
    assert {key: value for key, value in record.items() if key != INT8_RECORD_KEY} == RECORD  # the window travels
    figures = record[INT8_RECORD_KEY]
    # recomputed from the two models' masks on the demo test section, through the inference pipeline
    content = json.loads(Path(demo_data).read_text())
    base = Path(demo_data).parent
    masks = {path: [InferencePipeline(path, backend="onnx", device="cpu").segment(base / item["image"])
                    for item in content["test"]] for path in (float_path, int8_path)}
    labels = [(np.asarray(Image.open(base / item["label"])) > 0).astype(np.uint8)
              for item in content["test"]]
    dice_float, dice_int8 = mean_dice(masks[float_path], labels, 2), mean_dice(masks[int8_path], labels, 2)
    assert figures["eval_section"] == "test" and figures["images"] == len(content["test"]) == 2
    assert figures["dice_float32"] == pytest.approx(dice_float, abs=1e-6)
    assert figures["dice_int8"] == pytest.approx(dice_int8, abs=1e-6)
    assert figures["dice_loss"] == pytest.approx(dice_float - dice_int8, abs=2e-6)
    assert figures["pixel_agreement"] == pytest.approx(mask_agreement(masks[float_path], masks[int8_path]), abs=1e-6)
    assert figures["calibration_sections"] == ["training", "unlabeled"] and figures["calibration_windows"] == 6
    assert figures["max_dice_loss"] == 1.0 and figures["quantized_ops"] == ["Conv"]
    assert f"Dice float32 {dice_float:.4f}, int8 {dice_int8:.4f}" in printed  # the export says it too


def test_int8_model_is_quantised_and_runs_in_the_onnx_backend(exported):
    import onnx

    from scripts.deploy import inference_network

    float_path, int8_path, _ = exported
    ops = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8_path.stat().st_size < float_path.stat().st_size / 2  # int8 weights
    segmenter = inference_network("onnx", tiny_network(), str(int8_path), num_classes=2)  # inference.json's backend
    assert segmenter.session.get_providers() == ["CPUExecutionProvider"]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        reference, logits = tiny_network()(x), segmenter(x)
    assert logits.shape == reference.shape
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() > 0.9


def test_a_loss_above_the_threshold_is_refused_with_its_figures(exported, demo_data, tmp_path):
    out = tmp_path / "model.int8.onnx"
    with pytest.raises(RunError, match=r"int8 model refused: Dice float32 \d\.\d{4}, int8 \d\.\d{4} \(loss "
                                       r"-?\d\.\d{4}\), masks agree on \d+\.\d\d % of pixels, over the 2 images of "
                                       r"section 'validation'; the loss exceeds --int8_max_dice_loss -1"):
        export_int8(exported[0], out, demo_data, calibration_windows_count=4, eval_section="validation",
                    max_dice_loss=-1)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing temporary left


def test_cli_refuses_int8_without_a_datalist_before_exporting(tmp_path):
    from scripts.deploy.onnx import export_trained_model as export_command

    torch.save({"model": tiny_network().state_dict(), "config": RECORD}, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="add --datalist FILE"):
        export_command(ckpt=str(tmp_path / "model.pt"), out=str(tmp_path / "m.onnx"), int8="true")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_file_without_a_record_exports_int8_with_its_command_line_network_keys(demo_data, tmp_path):
    """An older model.pt (no record) exports with --encoder_name etc. given; the int8 measurement then segments with
    the same network and window (through model_overrides), instead of refusing those keys after the float export."""
    from scripts.deploy.onnx import export_trained_model as export_command

    torch.save({"model": tiny_network().state_dict()}, tmp_path / "model.pt")
    keys = {key: RECORD[key] for key in ("encoder_name", "encoder_kwargs", "skip_channels", "decoder_channels")}
    printed = export_command(ckpt=str(tmp_path / "model.pt"), out=str(tmp_path / "model.onnx"),
                             example_size=[2, 3, 64, 64], int8="true", datalist=str(demo_data),
                             int8_calibration_windows=4, int8_max_dice_loss=1.0, roi_size=[32, 32], **keys)
    assert printed.split("\n")[1].startswith(f"{tmp_path / 'model.int8.onnx'}: Dice float32")
    assert stored_record(tmp_path / "model.onnx") is None  # its window is not known to the file
    figures = stored_record(tmp_path / "model.int8.onnx")[INT8_RECORD_KEY]
    assert figures["images"] == 2


def test_datalist_without_the_named_sections_is_refused(exported, tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "validation": []}))
    with pytest.raises(ConfigError, match=r"has no non-empty section among \['training', 'unlabeled'\] "
                                          r"\(--int8_calibration_sections\); it holds \['training', 'validation'\]"):
        export_int8(exported[0], tmp_path / "q.onnx", datalist)


def test_calibration_windows_are_read_scaled_and_padded_as_inference_sees_them(tmp_path):
    from scripts.inference.pipeline import image_reader

    for name, size in (("big.png", (80, 120)), ("small.png", (20, 30))):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    read = image_reader()
    windows = calibration_windows([tmp_path / "big.png", tmp_path / "small.png"], read, [32, 32],
                                  image_scale=0.5, count=5, seed=1)
    assert len(windows) == 5 and all(w.shape == (3, 32, 32) and w.dtype == np.float32 for w in windows)
    # the small image shrinks to 10 x 15 and is padded with zeros to the window, as the sliding window pads
    padded = [w for w in windows if (w[:, 10:, :] == 0).all() and (w[:, :, 15:] == 0).all()]
    assert len(padded) == 2 and all(np.abs(w[:, :10, :15]).sum() > 0 for w in padded)
    with pytest.raises(ConfigError, match="1 or more windows"):
        calibration_windows([tmp_path / "big.png"], read, [32, 32], count=0)


def test_quantize_keeps_the_record_and_stays_close_to_float(exported, tmp_path):
    windows = [np.random.default_rng(i).standard_normal((3, 64, 64)).astype(np.float32) for i in range(4)]
    out = quantize_onnx(exported[0], tmp_path / "q.onnx", windows)
    assert stored_record(out) == RECORD
    x = torch.from_numpy(windows[0][None])
    with torch.no_grad():
        reference = tiny_network()(x)
    logits = OnnxSegmenter(out, num_classes=2, providers=["CPUExecutionProvider"])(x)
    assert float((logits - reference).abs().max()) < 0.1 * float(reference.abs().max())


def test_pipeline_takes_a_list_of_config_files(exported, tmp_path):
    """export-onnx --int8 with --config_file "[inference.json, preset, recipe]" measures through all of them."""
    from scripts.errors import ConfigError
    from scripts.paths import config_path

    float_path, _, _ = exported
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"sw_overlap": 0.5, "min_object_size": 7}))
    pipeline = InferencePipeline(float_path, [str(config_path("inference.json")), str(override)], backend="onnx",
                                 device="cpu")
    parts = pipeline.parts()
    assert parts["inferers"][False].inferer.inferer.overlap == 0.5 and parts["post"]["min_object_size"] == 7
    with pytest.raises(ConfigError, match="nowhere.json"):
        InferencePipeline(float_path, [str(config_path("inference.json")), str(tmp_path / "nowhere.json")])


def test_unknown_operator_type_is_refused_before_any_work(exported, demo_data, tmp_path):
    from scripts.deploy.quantize import export_int8
    from scripts.errors import ConfigError

    float_path, _, _ = exported
    with pytest.raises(ConfigError, match=r"--int8_ops 'Conv,Softmax': give one or more of Conv, MatMul, Gemm"):
        export_int8(float_path, tmp_path / "m.int8.onnx", demo_data, ops="Conv,Softmax")
    assert not (tmp_path / "m.int8.onnx").exists()
