"""Inference outputs and robustness: flip TTA, probability maps, overlays, small images, unreadable files, images
whose outputs would share a name, outputs that appear complete or not at all."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import SimpleInferer
from PIL import Image

from scripts.errors import ConfigError
from scripts.inference import FlipTTAInferer, SavePredictiond, scan_inputs
from tests.helpers import rgb, save_tiny_model

REPO = Path(__file__).resolve().parent.parent


def test_flip_tta_averages_flipped_back_predictions():
    ramp = torch.arange(6, dtype=torch.float32).view(1, 1, 1, 6)

    def network(x):  # not flip-equivariant: adds a left-to-right ramp
        return x + ramp

    x = torch.rand(1, 1, 4, 6)
    plain = FlipTTAInferer(SimpleInferer(), enabled=False)(x, network)
    torch.testing.assert_close(plain, x + ramp)
    tta = FlipTTAInferer(SimpleInferer(), flips=[(), (3,)])(x, network)
    # the flipped pass returns x + flipped ramp: the average carries the ramp's mean, 2.5, everywhere
    torch.testing.assert_close(tta, x + 2.5)
    both = FlipTTAInferer(SimpleInferer())(x, lambda t: t * 2)
    torch.testing.assert_close(both, x * 2)


def test_folder_with_a_corrupt_and_a_small_image(tmp_path):
    save_tiny_model(tmp_path / "model.pt")
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 12, 3), dtype=np.uint8)).save(images / "tiny.png")  # smaller than the window
    (images / "broken.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(REPO / "bundle/configs/inference.json"),
         "--input_dir", str(images),
         "--ckpt_path", str(tmp_path / "model.pt"), "--output_dir", str(out), "--tta", "true",
         "--save_probabilities", "true", "--save_overlays", "true"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0
    assert f"ERROR: 1 of 3 images in '{images}' could not be read" in result.stderr
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    for stem, size in (("a", (40, 56)), ("tiny", (20, 12))):
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        prob = np.asarray(Image.open(out / f"{stem}_prob.png"))
        assert mask.shape == prob.shape == size
        assert set(np.unique(mask)) <= {0, 255}
        # the mask is the probability map thresholded at one half
        decisive = np.abs(prob.astype(int) - 128) > 2
        assert ((prob > 127) == (mask > 0))[decisive].all()
        assert np.asarray(Image.open(out / f"{stem}_overlay.png")).shape == (*size, 3)
    # every output renamed into place: nothing else, no temporary file, is left in the folder
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}_{kind}.png" for stem in ("a", "tiny")
                                                     for kind in ("mask", "overlay", "prob")]


def test_images_whose_outputs_would_share_a_name_are_refused_before_any_is_read(tmp_path, monkeypatch):
    images = tmp_path / "in"
    for name in ("a.png", "a.jpg", "b.png", "B.tif", "c.png"):
        rgb(images / name)
    monkeypatch.setattr("scripts.inference.inputs.read_image", lambda *a, **k: pytest.fail("an image was read"))
    with pytest.raises(ConfigError) as raised:
        scan_inputs(images)
    message = str(raised.value)
    assert message.startswith(f"Images in '{images}' would write the same output files, one replacing the other:")
    assert "\n  B.tif, b.png -> B_mask.png\n  a.jpg, a.png -> a_mask.png\nRename the images" in message
    assert "c.png" not in message and "nothing was segmented" in message
    # inference.json scans its input folder through the same function, before the engine runs
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle/configs/inference.json"))
    parser["input_dir"] = str(images)
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("inputs")
    assert "a.jpg, a.png -> a_mask.png" in str(raised.value.__cause__ or raised.value)


def test_outputs_appear_complete_or_not_at_all(tmp_path, monkeypatch):
    source = tmp_path / "tile.png"
    rgb(source, 8, 8, 120)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tile_mask.png").write_bytes(b"the mask of an earlier run")
    image = MetaTensor(torch.zeros(3, 8, 8), meta={"filename_or_obj": str(source)})
    pred = torch.zeros(1, 8, 8)
    pred[0, 2:6, 3:7] = 1
    data = {"image": image, "pred": pred, "prob": torch.cat([1 - pred, pred])}
    save = SavePredictiond(output_dir=str(out), scale=255, probability_key="prob", overlay=True)

    def cut_short(self, fp, *args, **kwargs):  # half a file is written, then the disk is full
        Path(fp).write_bytes(b"\x89PNG\r\n half")
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", cut_short)
        with pytest.raises(OSError, match="No space left"):
            save(data)
    assert [p.name for p in out.iterdir()] == ["tile_mask.png"]  # no half-written file, under any name
    assert (out / "tile_mask.png").read_bytes() == b"the mask of an earlier run"
    save(data)
    assert sorted(p.name for p in out.iterdir()) == ["tile_mask.png", "tile_overlay.png", "tile_prob.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "tile_mask.png")), pred[0].numpy() * 255)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "tile_prob.png")), pred[0].numpy() * 255)
    assert np.asarray(Image.open(out / "tile_overlay.png")).shape == (8, 8, 3)


def test_scaled_inferer_runs_at_the_scale_and_returns_the_input_size():
    from scripts.inference import ScaledInferer

    seen = []

    def network(x):  # records the size it sees; a per-pixel function of the image
        seen.append(tuple(x.shape[-2:]))
        return torch.cat([x[:, :1], 1.0 - x[:, :1]], dim=1)

    x = torch.full((1, 3, 40, 60), 0.25)
    out = ScaledInferer(SimpleInferer(), scale=0.5)(x, network)
    assert seen == [(20, 30)] and out.shape == (1, 2, 40, 60)
    torch.testing.assert_close(out, torch.cat([x[:, :1], 1.0 - x[:, :1]], dim=1))  # a flat image stays flat
    torch.testing.assert_close(ScaledInferer(SimpleInferer(), scale=1.0)(x, network), network(x))
    with pytest.raises(ValueError, match="image_scale=0"):
        ScaledInferer(SimpleInferer(), scale=0)


# ------------------------------------------------------------------------------------------ amp on the CPU
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_scaled_inferer_autocasts_the_network_and_returns_float32(scale):
    """With ``autocast`` the network's convolutions run in bfloat16 (on the CPU here); the inferer hands back float32
    logits, resized in float32, and close to float32's."""
    from monai.inferers import SlidingWindowInferer

    from scripts.inference import ScaledInferer

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    seen = []

    def network(x):
        out = conv(x)
        seen.append(out.dtype)
        return out

    x = torch.rand(1, 3, 64, 48)
    window = SlidingWindowInferer((16, 16), sw_batch_size=2, overlap=0.25, mode="gaussian")
    plain = ScaledInferer(window, scale=scale)(x, network)
    assert set(seen) == {torch.float32}
    seen.clear()
    halved = ScaledInferer(window, scale=scale, autocast=torch.bfloat16)(x, network)
    assert set(seen) == {torch.bfloat16} and halved.dtype == torch.float32
    from scripts.inference.scale import rescale_image

    with torch.autocast("cpu", dtype=torch.bfloat16):  # the network's windows; blending and resizing in float32
        by_hand = window(rescale_image(x, scale), network).float()
    by_hand = torch.nn.functional.interpolate(by_hand, size=(64, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(halved, by_hand)
    assert not torch.equal(halved, plain)
    torch.testing.assert_close(halved, plain, atol=0.05, rtol=0.05)


def test_amp_on_the_cpu_needs_native_bfloat16(monkeypatch):
    """``amp`` on the CPU is bfloat16 where the CPU computes it; without AVX512-BF16 / AMX, or in float16, it is
    refused with the key to change; off, or with the ONNX backend, the network runs as it is."""
    import scripts.inference.precision as precision
    from scripts.errors import ConfigError

    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda: True)
    assert precision.autocast_dtype(True, "bfloat16", "cpu") == torch.bfloat16
    assert precision.autocast_dtype("true", "float16", "cuda") == torch.float16
    assert precision.autocast_dtype(False, "bfloat16", "cpu") is None
    assert precision.autocast_dtype(True, "bfloat16", "cpu", backend="onnx") is None
    with pytest.raises(ConfigError, match=r"'amp' on the CPU runs in bfloat16 only.*--amp_dtype bfloat16"):
        precision.autocast_dtype(True, "float16", "cpu")
    for wrong in ("half_precision", "float32"):
        with pytest.raises(ConfigError, match=rf"'amp_dtype' is '{wrong}'; autocast runs in 'bfloat16' or 'float16'"):
            precision.autocast_dtype(True, wrong, "cuda")
    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda: False)
    with pytest.raises(ConfigError, match=r"neither AVX512-BF16 nor AMX.*--amp false"):
        precision.autocast_dtype(True, "bfloat16", "cpu")
    assert precision.autocast_dtype(True, "bfloat16", "cuda") == torch.bfloat16


