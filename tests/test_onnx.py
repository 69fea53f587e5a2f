"""ONNX and TorchScript export: dynamic sizes, parity with PyTorch, weights in an external data file, the ONNX
Runtime backend of inference.json, MONAI's export commands, clear errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.deploy import OnnxSegmenter, check_onnx_parity, export_onnx
from scripts.errors import ConfigError
from scripts.networks import UNITransUNet, stored_record
from tests.helpers import LEGACY_OVERRIDES, NET_ARGS, run_python, tiny_network, tiny_record

REPO = Path(__file__).resolve().parent.parent
INFERENCE = REPO / "bundle" / "configs" / "inference.json"
# The tiny network's keys and window for its model.pt and ONNX file exported without a record, as older versions
# wrote them: inference takes them from model_overrides.
LEGACY = ["--model_overrides", json.dumps(LEGACY_OVERRIDES)]
# The record of tiny_network() as training writes it into model.pt.
TINY_RECORD = tiny_record(roi_size=[64, 64])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """tiny_network() saved with its record as other.pt, and a bundle root laid out as the repository whose
    models/model.pt records another network (what the main job leaves there): MONAI's export commands given
    ``--ckpt_file other.pt`` must build other.pt's network, not that one."""
    folder = tmp_path_factory.mktemp("recorded")
    network = tiny_network()
    torch.save({"model": network.state_dict(), "config": TINY_RECORD}, folder / "other.pt")
    torch.manual_seed(1)
    record = {**TINY_RECORD, "encoder_kwargs": {"depth": 2}, "skip_channels": [32, 16, 8], "embed_dim": 16,
              "roi_size": [96, 96]}
    main_job = UNITransUNet(out_channels=2, encoder_name="vit_tiny", encoder_kwargs={"depth": 2},
                            skip_channels=(32, 16, 8), decoder_channels=(16, 16, 8, 8), embed_dim=16)
    (folder / "bundle" / "models").mkdir(parents=True)
    torch.save({"model": main_job.state_dict(), "config": record}, folder / "bundle" / "models" / "model.pt")
    return network, folder


def assert_same_logits(model, network, shapes, tolerance=1e-4):
    """``model`` (exported) gives ``network``'s logits at every shape."""
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected, got = network(x), model(x)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= tolerance, shape


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny network saved as model.pt and exported through the project CLI, which leaves no file behind in
    the temporary folder nor beside the model."""
    folder, scratch = tmp_path_factory.mktemp("onnx"), tmp_path_factory.mktemp("tmpdir")
    network = tiny_network()
    torch.save({"model": network.state_dict()}, folder / "model.pt")
    result = run_python(["-m", "scripts.cli", "export-onnx", "--ckpt", folder / "model.pt", "--out", folder / "model.onnx",
                  "--example_size", "[2,3,64,96]", *NET_ARGS], env={"TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in scratch.iterdir() if p.stat().st_size > 4096] == []  # no weights left in TMPDIR
    assert sorted(p.name for p in folder.iterdir()) in (["model.onnx", "model.pt"],
                                                        ["model.onnx", "model.onnx.data", "model.pt"])
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
                      *LEGACY, "--input_dir", images, "--backend", backend,
                      "--ckpt_path", folder / "model.pt", "--onnx_path", folder / "model.onnx", "--output_dir", out])
        assert result.returncode == 0, result.stderr[-3000:]
        masks[backend] = {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*_mask.png"))}
    assert masks["pytorch"].keys() == masks["onnx"].keys() and len(masks["onnx"]) == 2
    for name, mask in masks["pytorch"].items():
        assert (mask == masks["onnx"][name]).mean() > 0.999


def test_sessions_do_not_spin_between_runs(exported):
    """ONNX Runtime's CPU threads sleep when a run ends, so the Python work between runs gets the cores."""
    _, folder = exported
    segmenter = OnnxSegmenter(folder / "model.onnx", num_classes=2, providers=["CPUExecutionProvider"])
    options = segmenter.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


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


