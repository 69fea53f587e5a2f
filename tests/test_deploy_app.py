"""The MONAI Deploy application: its operators' compute writes the bundle's ONNX masks and reports bad inputs; the
whole application runs end to end where the MONAI Deploy App SDK is installed (scripts/deploy/app/requirements.txt).
Without the SDK those tests are skipped, unless ``MPAMATCH_REQUIRE_DEPLOY=1`` (the Deploy environment's test command)
makes them fail, so a broken SDK install cannot pass as skipped tests.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from scripts.deploy import export_onnx
from scripts.deploy.app import ImageFolderLoader, MaskWriter, TiledOnnxSegmenter, resolve_model_path
from scripts.deploy.app.stage import stage_app
from scripts.errors import ConfigError
from tests.helpers import LEGACY_OVERRIDES, REPO, run_python, subprocess_env, tiny_network

APP = REPO / "scripts" / "deploy" / "app"
ROI = [32, 32]
# The tiny network's keys and window, for the model exported without its record: inference.json's model_overrides.
LEGACY = {"model_overrides": LEGACY_OVERRIDES}
LEGACY_ARGS = ["--model_overrides", json.dumps(LEGACY["model_overrides"])]
try:
    import monai.deploy.core  # noqa: F401

    NO_SDK = ""
except ImportError as error:
    NO_SDK = f"MONAI Deploy App SDK not importable ({error}): install scripts/deploy/app/requirements.txt"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random tiny network exported (with its parity check) to model.onnx without a record, as older versions
    exported: its window comes from ``model_overrides``."""
    return export_onnx(tiny_network(), tmp_path_factory.mktemp("model") / "model.onnx", example_size=(2, 3, 64, 96))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images of several sizes and formats (one smaller than the window, one grey, one RGBA) and a corrupt file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, size, mode in [("a.png", (96, 128), "RGB"), ("b.jpg", (70, 50), "RGB"), ("c.bmp", (21, 40), "RGB"),
                             ("d.tif", (64, 64), "L"), ("e.png", (40, 72), "RGBA")]:
        shape = (*size, len(mode)) if len(mode) > 1 else size
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder


@pytest.fixture
def sdk():
    """Skips a whole-application test without the SDK, or fails it where ``MPAMATCH_REQUIRE_DEPLOY=1``."""
    if NO_SDK and os.environ.get("MPAMATCH_REQUIRE_DEPLOY") == "1":
        pytest.fail(f"{NO_SDK}; MPAMATCH_REQUIRE_DEPLOY=1 requires the whole-application tests to run")
    if NO_SDK:
        pytest.skip(NO_SDK)