def test_inference_config_refuses_amp_on_a_cpu_without_bfloat16(monkeypatch):
    import scripts.inference.precision as precision
    from scripts.errors import ConfigError

    from scripts.paths import config_path
    from tests.helpers import tiny_record

    parser = ConfigParser()
    parser.read_config([str(config_path("inference.json"))])
    parser.update({"amp": True, "device": "$torch.device('cpu')", "model_settings": tiny_record()})
    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda: True)
    assert parser.get_parsed_content("inferer").autocast == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda: False)
    parser.parse(reset=True)
    with pytest.raises(RuntimeError) as raised:  # MONAI's config reader wraps the error it met
        parser.get_parsed_content("inferer")
    assert isinstance(raised.value.__cause__, ConfigError) and "neither AVX512-BF16" in str(raised.value.__cause__)


# ------------------------------------------------------------------------------------------ batch norms folded
def test_folded_batch_norms_compute_the_same_network_and_leave_it_as_it_was():
    """The folded view of a trained-looking network (batch norm statistics far from 0 / 1) gives the same logits
    with no batch norm left after a convolution; the network keeps its modules, keys and weights, and shares every
    weight that was not folded."""
    from scripts.inference.fused import fold_batch_norms
    from tests.helpers import tiny_network

    network = tiny_network()
    generator = torch.Generator().manual_seed(1)
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) >= 10
    for norm in norms:  # statistics and affine terms as training leaves them
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator))
        norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) * 3 + 0.1)
        norm.weight.data.copy_(torch.randn(norm.num_features, generator=generator))
        norm.bias.data.copy_(torch.randn(norm.num_features, generator=generator))
    keys = {k: v.clone() for k, v in network.state_dict().items()}
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        expected = network(x)
        folded = fold_batch_norms(network)
        got = folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert network.state_dict().keys() == keys.keys()
    assert all(torch.equal(network.state_dict()[k], v) for k, v in keys.items())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules()) == len(norms)
    assert folded.encoder is network.encoder  # untouched parts are shared, not copied
    assert fold_batch_norms(network.encoder) is network.encoder  # nothing to fold: the module itself
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(network.train())