def test_monai_bundle_onnx_export_builds_the_network_of_ckpt_file(recorded, tmp_path):
    """No network overrides: the network comes from the record of --ckpt_file, not from the bundle's model.pt."""
    network, folder = recorded
    scratch = tmp_path / "tmp"  # MONAI's export leaves tmp<random>.data in the temporary folder (see docs/deploy.md)
    scratch.mkdir()
    result = run_python(["-m", "monai.bundle", "onnx_export", "network_def", "--filepath", tmp_path / "monai.onnx",
                         "--ckpt_file", folder / "other.pt", "--key_in_ckpt", "model", "--config_file", INFERENCE,
                         "--bundle_root", folder / "bundle", "--input_shape", "[2,3,64,64]", "--use_trace", "true",
                         "--converter_kwargs",
                         "{'dynamo': True, 'dynamic_axes': {'x': {0: 'batch', 2: 'height', 3: 'width'}}}"],
                        env={"TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr[-3000:]
    segmenter = OnnxSegmenter(tmp_path / "monai.onnx", num_classes=2, providers=["CPUExecutionProvider"])
    assert_same_logits(segmenter, network, [(2, 3, 64, 64), (1, 3, 96, 32)])


def test_monai_bundle_ckpt_export_traces_a_torchscript_model_for_every_size(recorded, tmp_path):
    network, folder = recorded
    result = run_python(["-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", tmp_path / "model.ts",
                         "--ckpt_file", folder / "other.pt", "--key_in_ckpt", "model", "--config_file", INFERENCE,
                         "--bundle_root", folder / "bundle", "--input_shape", "[2,3,64,64]", "--use_trace", "true"])
    assert result.returncode == 0, result.stderr[-3000:]
    traced = torch.jit.load(str(tmp_path / "model.ts"))
    # another batch, a non-square size, and the encoder's native 224 x 224 grid, where timm takes another branch
    assert_same_logits(traced, network, [(2, 3, 64, 64), (1, 3, 96, 32), (3, 3, 224, 224)], tolerance=1e-5)


def test_ckpt_path_is_the_file_monai_export_commands_load(tmp_path, monkeypatch):
    from scripts.deploy import export_checkpoint

    main = str(Path(__import__("monai").__file__).parent / "bundle" / "__main__.py")  # sys.argv[0] of monai.bundle
    config = ["--config_file", str(INFERENCE)]
    default = str(tmp_path / "bundle" / "models" / "model.pt")
    monkeypatch.chdir(tmp_path)
    onnx_export = [main, "onnx_export", "network_def", "--ckpt_file", "/a/x.pt", *config]
    assert export_checkpoint(default, onnx_export) == "/a/x.pt"
    assert export_checkpoint(default, [main, "trt_export", "--ckpt_file=/a/y.pt", *config]) == "/a/y.pt"
    args_file = tmp_path / "args.json"
    args_file.write_text('{"ckpt_file": "/a/z.pt"}')
    assert export_checkpoint(default, [main, "ckpt_export", "--args_file", str(args_file), *config]) == "/a/z.pt"
    # ckpt_export's own default: models/model.pt under the working folder, or under --bundle_root (then the config's)
    assert export_checkpoint(default, [main, "ckpt_export", *config]) == str(tmp_path / "models" / "model.pt")
    assert export_checkpoint(default, [main, "ckpt_export", "--bundle_root", "b", *config]) == default
    # every other command and process keeps the config's file
    assert export_checkpoint(default, [main, "run", "inference", *config]) == default
    assert export_checkpoint(default, ["pytest", "onnx_export", "--ckpt_file", "/a/x.pt"]) == default


def test_scripting_and_a_trace_at_the_native_size_are_refused_with_what_works():
    network = tiny_network()
    with pytest.raises(ConfigError, match=r"cannot be compiled with torch.jit.script.*--use_trace true --input_shape "
                                          r"\"\[1,3,256,256\]\""):
        torch.jit.script(network)
    with pytest.raises(ConfigError, match=r"Tracing at 224x224, the encoder's native size, .* e.g. --input_shape"):
        torch.jit.trace(network, torch.randn(1, 3, 224, 224))


def test_weights_in_an_external_data_file(tmp_path):
    """The large-model layout, forced on a tiny model: parity, the record, the ONNX Runtime backend, moving the
    pair, a missing data file, and a later export without data file removing the old one."""
    from scripts.inference import InferencePipeline

    network = tiny_network()
    out = tmp_path / "models" / "model.onnx"
    export_onnx(network, out, example_size=(2, 3, 64, 64), record=TINY_RECORD, external_data_threshold=0)
    data = out.with_name("model.onnx.data")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]  # nothing temporary left
    assert data.stat().st_size > sum(t.numel() * t.element_size() for t in network.state_dict().values()) // 2
    assert out.stat().st_size < data.stat().st_size // 10  # the weights are in the data file
    assert stored_record(out) == TINY_RECORD
    assert check_onnx_parity(network, out, [(1, 3, 96, 32), (3, 3, 64, 128)]) <= 1e-4

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(out, moved / "renamed.onnx")  # the .onnx may be renamed; its data file keeps its name
    shutil.move(data, moved / data.name)
    image = torch.randint(0, 256, (3, 64, 96)).float()
    torch.save({"model": network.state_dict(), "config": TINY_RECORD}, tmp_path / "model.pt")
    expected = InferencePipeline(tmp_path / "model.pt", device="cpu").segment_tensor(image)
    mask = InferencePipeline(moved / "renamed.onnx", backend="onnx", device="cpu").segment_tensor(image)
    assert mask.shape == (64, 96) and (np.asarray(mask) == np.asarray(expected)).mean() > 0.999

    (moved / data.name).rename(tmp_path / data.name)
    with pytest.raises(ConfigError, match=r"keeps its weights in model.onnx.data, which is not in its folder .* move "
                                          r"the data file together with the .onnx"):
        OnnxSegmenter(moved / "renamed.onnx", num_classes=2)

    export_onnx(network, out, example_size=(2, 3, 64, 64), record=TINY_RECORD, external_data_threshold=0)
    export_onnx(network, out, example_size=(2, 3, 64, 64), record=TINY_RECORD)  # small: one file, the old data goes
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]
    assert check_onnx_parity(network, out, [(1, 3, 96, 32)]) <= 1e-4


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


def test_export_help_prints_the_options_and_exports_nothing(tmp_path):
    """export-onnx takes ``--key value`` config keys, so ``--help`` must reach fire's help, not the export."""
    from scripts.cli import fire_arguments

    assert fire_arguments(["export-onnx", "--help"]) == ["export-onnx", "--", "--help"]
    assert fire_arguments(["export-onnx", "--out", "m.onnx"]) == ["export-onnx", "--out", "m.onnx"]
    result = run_python(["-m", "scripts.cli", "export-onnx", "--help"], cwd=tmp_path, env={"PAGER": "cat"})
    assert result.returncode == 0, result.stderr[-2000:]
    shown = result.stdout + result.stderr  # fire prints its help on stderr
    assert "cli export-onnx" in shown and "--int8_max_dice_loss" in shown
    assert "Checkpoint" not in shown and list(tmp_path.iterdir()) == []
