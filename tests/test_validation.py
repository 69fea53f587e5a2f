"""Input validation before training: every problem of a datalist in one report, or dropped on request."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.data import checked_datalist
from scripts.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path.name


@pytest.fixture
def broken(tmp_path):
    """A datalist with one sound entry per section and one of each problem."""
    rgb = np.zeros((16, 20, 3), np.uint8)
    mask = np.zeros((16, 20), np.uint8)
    png(tmp_path / "ok.png", rgb), png(tmp_path / "ok_mask.png", mask)
    png(tmp_path / "u.png", rgb), png(tmp_path / "v.png", rgb), png(tmp_path / "v_mask.png", mask)
    (tmp_path / "corrupt.png").write_bytes(b"not an image at all")
    png(tmp_path / "small.png", rgb), png(tmp_path / "small_mask.png", np.zeros((8, 8), np.uint8))
    colour = np.zeros((16, 20, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    png(tmp_path / "colour.png", rgb), png(tmp_path / "colour_mask.png", colour)
    datalist = {
        "training": [
            {"image": "ok.png", "label": "ok_mask.png"},
            {"image": "corrupt.png", "label": "ok_mask.png"},
            {"image": "small.png", "label": "small_mask.png"},
            {"image": "colour.png", "label": "colour_mask.png"},
            {"image": "gone.png", "label": "ok_mask.png"},
        ],
        "unlabeled": [{"image": "u.png"}, {"image": "ok.png"}],
        "validation": [{"image": "v.png", "label": "v_mask.png"}],
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    return path


def test_every_problem_in_one_report(broken):
    with pytest.raises(ConfigError) as err:
        checked_datalist(broken)
    message = str(err.value)
    assert "has 5 invalid entries" in message
    assert "cannot read" in message and "corrupt.png" in message
    assert "small_mask.png is 8x8 but its image" in message and "is 20x16" in message
    assert "colour_mask.png is a colour image" in message
    assert "gone.png not found" in message
    assert "[unlabeled]" in message and "ok.png is listed twice (also in 'training')" in message
    assert "drop_invalid" in message


def test_drop_invalid_keeps_the_sound_entries_and_says_which(broken, caplog):
    with caplog.at_level(logging.WARNING):
        sections = checked_datalist(broken, drop_invalid=True)
    assert [Path(e["image"]).name for e in sections["training"]] == ["ok.png"]
    assert [Path(e["image"]).name for e in sections["unlabeled"]] == ["u.png"]
    assert len(sections["validation"]) == 1
    assert "Dropped 5 invalid entries" in caplog.text and "corrupt.png" in caplog.text


def test_multiclass_mask_values_outside_the_classes(tmp_path):
    png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    png(tmp_path / "a_mask.png", np.array([[0, 1, 2, 5]] * 4, np.uint8))
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "a.png", "label": "a_mask.png"}],
                                                 "validation": [{"image": "a.png", "label": "a_mask.png"}]}))
    with pytest.raises(ConfigError, match=r"values \[5\] outside the class indices 0..2"):
        checked_datalist(tmp_path / "d.json", sections=["training"], num_classes=3, require_unlabeled=False)


def test_semi_supervised_needs_unlabeled_images(tmp_path):
    png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8)), png(tmp_path / "m.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "a.png", "label": "m.png"}],
                                                 "validation": [{"image": "a.png", "label": "m.png"}]}))
    with pytest.raises(ConfigError, match="needs unlabeled images.*'supervised'"):
        checked_datalist(tmp_path / "d.json", sections=["training", "unlabeled"])
    sections = checked_datalist(tmp_path / "d.json", sections=["training", "unlabeled"], require_unlabeled=False)
    assert sections["unlabeled"] == []


def test_training_run_stops_before_it_starts(broken, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(REPO / "bundle/configs/train.json"),
         "--datalist", str(broken), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "runs"),
         "--encoder_name", "vit_tiny", "--encoder_kwargs", "{'depth': 1}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0
    assert f"ERROR: Datalist '{broken}' has 5 invalid entries" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "models" / "checkpoint.pt").exists()