def test_only_plain_convolution_batch_norm_pairs_are_folded():
    """A batch norm subclass that does more (timm's BatchNormAct2d), a Sequential with its own forward, or a layer
    between the two is left as it is; hooks put on the view do not reach the network."""
    from timm.layers import BatchNormAct2d

    from scripts.inference.fused import fold_batch_norms

    class Reordered(torch.nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x).flip(-1))

    torch.manual_seed(0)
    kept = [
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=torch.nn.ReLU)),
        Reordered(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)),
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4)),
    ]
    for module in kept:
        assert fold_batch_norms(module.eval()) is module
    network = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)),
                                  torch.nn.ReLU()).eval()
    view = fold_batch_norms(network)
    assert view is not network and view[1] is network[1] and isinstance(view[0][1], torch.nn.Identity)
    fired = []
    view.register_forward_hook(lambda *args: fired.append("view"))
    view[0].register_forward_hook(lambda *args: fired.append("view[0]"))
    with torch.no_grad():
        network(torch.zeros(1, 3, 8, 8))
        assert fired == []
        view(torch.zeros(1, 3, 8, 8))
    assert fired == ["view[0]", "view"]


def test_pipeline_segments_with_folded_batch_norms(tmp_path):
    """MONAI Label and the Deploy app segment through InferencePipeline: its network is the folded view of the
    trained weights, and its probabilities are the unfolded network's."""
    from scripts.inference import InferencePipeline
    from scripts.inference.scale import rescale_image
    from tests.helpers import save_tiny_model, tiny_network

    network = tiny_network()
    for module in network.modules():  # statistics as training leaves them, so folding changes the weights
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    path = save_tiny_model(tmp_path / "model.pt", network=network)
    pipeline = InferencePipeline(path, device="cpu", overrides={"sw_overlap": 0.0})
    parts = pipeline.parts()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in parts["network"].modules())
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        got = parts["inferers"][False](image, parts["network"])
        expected = network.eval()(rescale_image(image, 1.0))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
