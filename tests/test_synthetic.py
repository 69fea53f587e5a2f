"""Tests of the synthetic H&E demo data generator (`scripts.data.synthetic`)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from scripts.errors import ConfigError
from scripts.data.synthetic import (
    GENERATOR_VERSION,
    ensure_demo_dataset,
    generate_demo_dataset,
    synthesize_tile,
)

SMALL = {"n_labeled": 2, "n_unlabeled": 3, "n_validation": 1, "n_test": 2, "image_size": (96, 128)}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _tiles(n: int, seed: int = 123, size: tuple[int, int] = (256, 256)) -> list[tuple[np.ndarray, np.ndarray]]:
    return [synthesize_tile(np.random.default_rng([seed, i]), size) for i in range(n)]


@pytest.fixture(scope="module")
def tiles() -> list[tuple[np.ndarray, np.ndarray]]:
    return _tiles(16)


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    generate_demo_dataset(tmp_path / "a", seed=5, **SMALL)
    generate_demo_dataset(tmp_path / "b", seed=5, **SMALL)
    generate_demo_dataset(tmp_path / "c", seed=6, **SMALL)
    a, b, c = (_hashes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if "/images/" in k]
    assert images and all(a[k] != c[k] for k in images)


def test_splits_do_not_depend_on_each_others_sizes(tmp_path):
    generate_demo_dataset(tmp_path / "a", seed=1, n_labeled=2, n_unlabeled=1, n_validation=1, n_test=0,
                          image_size=(64, 64))
    generate_demo_dataset(tmp_path / "b", seed=1, n_labeled=3, n_unlabeled=4, n_validation=2, n_test=1,
                          image_size=(64, 64))
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    for key in ("labeled/images/demo_0001.png", "labeled/masks/demo_0001.png", "unlabeled/images/demo_0000.png",
                "validation/images/demo_0000.png"):
        assert a[key] == b[key], key


def test_synthesize_tile_is_a_function_of_the_rng_state():
    (im1, m1), (im2, m2) = (synthesize_tile(np.random.default_rng(7), (80, 100)) for _ in range(2))
    assert np.array_equal(im1, im2) and np.array_equal(m1, m2)
    assert im1.shape == (80, 100, 3) and im1.dtype == np.uint8
    assert m1.shape == (80, 100) and m1.dtype == np.uint8


# ------------------------------------------------------------------------------------------------ layout


def test_datalist_structure_and_files(tmp_path):
    root = tmp_path / "demo"
    datalist_path = generate_demo_dataset(root, seed=0, **SMALL)
    assert datalist_path == root / "datalist.json"
    datalist = json.loads(datalist_path.read_text())
    assert set(datalist) == {"training", "unlabeled", "validation", "test"}
    counts = {"training": 2, "unlabeled": 3, "validation": 1, "test": 2}
    folders = {"training": "labeled", "unlabeled": "unlabeled", "validation": "validation", "test": "test"}
    for key, n in counts.items():
        entries = datalist[key]
        assert len(entries) == n
        for i, entry in enumerate(entries):
            name = f"demo_{i:04d}.png"
            assert entry["image"] == f"{folders[key]}/images/{name}"
            if key == "unlabeled":
                assert set(entry) == {"image"}
            else:
                assert set(entry) == {"image", "label"}
                assert entry["label"] == f"{folders[key]}/masks/{name}"
            for rel in entry.values():
                assert not Path(rel).is_absolute()
                assert (root / rel).is_file()
            with Image.open(root / entry["image"]) as im:
                assert im.mode == "RGB" and im.size == (128, 96)
            if "label" in entry:
                with Image.open(root / entry["label"]) as mk:
                    assert mk.mode == "L" and mk.size == im.size
    assert not (root / "unlabeled" / "masks").exists()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["generator_version"] == GENERATOR_VERSION
    assert manifest["parameters"] == {"seed": 0, "n_labeled": 2, "n_unlabeled": 3, "n_validation": 1, "n_test": 2,
                                      "image_size": [96, 128]}
    assert manifest["files"]["unlabeled"] == {"images": 3, "masks": 0}
    assert manifest["files"]["labeled"] == {"images": 2, "masks": 2}
    assert not list(tmp_path.glob("*.tmp-*")), "temporary folder left behind"


def test_generation_logs_progress(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="scripts.data.synthetic"):
        generate_demo_dataset(tmp_path / "demo", n_labeled=1, n_unlabeled=0, n_validation=0, n_test=0,
                              image_size=(64, 64))
    text = caplog.text
    assert "Generating demo data set in" in text and "1 labeled, 0 unlabeled" in text and "64x64" in text
    assert "ready" in text


# ------------------------------------------------------------------------------------------------ content


def test_masks_are_binary_with_sane_gland_fraction(tiles):
    fractions = []
    for image, mask in tiles:
        assert set(np.unique(mask)) <= {0, 255}
        fractions.append(float((mask == 255).mean()))
    fractions = np.array(fractions)
    assert 0.2 <= fractions.mean() <= 0.5, fractions
    assert fractions.max() < 0.8, fractions
    assert (fractions > 0).all(), fractions
    assert fractions.std() > 0.03, "gland fraction should vary between images"


def test_colours_look_like_h_and_e(tiles):
    red_over_blue = []
    for image, mask in tiles:
        img = image.astype(np.float64)
        lum = img.mean(-1)
        gland = mask > 0
        stroma = ~ndimage.binary_dilation(gland, iterations=3)
        r, g, b = img[stroma].mean(0)
        assert r > g and b > g, (r, g, b)  # pink/magenta, not green
        red_over_blue.append(r - b)
        # The rim (just inside the gland outline) holds dense dark epithelial nuclei.
        depth = ndimage.distance_transform_edt(np.pad(gland, 1, mode="edge"))[1:-1, 1:-1]
        rim = gland & (depth >= 1) & (depth <= 4)
        stroma_median = np.median(lum[stroma])
        assert lum[rim].mean() < lum[stroma].mean() - 10
        dark = stroma_median - 60
        assert (lum[rim] < dark).mean() > 3 * (lum[stroma] < dark).mean()
        # The lumen is paler than the stroma.
        assert np.percentile(lum[gland], 95) > stroma_median + 15
        # Nuclei also exist outside glands.
        assert (lum[stroma] < dark).mean() > 0.003
    assert np.mean(red_over_blue) > 0  # eosin pink leans red


def test_stain_varies_between_images(tiles):
    means = np.array([image.reshape(-1, 3).mean(0) for image, _ in tiles])
    assert means.std(0).max() > 6, means
    hue = means[:, 0] - means[:, 2]  # red versus blue balance
    assert hue.max() - hue.min() > 8, hue


def test_non_square_and_minimum_sizes():
    for size in [(64, 64), (64, 200), (300, 96)]:
        image, mask = synthesize_tile(np.random.default_rng(0), size)
        assert image.shape == (*size, 3) and mask.shape == size


# ------------------------------------------------------------------------------------------------ caching


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_ensure_reuses_and_regenerates(tmp_path):
    root = tmp_path / "demo"
    first = ensure_demo_dataset(root, seed=3, **SMALL)
    before = _mtimes(root)
    assert ensure_demo_dataset(str(root), seed=3, **SMALL) == first
    assert _mtimes(root) == before

    changed = dict(SMALL, n_test=1)
    ensure_demo_dataset(root, seed=3, **changed)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["parameters"]["n_test"] == 1
    assert len(json.loads((root / "datalist.json").read_text())["test"]) == 1
    assert not (root / "test" / "images" / "demo_0001.png").exists()

    # A different seed, or a lost file, regenerates too.
    ensure_demo_dataset(root, seed=4, **changed)
    assert json.loads((root / "manifest.json").read_text())["parameters"]["seed"] == 4
    (root / "labeled" / "masks" / "demo_0001.png").unlink()
    ensure_demo_dataset(root, seed=4, **changed)
    assert (root / "labeled" / "masks" / "demo_0001.png").is_file()

    # An older generator version is replaced.
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["generator_version"] = GENERATOR_VERSION - 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    ensure_demo_dataset(root, seed=4, **changed)
    assert json.loads((root / "manifest.json").read_text())["generator_version"] == GENERATOR_VERSION
    assert not list(tmp_path.glob("*.tmp-*"))


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    root = tmp_path / "not_demo"
    root.mkdir()
    (root / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a demo data set"):
        ensure_demo_dataset(root, **SMALL)
    assert (root / "precious.txt").read_text() == "keep me"
    assert not list(tmp_path.glob("*.tmp-*"))


# ------------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"n_labeled": 0}, r"n_labeled must be >= 1, got 0"),
        ({"n_labeled": -2}, r"n_labeled must be >= 0, got -2"),
        ({"n_unlabeled": -1}, r"n_unlabeled must be >= 0, got -1"),
        ({"n_validation": -3}, r"n_validation must be >= 0, got -3"),
        ({"n_test": -1}, r"n_test must be >= 0, got -1"),
        ({"n_test": 1.5}, r"n_test must be an integer.*1\.5"),
        ({"image_size": (32, 256)}, r"image_size=\(32, 256\) is too small.*at least 64"),
        ({"image_size": (256, 0)}, r"image_size must be positive, got \(256, 0\)"),
        ({"image_size": (-1, 256)}, r"image_size must be positive, got \(-1, 256\)"),
        ({"image_size": (256,)}, r"image_size must be a \(height, width\) pair"),
        ({"image_size": 256}, r"image_size must be a \(height, width\) pair"),
        ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
    ],
)
@pytest.mark.parametrize("func", [generate_demo_dataset, ensure_demo_dataset])
def test_bad_arguments_raise_value_error(tmp_path, func, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        func(tmp_path / "demo", **kwargs)
    assert not (tmp_path / "demo").exists()


def test_synthesize_tile_rejects_tiny_size():
    with pytest.raises(ValueError, match=r"size=\(10, 10\) is too small"):
        synthesize_tile(np.random.default_rng(0), (10, 10))
