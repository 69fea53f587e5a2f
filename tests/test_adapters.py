"""Data-set adapters on small fake copies of each layout built in a temporary folder."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.data import load_datalist
from scripts.data.adapters import glas_datalist
from scripts.data.adapters.common import split_counts, stratified_pick
from scripts.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def fake_glas(root: Path, n_train=20, n_test_a=3, n_test_b=2, suffix=".bmp"):
    """GlaS layout: instance-id annotations, Grade.csv with the official header; 8 benign, 12 malignant."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    for subset, count in (("train", n_train), ("testA", n_test_a), ("testB", n_test_b)):
        for i in range(1, count + 1):
            name = f"{subset}_{i}"
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / f"{name}{suffix}")
            anno = np.zeros((24, 32), np.uint8)
            anno[2:8, 2:8], anno[12:20, 10:20] = 1, 2  # two glands, one id each
            Image.fromarray(anno).save(root / f"{name}_anno{suffix}")
            grade = "benign" if i <= (8 if subset == "train" else 1) else "malignant"
            rows.append(f"{name},{i}, {grade}, x")
    (root / "Grade.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("suffix", [".bmp", ".png"])
def test_glas_splits_counts_strata_and_paths(tmp_path, suffix):
    root = fake_glas(tmp_path / "GlaS", suffix=suffix)
    path = glas_datalist(root, tmp_path / "out" / "datalist.json", labeled_ratio=0.25, validation_ratio=0.2, seed=3)
    content = json.loads(path.read_text())
    counts = {k: len(content[k]) for k in ("training", "unlabeled", "validation", "test")}
    assert counts == {"training": 4, "unlabeled": 12, "validation": 4, "test": 5}
    # 8 benign / 12 malignant: validation 4 -> 2 benign (1.6 rounds up by largest remainder), 2 malignant
    assert Counter(e["grade"] for e in content["validation"]) == {"benign": 2, "malignant": 2}
    names = [Path(e["image"]).stem for k in ("training", "unlabeled", "validation") for e in content[k]]
    assert len(names) == len(set(names)) == 20  # every training image once, none lost
    assert {e["subset"] for e in content["test"]} == {"testA", "testB"}
    assert all("label" not in e for e in content["unlabeled"])
    # relative paths resolve through the datalist's folder
    entries = load_datalist(path, None, "training")
    assert all(os.path.isfile(e["image"]) and e["label"].endswith(f"_anno{suffix}") for e in entries)


def test_glas_is_deterministic_and_seed_dependent(tmp_path):
    root = fake_glas(tmp_path / "GlaS")
    a = glas_datalist(root, tmp_path / "a.json", seed=0).read_text()
    b = glas_datalist(root, tmp_path / "b.json", seed=0).read_text()
    c = glas_datalist(root, tmp_path / "c.json", seed=1).read_text()
    assert a == b and a != c


def test_glas_counts_instead_of_ratios(tmp_path):
    root = fake_glas(tmp_path / "GlaS")
    content = json.loads(glas_datalist(root, tmp_path / "d.json", labeled_count=3, validation_count=5).read_text())
    assert (len(content["training"]), len(content["validation"]), len(content["unlabeled"])) == (3, 5, 12)


def test_glas_problems_are_listed(tmp_path):
    root = fake_glas(tmp_path / "GlaS")
    (root / "train_3_anno.bmp").unlink()
    (root / "train_4.bmp").unlink()
    with pytest.raises(ConfigError, match="2 problem") as err:
        glas_datalist(root, tmp_path / "e.json")
    assert "train_3.bmp: no annotation" in str(err.value) and "train_4_anno.bmp: annotation without its image" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        glas_datalist(tmp_path / "nowhere", tmp_path / "f.json")


def test_glas_cli(tmp_path):
    root = fake_glas(tmp_path / "GlaS", n_train=10)
    out = tmp_path / "cli.json"
    result = subprocess.run([sys.executable, "-m", "scripts.cli", "prepare", "glas", "--root", str(root),
                             "--labeled_ratio", "0.2", "--seed", "0", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(json.loads(out.read_text())["training"]) == 2  # 20% of the 8 left after 2 validation images


def test_split_helpers():
    assert split_counts([8, 12], 4) == [2, 2] and split_counts([8, 12], 5) == [2, 3] and split_counts([1, 1], 1) == [1, 0]
    names = [f"n{i}" for i in range(10)]
    picked = stratified_pick(names, ["a"] * 5 + ["b"] * 5, 4, seed=0)
    assert len(picked) == 4 and sum(p in names[:5] for p in picked) == 2
