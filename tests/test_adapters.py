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
from tests.helpers import fake_ebhi, fake_glas, fake_kpi, grey, rgb

REPO = Path(__file__).resolve().parent.parent




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








def test_ebhi_presets_classes_and_unlabeled_report(tmp_path, caplog):
    from scripts.data.adapters import ebhi_datalist

    root = fake_ebhi(tmp_path / "EBHI")
    with caplog.at_level("WARNING"):
        gland = json.loads(ebhi_datalist(root, tmp_path / "g.json", "ebhi_gland", labeled_ratio=0.5, seed=0).read_text())
    assert "1 EBHI-SEG image(s) have no label" in caplog.text and "Polyp/image/GT3.png" in caplog.text
    all_entries = [e for k in ("training", "unlabeled", "validation", "test") for e in gland[k]]
    assert len(all_entries) == 50 and {e["class"] for e in all_entries} == {"Normal", "Polyp", "Low-grade IN", "High-grade IN", "Serrated adenoma"}
    assert len(gland["test"]) == 10 and Counter(e["class"] for e in gland["test"]) == {c: 2 for c in {e["class"] for e in all_entries}}
    assert any(e["image"].endswith("Polyp/image/GT3.png") for e in gland["unlabeled"])
    cancer = json.loads(ebhi_datalist(root, tmp_path / "c.json", "ebhi_cancer", seed=0).read_text())
    assert {e["class"] for k in ("training", "test") for e in cancer[k]} == {"Adenocarcinoma"}
    with pytest.raises(ConfigError, match="lacks class folder"):
        ebhi_datalist(tmp_path, tmp_path / "x.json")




@pytest.mark.parametrize("rule,expected_size,pieces", [("downsample", 16, 1), ("tile", 32, 4)])
def test_kpi_rules_splits_and_masks(tmp_path, rule, expected_size, pieces):
    from scripts.data.adapters import kpi_datalist

    root = fake_kpi(tmp_path / "KPI")
    path = kpi_datalist(root, tmp_path / "out" / "kpi.json", rule=rule, factor=4, tile_size=32, labeled_count=2, seed=0)
    content = json.loads(path.read_text())
    counts = {k: len(content[k]) for k in ("training", "unlabeled", "validation", "test")}
    assert counts == {"training": 2 * pieces, "unlabeled": 6 * pieces, "validation": 4 * pieces, "test": 4 * pieces}
    assert {e["model"] for e in content["training"]} == {"DN", "normal"}  # stratified by disease model
    entry = load_datalist(path, None, "validation")[0]
    mask = np.asarray(Image.open(entry["label"]))
    assert Image.open(entry["image"]).size == (expected_size, expected_size)
    assert set(np.unique(mask)) <= {0, 255}
    if rule == "downsample":
        assert (mask == 255).sum() == 8 * 8  # the 32x32 square at a quarter size; the faint square is dropped


def test_folder_and_csv_layouts(tmp_path):
    from scripts.data.adapters import csv_datalist, folder_datalist

    root = tmp_path / "lab"
    for i in range(10):
        rgb(root / "images" / f"s{i}.png"), grey(root / "masks" / f"s{i}.tif", np.zeros((16, 16)))
    for i in range(3):
        rgb(root / "unlabeled" / f"u{i}.jpg")
    content = json.loads(folder_datalist(root, tmp_path / "f.json", validation_ratio=0.2, test_ratio=0.1).read_text())
    assert {k: len(content[k]) for k in ("training", "unlabeled", "validation", "test")} == {
        "training": 7, "unlabeled": 3, "validation": 2, "test": 1}
    (root / "images" / "orphan.png").write_bytes((root / "images" / "s0.png").read_bytes())
    with pytest.raises(ConfigError, match="orphan.png: no mask named orphan"):
        folder_datalist(root, tmp_path / "g.json")

    table = tmp_path / "list.csv"
    lines = ["image,label,split"] + [f"lab/images/s{i}.png,lab/masks/s{i}.tif," for i in range(8)]
    lines += ["lab/images/s8.png,lab/masks/s8.tif,test", "lab/unlabeled/u0.jpg,,", "lab/unlabeled/u1.jpg,,unlabeled"]
    table.write_text("\n".join(lines) + "\n")
    content = json.loads(csv_datalist(table, tmp_path / "c.json", labeled_ratio=0.5, validation_ratio=0.25).read_text())
    assert {k: len(content[k]) for k in ("training", "unlabeled", "validation", "test")} == {
        "training": 3, "unlabeled": 5, "validation": 2, "test": 1}
    table.write_text("image,label,split\nlab/images/s0.png,,validation\n")
    with pytest.raises(ConfigError, match="line 2: split 'validation' needs a label"):
        csv_datalist(table, tmp_path / "d.json")


@pytest.mark.parametrize("preset", ["glas", "ebhi_gland", "ebhi_cancer", "kpi"])
def test_dataset_presets_merge_over_train_json(preset):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundle/configs/train.json"), str(REPO / f"bundle/configs/datasets/{preset}.json")])
    assert len(parser["class_descriptions"]) == parser["num_classes"] == len(parser["class_names"])
    assert all(side % 16 == 0 for side in parser["roi_size"])
    assert parser["label_threshold"] == (127 if preset.startswith("ebhi") else 0)


def test_seeded_splits_hold_out_in_order_and_stratify():
    from scripts.data.adapters.common import report_problems, seeded_splits, stratified_pick
    from scripts.errors import ConfigError

    names = [f"n{i}" for i in range(40)]
    groups = ["a"] * 30 + ["b"] * 10
    split = seeded_splits(names, groups, 7, test=(0.25, None), validation=(None, 6), labeled=(0.5, None))
    test, validation, labeled = map(set, (split["test"], split["validation"], split["labeled"]))
    assert (len(test), len(validation), len(labeled)) == (10, 6, 12)  # 25 % of 40, a count, half of the 24 left
    assert not test & validation and split["pool"] == [n for n in names if n not in test | validation]
    assert labeled <= set(split["pool"])
    assert sum(n in test for n in names[30:]) == 2  # 10 in proportion to 30 : 10, the tie to the first group
    assert split["test"] == stratified_pick(names, groups, 10, 7)  # each step takes the next seed: test 7, ...
    rest = [n for n in names if n not in test]
    assert split["validation"] == stratified_pick(rest, [groups[names.index(n)] for n in rest], 6, 8)
    assert seeded_splits(names, groups, 7, test=(0.25, None), validation=(None, 6), labeled=(0.5, None)) == split
    assert seeded_splits(names, groups, 7, test=(None, None), validation=(0.1, None))["test"] == []  # no test split
    with pytest.raises(ConfigError, match=r"No labeled training images are left \(40 images, 0 held out"):
        seeded_splits(names, groups, 0, labeled=(0.0, None))
    report_problems("Folder 'x'", [])
    with pytest.raises(ConfigError, match=r"(?s)Folder 'x' has 25 problem\(s\):\n  p0\n.*\n  p19\n  \.\.\. and 5 more$"):
        report_problems("Folder 'x'", [f"p{i}" for i in range(25)])
