"""Whole-slide inference: region reads, level choice, tissue detection, tile-by-tile segmentation and its outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import torch
from monai.inferers import SlidingWindowInferer
from PIL import Image
from scipy import ndimage

from scripts.errors import ConfigError
from scripts.wsi import (SlideSegmenter, choose_level, list_slides, mask_to_geojson, open_slide, otsu_threshold,
                         region_at_scale, tissue_mask, write_synthetic_slide, write_tiled_tiff)

REPO = Path(__file__).resolve().parent.parent
REPO_CONFIGS = REPO / "bundle" / "configs"
BACKENDS = ["tifffile", "openslide"]


class DarkPixels(torch.nn.Module):
    """Gland where a pixel is darker than average: a per-pixel rule, so tiling and blending cannot change it."""

    def forward(self, x):
        s = -x.mean(1, keepdim=True)
        return torch.cat([-s, s], 1)


def reference_labels(image: np.ndarray) -> np.ndarray:
    from scripts.data import IMAGENET_MEAN_255, IMAGENET_STD_255

    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = (x - torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    return DarkPixels()(x)[0].argmax(0).numpy().astype(np.uint8)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    path = write_synthetic_slide(root / "s.tif", 700, 1000, tile=128, mpp=0.5, seed=3, variants=3,
                                 mask_path=root / "s_truth.tif")
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_region_reads_equal_the_decoded_level(slide, backend):
    with open_slide(slide, backend) as s, tifffile.TiffFile(slide) as tif:
        assert s.backend == backend
        assert s.level_shapes == [(700, 1000), (350, 500), (175, 250), (88, 125)]
        assert s.mpp == pytest.approx(0.5)
        assert s.downsamples[2] == pytest.approx(4.0)
        for level in (0, 2):
            full = tif.series[0].levels[level].asarray()
            h, w = full.shape[:2]
            for top, left, hh, ww in ((0, 0, 64, 64), (37, 101, 200, 333), (h - 20, w - 30, 50, 70), (-10, -5, 30, 40)):
                region = s.read(level, top, left, hh, ww)
                expected = np.full((hh, ww, 3), 255, np.uint8)
                y0, x0 = max(top, 0), max(left, 0)
                y1, x1 = min(top + hh, h), min(left + ww, w)
                expected[y0 - top:y1 - top, x0 - left:x1 - left] = full[y0:y1, x0:x1]
                np.testing.assert_array_equal(region, expected)


def test_choose_level_and_its_errors(slide):
    with open_slide(slide, "tifffile") as s:
        assert choose_level(s) == (0, 1.0)
        assert choose_level(s, level=2) == (2, 1.0)
        assert choose_level(s, mpp=1.0) == (1, 1.0)
        assert choose_level(s, mpp=1.05) == (1, 1.0)  # within the 10% tolerance
        level, factor = choose_level(s, mpp=1.5)
        assert level == 1 and factor == pytest.approx(1.5)
        with pytest.raises(ConfigError, match="'wsi_level' 7 is out of range"):
            choose_level(s, level=7)
        with pytest.raises(ConfigError, match="coarser than 'wsi_mpp' 0.25"):
            choose_level(s, mpp=0.25)
        with pytest.raises(ConfigError, match="either 'wsi_level' or 'wsi_mpp'"):
            choose_level(s, level=0, mpp=1.0)


def test_slide_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        open_slide(tmp_path / "absent.svs")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00 not a tiff")
    with pytest.raises(ConfigError, match=f"Cannot read slide '{bad}'"):
        open_slide(bad)
    with pytest.raises(ConfigError, match="slide backend 'cucumber'"):
        open_slide(bad, "cucumber")


def test_unsupported_tiff_layouts_are_named(tmp_path):
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, np.zeros((64, 64, 3), np.uint16), tile=(32, 32), photometric="rgb")
    with pytest.raises(ConfigError, match="stores uint16 samples"):
        open_slide(deep, "tifffile")
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.zeros((3, 64, 64), np.uint8), tile=(32, 32), photometric="rgb", planarconfig="separate")
    with pytest.raises(ConfigError, match="colour planes separately"):
        open_slide(planar, "tifffile")


def test_stripped_tiff_reads_like_the_array(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    path = tmp_path / "stripped.tif"
    tifffile.imwrite(path, image, rowsperstrip=16, photometric="rgb", compression="zlib")
    with open_slide(path, "tifffile") as s:
        np.testing.assert_array_equal(s.read(0, 10, 20, 100, 150), image[10:110, 20:170])


def test_resampled_tiles_join_without_seams(slide):
    factor = 1.37
    with open_slide(slide, "tifffile") as s:
        grid = (int(700 / factor), int(1000 / factor))
        whole = region_at_scale(s, 0, factor, 0, 0, grid).astype(int)
        tiled = np.zeros_like(whole)
        for top in range(0, grid[0], 96):
            for left in range(0, grid[1], 96):
                h, w = min(96, grid[0] - top), min(96, grid[1] - left)
                tiled[top:top + h, left:left + w] = region_at_scale(s, 0, factor, top, left, (h, w))
        assert np.abs(whole - tiled).max() <= 1  # float rounding only
        # shrinking by exactly 2 averages 2 x 2 pixels, as the slide's own level 1 was made
        halved = region_at_scale(s, 0, 2.0, 0, 0, (350, 500)).astype(int)
        assert np.abs(halved - s.read(1, 0, 0, 350, 500).astype(int)).mean() < 3  # JPEG noise


def test_otsu_and_tissue_mask():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.03, 5000), rng.normal(0.7, 0.03, 5000)]).clip(0, 1)
    assert 0.3 < otsu_threshold(values) < 0.6
    thumb = np.full((60, 80, 3), 240, np.uint8)
    thumb[10:40, 20:60] = (190, 90, 160)  # stained tissue
    thumb[25:28, 35:38] = (250, 250, 250)  # a hole inside it is filled
    thumb[50, 5] = (190, 90, 160)  # a speck is dropped
    mask, cut = tissue_mask(thumb)
    expected = np.zeros((60, 80), bool)
    expected[10:40, 20:60] = True
    np.testing.assert_array_equal(mask, expected)
    blank, cut = tissue_mask(np.full((30, 30, 3), 242, np.uint8) + rng.integers(0, 3, (30, 30, 3)).astype(np.uint8))
    assert not blank.any() and cut >= 0.05
    # a slide that is all tissue, pale to dark: Otsu alone would call the pale half background
    ramp = np.linspace(0.18, 0.8, 80)
    stained = np.stack([np.full(80, 230.0), 230 * (1 - ramp), np.full(80, 230.0) * (1 - ramp / 3)], -1)
    full, cut = tissue_mask(np.broadcast_to(stained, (60, 80, 3)).round().astype(np.uint8))
    assert full.all() and cut == pytest.approx(0.15)


def test_geojson_polygons_cover_exactly_the_mask(tmp_path):
    rng = np.random.default_rng(1)
    mask = ndimage.binary_opening(rng.random((300, 420)) > 0.55, iterations=1)
    mask[100:220, 50:300] = True  # one object across several tiles
    mask[140:160, 100:120] = False  # with a hole
    labels = mask.astype(np.uint8) * 255
    level0 = tmp_path / "mask.tif"
    write_tiled_tiff(level0, labels.shape, 64,
                     lambda t, l: np.pad(labels[t:t + 64, l:l + 64], ((0, 64 - labels[t:t + 64, l:l + 64].shape[0]),
                                                                      (0, 64 - labels[t:t + 64, l:l + 64].shape[1]))))
    counts = mask_to_geojson(level0, tmp_path / "m.geojson", 64, 2.0, ["background", "gland"], 255, simplify=0)
    data = json.loads((tmp_path / "m.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    polygons = [shapely.geometry.shape(f["geometry"]) for f in data["features"]]
    assert {f["properties"]["classification"]["name"] for f in data["features"]} == {"gland"}
    assert counts == {"gland": len(polygons)}
    # one polygon per 4-connected component: pieces cut by tile borders were joined
    assert len(polygons) == ndimage.label(mask)[1]
    union = shapely.union_all(polygons)
    yy, xx = np.mgrid[0:300, 0:420]
    inside = shapely.contains_xy(union, (xx + 0.5) * 2.0, (yy + 0.5) * 2.0)  # coordinates were scaled by 2
    np.testing.assert_array_equal(inside, mask)
    assert union.area == pytest.approx(mask.sum() * 4.0)


def test_tile_tracing_equals_the_union_of_its_pixels():
    """The coverage union of run boxes is the union of the pixels' unit squares: same area, same parts (pixels that
    touch only at a corner stay apart), no difference; on noise, blobs with holes, full, empty and one-row masks."""
    from scripts.wsi.outputs import _pixel_polygons

    rng = np.random.default_rng(7)
    masks = [np.zeros((5, 7), bool), np.ones((9, 4), bool), np.eye(6, dtype=bool), np.array([[1, 0, 1, 1, 0, 1]], bool)]
    for _ in range(60):
        shape = tuple(rng.integers(1, 48, 2))
        masks.append(rng.random(shape) < rng.uniform(0.2, 0.8))
        masks.append(ndimage.binary_opening(rng.random(shape) < 0.6) ^ (rng.random(shape) < 0.05))
    for mask in masks:
        traced = _pixel_polygons(mask, 3, 5)
        yy, xx = np.nonzero(mask)
        pixels = shapely.union_all(shapely.box(xx + 5, yy + 3, xx + 6, yy + 4))
        assert traced.is_valid and traced.area == mask.sum()
        assert traced.symmetric_difference(pixels).area == 0
        assert len(shapely.get_parts(traced)) == len(shapely.get_parts(pixels)) == \
            (ndimage.label(mask)[1] if mask.any() else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segmented_slide_equals_whole_image_segmentation(slide, tmp_path, backend):
    inferer = SlidingWindowInferer((32, 32), sw_batch_size=8, overlap=0.25, mode="gaussian")
    segmenter = SlideSegmenter(DarkPixels(), inferer, tmp_path, num_classes=2, tile_size=256, halo=16,
                               mask_scale=255, backend=backend, progress=False, simplify=0, min_tissue_fraction=0.05)
    summary = segmenter.run(slide)[0]
    with open_slide(slide, backend) as s:
        image = s.read(0, 0, 0, 700, 1000)
    expected = reference_labels(image) * 255
    with tifffile.TiffFile(tmp_path / "s_mask.tif") as tif:
        pages = [p.asarray() for p in tif.pages]
        assert [p.shape for p in pages] == [(700, 1000), (350, 500), (175, 250)]
        assert json.loads(tif.pages[0].description)["downsample_from_level0"] == [1.0, 1.0]
        x_res = tif.pages[0].tags["XResolution"].value
        assert 1e4 * x_res[1] / x_res[0] == pytest.approx(0.5)
    assert summary["tiles"] == 12 and summary["tiles_skipped_background"] > 0
    assert summary["tiles_segmented"] + summary["tiles_skipped_background"] == 12
    # skipped tiles are background; everywhere else the tile-by-tile result is the whole-image result
    tissue = np.asarray(Image.open(tmp_path / "s_tissue.png")) > 0
    segmented = np.zeros((700, 1000), bool)
    for top in range(0, 700, 256):
        for left in range(0, 1000, 256):
            window = tissue[top // 16:-(-min(top + 256, 700) // 16), left // 16:-(-min(left + 256, 1000) // 16)]
            segmented[top:top + 256, left:left + 256] = window.mean() >= 0.05
    np.testing.assert_array_equal(pages[0][segmented], expected[segmented])
    assert not pages[0][~segmented].any()
    assert pages[0].any()
    for k, page in enumerate(pages[1:], 1):
        np.testing.assert_array_equal(page, pages[0][::2 ** k, ::2 ** k])
    fractions = summary["class_fractions"]
    assert fractions["gland"] == pytest.approx((pages[0] > 0).mean(), abs=1e-6)
    features = json.loads((tmp_path / "s.geojson").read_text())["features"]
    assert len(features) == ndimage.label(pages[0] > 0)[1] == summary["polygons"]["gland"]


def test_resolution_by_mpp_skips_done_slides_and_reports_bad_ones(slide, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    os.symlink(slide, folder / "good.tif")
    (folder / "broken.svs").write_bytes(b"not a slide at all")
    inferer = SlidingWindowInferer((32, 32), sw_batch_size=8, mode="gaussian")
    segmenter = SlideSegmenter(DarkPixels(), inferer, tmp_path / "out", num_classes=2, mpp=0.75, tile_size=128,
                               halo=8, mask_scale=255, progress=False)
    with pytest.raises(ConfigError, match=r"1 of 2 slides failed") as err:
        segmenter.run(folder)
    assert "broken.svs" in str(err.value)
    summary = json.loads((tmp_path / "out" / "good_summary.json").read_text())
    assert summary["level"] == 0 and summary["resize_factor"] == pytest.approx(1.5)
    assert summary["mask_shape"] == [466, 666] and summary["mask_mpp"] == pytest.approx(0.75)
    with tifffile.TiffFile(tmp_path / "out" / "good_mask.tif") as tif:
        assert tif.pages[0].shape == (466, 666)
    # GeoJSON coordinates are in slide level-0 pixels: the mask grid times 1.5
    features = json.loads((tmp_path / "out" / "good.geojson").read_text())["features"]
    xs = [x for f in features for ring in f["geometry"]["coordinates"] for x, _ in ring]
    assert max(xs) > 666 and max(xs) <= 1000
    before = (tmp_path / "out" / "good_mask.tif").stat().st_mtime_ns
    segmenter.run(folder / "good.tif")
    assert (tmp_path / "out" / "good_mask.tif").stat().st_mtime_ns == before  # complete outputs are kept


def test_name_clashes_and_changed_settings(slide, tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "a.tif").write_bytes(b"x")
    with pytest.raises(ConfigError, match="share one"):
        list_slides(tmp_path)
    inferer = SlidingWindowInferer((32, 32), sw_batch_size=8, mode="gaussian")
    common = dict(num_classes=2, level=2, tile_size=64, halo=8, mask_scale=255, progress=False)
    SlideSegmenter(DarkPixels(), inferer, tmp_path / "out", **common).run([str(slide)])
    first = (tmp_path / "out" / "s_mask.tif").stat().st_mtime_ns
    redo = SlideSegmenter(DarkPixels(), inferer, tmp_path / "out", simplify=0.0, geojson=False, **common)
    summary = redo.run([str(slide)])[0]
    assert (tmp_path / "out" / "s_mask.tif").stat().st_mtime_ns != first  # other settings: redone
    assert summary["settings"]["simplify"] == 0.0 and "geojson" not in summary["outputs"]
    assert not (tmp_path / "out" / "s.geojson").exists()  # not left over from the first run
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_bad_segmenter_settings():
    inferer = SlidingWindowInferer((32, 32))
    with pytest.raises(ConfigError, match="multiple of 16"):
        SlideSegmenter(DarkPixels(), inferer, "out", 2, tile_size=100)
    with pytest.raises(ConfigError, match="'class_names' has 2 names for 3 classes"):
        SlideSegmenter(DarkPixels(), inferer, "out", 3)


def test_bundle_runs_whole_slide_inference(slide, tmp_path):
    from tests.helpers import save_tiny_model, tiny_record

    # class names renamed through model_overrides reach the GeoJSON; the network and window come from the record
    save_tiny_model(tmp_path / "model.pt", tiny_record(roi_size=[64, 64]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    configs = f"['{REPO / 'bundle/configs/inference.json'}','{REPO / 'bundle/configs/inference_wsi.json'}']"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs,
         "--model_overrides", "{'class_names': ['background', 'crypt']}", "--slides", str(slide),
         "--ckpt_path", str(tmp_path / "model.pt"), "--wsi_output_dir", str(tmp_path / "out"),
         "--wsi_mpp", "1.0", "--wsi_tile_size", "256"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "s_summary.json").read_text())
    assert summary["level"] == 1 and summary["mask_shape"] == [350, 500]
    assert summary["tiles_segmented"] >= 1
    with tifffile.TiffFile(tmp_path / "out" / "s_mask.tif") as tif:
        mask = tif.pages[0].asarray()
    assert mask.shape == (350, 500) and set(np.unique(mask)) <= {0, 255}
    assert "of 4 tiles segmented" in result.stdout + result.stderr
    assert set(summary["class_fractions"]) == {"background", "crypt"}


def test_demo_slide_stays_out_of_the_demo_data_folder(tmp_path, monkeypatch):
    from monai.bundle import ConfigParser

    from scripts.data import ensure_demo_dataset

    monkeypatch.setenv("MPAMATCH_CACHE", str(tmp_path))
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundle/configs/inference.json"), str(REPO / "bundle/configs/inference_wsi.json")])
    slide = Path(parser.get_parsed_content("slides"))
    assert slide.is_file() and slide.suffix == ".tif"
    demo_dir = Path(parser.get_parsed_content("demo_dir"))
    assert demo_dir not in slide.parents
    # training's demo data can still be generated after the demo slide was
    ensure_demo_dataset(demo_dir, seed=0, n_labeled=1, n_unlabeled=1, n_validation=1, n_test=1, image_size=(64, 64))


def test_slides_take_the_normalisation_of_inference_json(slide, tmp_path):
    """The whole-slide path normalises tiles with the transform the config gives it (inference.json's ``normalize``)."""
    config = json.loads((REPO_CONFIGS / "inference_wsi.json").read_text())
    assert config["slide_segmenter"]["normalize"] == "@normalize"
    assert "@normalize" in json.loads((REPO_CONFIGS / "inference.json").read_text())["preprocessing"]["transforms"]
    seen = []

    def inverted(data):  # a normalisation that flips dark and light: the dark-pixel rule then marks light pixels
        seen.append(tuple(data["image"].shape))
        return {"image": 255.0 - data["image"]}

    inferer = SlidingWindowInferer((32, 32), sw_batch_size=8, overlap=0.25, mode="gaussian")
    segmenter = SlideSegmenter(DarkPixels(), inferer, tmp_path, num_classes=2, tile_size=256, halo=16, mask_scale=1,
                               progress=False, tissue_detection=False, geojson=False, normalize=inverted)
    segmenter.run(slide)
    assert seen and all(shape[0] == 3 for shape in seen)
    with open_slide(slide) as s:
        image = s.read(0, 0, 0, 700, 1000)
    x = 255.0 - torch.from_numpy(image).permute(2, 0, 1)[None].float()
    expected = DarkPixels()(x)[0].argmax(0).numpy()
    with tifffile.TiffFile(tmp_path / "s_mask.tif") as tif:
        np.testing.assert_array_equal(tif.pages[0].asarray(), expected)


@pytest.mark.parametrize("layout", ["written", "other_tiles", "strips", "lzw"])
def test_mask_pyramid_levels_are_halvings_of_the_mask(tmp_path, layout):
    """Every level is the one above taken every other pixel, whether the level-0 file's tiles are copied as they
    are (written by ``write_tiled_tiff``) or it is laid out otherwise and decoded."""
    from scripts.wsi.outputs import write_mask_pyramid, write_tiled_tiff

    generator = np.random.default_rng(0)
    mask = (generator.random((300, 520)) < 0.3).astype(np.uint8) * 255
    level0 = tmp_path / "level0.tif"
    if layout == "written":
        write_tiled_tiff(level0, mask.shape, 128, lambda top, left: np.pad(
            mask[top:top + 128, left:left + 128], ((0, max(0, top + 128 - 300)), (0, max(0, left + 128 - 520)))))
    elif layout == "other_tiles":
        tifffile.imwrite(level0, mask, tile=(64, 64), compression="zlib")
    elif layout == "strips":
        tifffile.imwrite(level0, mask, compression="zlib", rowsperstrip=16)
    else:
        tifffile.imwrite(level0, mask, tile=(128, 128), compression="lzw")
    out = tmp_path / "pyramid.tif"
    shapes = write_mask_pyramid(level0, out, 128, mpp=0.5, description={"classes": ["background", "gland"]})
    assert shapes == [(300, 520), (150, 260), (75, 130), (38, 65)]
    with tifffile.TiffFile(out) as handle:
        levels = [page.asarray() for page in handle.pages]
        assert json.loads(handle.pages[0].description) == {"classes": ["background", "gland"]}
        assert all(page.tilewidth == 128 and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
                   for page in handle.pages)
    np.testing.assert_array_equal(levels[0], mask)
    for above, below in zip(levels, levels[1:]):
        np.testing.assert_array_equal(below, above[::2, ::2])