def read_masks(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*_mask.png"))}


@pytest.fixture(scope="module")
def bundle_masks(model, images, tmp_path_factory):
    """Masks of the bundle's own inference (inference.json, ONNX backend) on the same images and window."""
    out = tmp_path_factory.mktemp("bundle_masks")
    result = run_python(["-m", "monai.bundle", "run", "inference", "--config_file", REPO / "bundle/configs/inference.json",
                  *LEGACY_ARGS, "--input_dir", images, "--backend", "onnx",
                  "--onnx_path", model, "--output_dir", out])
    assert result.returncode != 0 and "broken.png" in result.stderr, result.stderr[-3000:]
    masks = read_masks(out)
    assert sorted(masks) == ["a_mask.png", "b_mask.png", "c_mask.png", "d_mask.png", "e_mask.png"]
    return masks


def test_operators_compute_writes_the_bundle_masks(model, images, bundle_masks, tmp_path):
    loader = ImageFolderLoader(images)
    segmenter = TiledOnnxSegmenter(model, LEGACY)
    writer = MaskWriter(tmp_path, num_classes=2)
    written = [writer(image, segmenter(image)) for image in map(loader.load, loader.paths)]
    assert sorted(p.name for p in written) == sorted(bundle_masks)
    masks = read_masks(tmp_path)
    for name, expected in bundle_masks.items():
        assert masks[name].shape == expected.shape and set(np.unique(masks[name])) <= {0, 255}
        assert np.array_equal(masks[name], expected), name
    with pytest.raises(ConfigError, match=r"1 of 6 images .*\(the other 5 were segmented\):\n  .*broken\.png"):
        loader.report()


def test_a_recorded_model_brings_its_window_and_image_scale(images, tmp_path):
    """A model exported with its record (window 32, image scale 0.5) gives the bundle's masks with no settings."""
    from scripts.networks import model_record

    record = model_record(num_classes=2, encoder_name="vit_tiny", encoder_kwargs={"depth": 1}, n_skip=3,
                          skip_channels=[16, 8, 8], decoder_channels=[16, 16, 8, 8], embed_dim=512, hybrid=False,
                          roi_size=ROI, image_scale=0.5)
    model = export_onnx(tiny_network(), tmp_path / "model.onnx", example_size=(2, 3, 64, 96), record=record)
    result = run_python(["-m", "monai.bundle", "run", "inference", "--config_file", REPO / "bundle/configs/inference.json",
                         "--input_dir", images, "--backend", "onnx", "--onnx_path", model, "--output_dir",
                         tmp_path / "bundle"])
    log = result.stdout + result.stderr
    assert "Network and window from" in log and "image_scale=0.5" in log, log[-3000:]
    loader = ImageFolderLoader(images)
    segmenter = TiledOnnxSegmenter(model)  # inference.json's window is 96: the record's 32 wins
    assert segmenter.image_scale == 0.5 and list(segmenter.inferer.inferer.inferer.roi_size) == ROI  # Scaled(TTA(window))
    writer = MaskWriter(tmp_path / "app", num_classes=2)
    for image in map(loader.load, loader.paths):
        writer(image, segmenter(image))
    expected, masks = read_masks(tmp_path / "bundle"), read_masks(tmp_path / "app")
    assert sorted(masks) == sorted(expected) and len(masks) == 5
    for name in expected:
        assert np.array_equal(masks[name], expected[name]), name


def test_image_failing_at_load_time_is_skipped_and_reported(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "good.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "overwritten.png")
    loader = ImageFolderLoader(tmp_path)
    (tmp_path / "overwritten.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # replaced after the scan, before its turn
    loaded = {path.rsplit("/", 1)[-1]: loader.load(path) for path in loader.paths}
    assert loaded["overwritten.png"] is None and tuple(loaded["good.png"].shape) == (3, 20, 20)
    with pytest.raises(ConfigError, match=r"1 of 2 images .*\n  cannot read .*overwritten\.png: .*not an image"):
        loader.report()
    Image.new("RGB", (20, 20)).save(tmp_path / "overwritten.png")
    loader = ImageFolderLoader(tmp_path)
    loader.load(str(tmp_path / "good.png"))
    loader.report()


def test_images_are_read_by_the_load_image_transform_of_inference_json(images, tmp_path):
    """Nothing of the reading is copied: a config whose ``load_image`` also flips the image makes the app's loader
    flip it too."""
    config = json.loads((REPO / "bundle" / "configs" / "inference.json").read_text())
    assert config["preprocessing"]["transforms"][0] == "@load_image"
    config["load_image"]["transforms"].append({"_target_": "Flipd", "keys": "image", "spatial_axis": 1})
    (tmp_path / "inference.json").write_text(json.dumps(config))
    path = str(images / "e.png")  # RGBA: the config's EnsureRGBd drops alpha
    plain, flipped = ImageFolderLoader(images).load(path), ImageFolderLoader(images, tmp_path / "inference.json").load(path)
    assert tuple(plain.shape) == (3, 40, 72)
    assert np.array_equal(np.asarray(flipped), np.asarray(plain)[:, :, ::-1])


def test_bad_model_path_is_named(model, tmp_path):
    with pytest.raises(ConfigError, match=f"ONNX model '{tmp_path / 'absent.onnx'}' does not exist"):
        TiledOnnxSegmenter(tmp_path / "absent.onnx")
    with pytest.raises(ConfigError, match=f"Model folder '{tmp_path}' holds 0 .onnx files"):
        resolve_model_path(tmp_path)
    nested = tmp_path / "models" / "gland"
    nested.mkdir(parents=True)
    (nested / "model.onnx").write_bytes(model.read_bytes())
    assert resolve_model_path(tmp_path / "models") == nested / "model.onnx"
    with pytest.raises(ConfigError, match=r"roi_size=\[32\] \(app.yaml, section 'inference', model_overrides\)"):
        TiledOnnxSegmenter(model, {"model_overrides": {"roi_size": [32]}})
    with pytest.raises(ConfigError, match=r"Inference settings \['roi_size'\]: the network, window and class names "
                                          r"come from the model's record \(model.onnx\)\. .*under 'model_overrides'"):
        TiledOnnxSegmenter(model, {"roi_size": ROI})
    with pytest.raises(ConfigError, match=r"Unknown inference settings: 'sw_batch_sise' \(did you mean sw_batch_size"):
        TiledOnnxSegmenter(model, {"sw_batch_sise": 8})
    with pytest.raises(ConfigError, match=r"'model_overrides' has \['overlap'\], which are not network, window"):
        TiledOnnxSegmenter(model, {"model_overrides": {"overlap": 0.5}})


def test_post_processing_keys_reach_the_app_as_in_the_bundle(model, images, tmp_path):
    """app.yaml's ``inference`` keys are inference.json keys: the GlaS post-processing gives the bundle's masks."""
    post = {"min_object_size": 1000, "fill_holes": True}  # the 21 x 40 image (840 px) loses its object
    result = run_python(["-m", "monai.bundle", "run", "inference", "--config_file", REPO / "bundle/configs/inference.json",
                         *LEGACY_ARGS, "--input_dir", images, "--backend", "onnx",
                         "--onnx_path", model, "--output_dir", tmp_path / "bundle", "--min_object_size", 1000,
                         "--fill_holes", "true"])
    assert "broken.png" in result.stderr, result.stderr[-3000:]
    expected = read_masks(tmp_path / "bundle")
    loader = ImageFolderLoader(images)
    segmenter = TiledOnnxSegmenter(model, {**LEGACY, **post})
    plain = TiledOnnxSegmenter(model, LEGACY)
    writer = MaskWriter(tmp_path / "app", num_classes=segmenter.num_classes)
    changed = 0
    for image in map(loader.load, loader.paths):
        writer(image, segmenter(image))
        changed += int(not np.array_equal(segmenter(image), plain(image)))
    masks = read_masks(tmp_path / "app")
    assert sorted(masks) == sorted(expected) and len(masks) == 5
    for name in expected:
        assert np.array_equal(masks[name], expected[name]), name
    assert changed > 0, "the post-processing keys changed no mask; the test would not see them ignored"


def test_app_yaml_version_matches_the_bundle():
    version = json.loads((REPO / "bundle/configs/metadata.json").read_text())["version"]
    assert str(yaml.safe_load((APP / "app.yaml").read_text())["application"]["version"]) == version


def test_stage_writes_the_map_source_folder(tmp_path):
    staged = stage_app(tmp_path / "map")
    assert (staged / "__main__.py").read_text() == (APP / "__main__.py").read_text()
    assert (staged / "scripts" / "deploy" / "app" / "compute.py").is_file()
    assert (staged / "bundle" / "configs" / "inference.json").read_text() == (
        REPO / "bundle" / "configs" / "inference.json").read_text()
    assert not list(staged.rglob("__pycache__"))
    requirements = [line for line in (staged / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert all("==" in line for line in requirements)
    assert {"torch==2.14.1", "monai==1.6.1", "monai-deploy-app-sdk==4.0.0"} <= set(requirements)
    assert stage_app(tmp_path / "map") == staged
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not a staged application"):
        stage_app(tmp_path / "other")


def test_application_end_to_end(sdk, model, images, bundle_masks, tmp_path, monkeypatch):
    settings = yaml.safe_load((APP / "app.yaml").read_text())
    settings["inference"] = LEGACY
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("HOLOSCAN_CONFIG_PATH", str(tmp_path / "app.yaml"))
    result = run_python(["-m", "scripts.deploy.app", "-i", images, "-o", tmp_path / "out", "-m", model])
    assert result.returncode != 0, result.stderr[-3000:]
    assert "1 of 6 images" in result.stderr and "broken.png" in result.stderr, result.stderr[-3000:]
    masks = read_masks(tmp_path / "out")
    assert masks.keys() == bundle_masks.keys()
    for name, expected in bundle_masks.items():
        assert np.array_equal(masks[name], expected), name

    missing = tmp_path / "absent.onnx"
    result = run_python(["-m", "scripts.deploy.app", "-i", images, "-o", tmp_path / "out2", "-m", missing])
    assert result.returncode != 0 and str(missing) in result.stderr, result.stderr[-3000:]
    monkeypatch.setenv("HOLOSCAN_MODEL_PATH", str(missing))
    result = run_python(["-m", "scripts.deploy.app", "-i", images, "-o", tmp_path / "out2"])
    assert result.returncode != 0 and f"ONNX model '{missing}' does not exist" in result.stderr, result.stderr[-3000:]


def test_staged_folder_runs_as_in_a_map(sdk, model, images, bundle_masks, tmp_path):
    """The MAP runs ``python3 /opt/holoscan/app`` with paths from HOLOSCAN_* variables and models in sub-folders."""
    staged = stage_app(tmp_path / "map")
    (tmp_path / "models" / "gland").mkdir(parents=True)
    (tmp_path / "models" / "gland" / "model.onnx").write_bytes(model.read_bytes())
    settings = yaml.safe_load((staged / "app.yaml").read_text())
    settings["inference"] = LEGACY
    (staged / "app.yaml").write_text(yaml.safe_dump(settings))
    env = {"PYTHONPATH": "", "HOLOSCAN_CONFIG_PATH": str(staged / "app.yaml"), "HOLOSCAN_INPUT_PATH": str(images),
           "HOLOSCAN_OUTPUT_PATH": str(tmp_path / "out"), "HOLOSCAN_MODEL_PATH": str(tmp_path / "models")}
    result = subprocess.run([sys.executable, str(staged)], cwd=tmp_path, env=subprocess_env(**env), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0 and "broken.png" in result.stderr, result.stderr[-3000:]
    masks = read_masks(tmp_path / "out")
    assert masks.keys() == bundle_masks.keys()
    assert all(np.array_equal(masks[name], expected) for name, expected in bundle_masks.items())
