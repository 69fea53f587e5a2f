"""Inference outputs and robustness: flip TTA, probability maps, overlays, small images, unreadable files."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import SimpleInferer
from PIL import Image

from scripts.inference import FlipTTAInferer
from tests.helpers import tiny_network

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
    torch.save({"model": tiny_network().state_dict()}, tmp_path / "model.pt")
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
         "--encoder_name", "vit_tiny", "--encoder_kwargs", "{'depth': 1}", "--skip_channels", "[16,8,8]",
         "--decoder_channels", "[16,16,8,8]", "--roi_size", "[32,32]", "--input_dir", str(images),
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
    assert not (out / "broken_mask.png").exists()


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
