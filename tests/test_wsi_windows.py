"""The shared window grid of whole-slide inference: each window once, and the bundle's sliding window over the slide."""

import math

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer, SlidingWindowInferer

from scripts.inference import FlipTTAInferer, ScaledInferer
from scripts.inference.scale import rescale_image
from scripts.networks import config_settings, model_record
from scripts.paths import config_path
from scripts.wsi import SlideSegmenter, open_slide, write_synthetic_slide
from scripts.wsi.windows import SharedWindowTiles, labels_from_logits, window_plan


class ContextNet(torch.nn.Module):
    """A convolution plus the window's mean: its output depends on where a window lies, so a window cut at another
    place, or blended with other weights, changes the logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 5, padding=2)

    def forward(self, x):
        y = self.conv(x)
        return y + y.mean(dim=(2, 3), keepdim=True)


class DarkInContext(torch.nn.Module):
    """Gland where a pixel is darker than the window around it: two classes on a generated slide, and results that
    depend on where windows lie."""

    def forward(self, x):
        s = -x.mean(1, keepdim=True)
        s = s - 0.5 * s.mean(dim=(2, 3), keepdim=True)
        return torch.cat([-s, s], 1)


class BrightInContext(DarkInContext):
    """The opposite rule: white glass is "gland", as a model trained on tissue may say of it."""

    def forward(self, x):
        return super().forward(x).flip(1)


HEIGHT, WIDTH, TILE = 300, 420, 64
IMAGE = torch.randn(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))


def read(top, left, height, width):
    """The image, with ones (a constant, as white is) outside it."""
    out = torch.ones(3, height, width)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + height, HEIGHT), min(left + width, WIDTH)
    if y0 < y1 and x0 < x1:
        out[:, y0 - top:y1 - top, x0 - left:x1 - left] = IMAGE[:, y0:y1, x0:x1]
    return out


def bundle_inferer(scale, tta, roi=(16, 24), overlap=0.25):
    window = SlidingWindowInferer(roi, sw_batch_size=5, overlap=overlap, mode="gaussian")
    return ScaledInferer(FlipTTAInferer(window, enabled=tta), scale=scale), window


def reference_logits(plan, window, tta, net, read=read, height=HEIGHT, width=WIDTH):
    """MONAI's sliding window over one image large enough that its windows fall on the plan's grid, resized back."""
    step, (ry, rx), (sy, sx) = plan.step, plan.roi, plan.stride
    # the last tiles' margin boxes reach one network pixel past the slide: windows start up to that pixel
    size = ((math.ceil(height / step)) // sy * sy + ry, (math.ceil(width / step)) // sx * sx + rx)
    padded = read(-2 * step, -2 * step, (size[0] + 4) * step, (size[1] + 4) * step)
    small = rescale_image(padded[None], 1 / step)[:, :, 2:-2, 2:-2]
    with torch.no_grad():
        logits = FlipTTAInferer(window, enabled=tta)(small, net)
    if step > 1:
        logits = torch.nn.functional.interpolate(logits, scale_factor=step, mode="bilinear", align_corners=False)
    return logits[0, :, :height, :width]


@pytest.mark.parametrize("scale,tta", [(1.0, False), (0.5, False), (0.5, True)])
def test_tiles_get_the_sliding_window_of_the_whole_slide(scale, tta):
    net = ContextNet().eval()
    inferer, window = bundle_inferer(scale, tta)
    plan = window_plan(inferer, TILE)
    assert plan.step == round(1 / scale) and plan.roi == (16, 24) and plan.stride == (12, 18)
    rows, cols = math.ceil(HEIGHT / TILE), math.ceil(WIDTH / TILE)
    # a checkerboard of background tiles: their windows that reach tissue tiles must still be computed
    tissue = {(r, c) for r in range(rows) for c in range(cols) if (r + c) % 3}
    shared = SharedWindowTiles(plan, net, read, (HEIGHT, WIDTH), TILE, tissue, 3)
    expected = reference_logits(plan, window, tta, net)
    with torch.no_grad():
        for r in range(rows):
            for c in range(cols):
                if (r, c) not in tissue:
                    continue
                got = shared.logits(r, c, shared.read_region(r, c))
                box = expected[:, r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
                assert got.shape == box.shape
                assert float((got - box).abs().max()) < 1e-5, (r, c)
    assert not shared._pending  # every tissue tile's sums were used and dropped


def test_each_window_is_computed_once():
    net = ContextNet().eval()
    inferer, _ = bundle_inferer(0.5, False)
    plan = window_plan(inferer, TILE)
    rows, cols = math.ceil(HEIGHT / TILE), math.ceil(WIDTH / TILE)
    calls = []

    def predict(batch):
        calls.append(batch.shape[0])
        return net(batch)

    shared = SharedWindowTiles(plan, predict, read, (HEIGHT, WIDTH), TILE, {(r, c) for r in range(rows)
                                                                           for c in range(cols)}, 3)
    with torch.no_grad():
        for r in range(rows):
            for c in range(cols):
                shared.segment(r, c, shared.read_region(r, c))
    (ry, rx), (sy, sx) = plan.roi, plan.stride
    # windows start on multiples of the stride from 0 up to the last margin pixel, ceil(size / 2)
    expected = (math.ceil(HEIGHT / 2) // sy + 1) * (math.ceil(WIDTH / 2) // sx + 1)
    assert shared.windows_computed == sum(calls) == expected
    assert max(calls) <= plan.batch


def test_window_plan_falls_back_to_tiles():
    window = SlidingWindowInferer((32, 32), overlap=0.25, mode="gaussian")
    assert window_plan(window, 256) is not None
    assert window_plan(SimpleInferer(), 256) is None  # not a sliding window
    assert window_plan(ScaledInferer(window, scale=0.3), 256) is None  # 1 / 0.3 is not a whole number of pixels
    assert window_plan(ScaledInferer(window, scale=0.25), 64) is None  # a window is larger than a tile
    assert window_plan(ScaledInferer(window, scale=1 / 3), 256) is None  # a tile that is not a whole network tile


def test_the_bundle_inferer_gives_a_plan():
    parser = ConfigParser()
    parser.read_config([str(config_path("inference.json")), str(config_path("recipes/cpu.json"))])
    parser["model_settings"] = model_record(**config_settings(parser))  # the recipe's network, no model file
    parser["tta"] = True
    plan = window_plan(parser.get_parsed_content("inferer"), 1024)
    assert plan.roi == (128, 128) and plan.step == 2 and plan.stride == (96, 96) and plan.batch == 4
    assert len(plan.flips) == 4


def test_labels_take_the_first_class_on_ties():
    logits = torch.randn(4, 40, 50)
    logits[2, :10] = logits[1, :10] = logits[:, :10].max(dim=0).values  # ties: class 1 wins, as argmax says
    cropped = torch.randn(3, 60, 70)[:, 3:43, 5:55]  # a strided view, as tiles are cropped
    for case in (logits, cropped, logits[:1]):
        np.testing.assert_array_equal(labels_from_logits(case), case.argmax(dim=0).numpy().astype(np.uint8))


def test_slide_segmenter_shared_grid_against_tile_by_tile(tmp_path):
    """The shared grid's mask is the whole slide's sliding window; tile by tile differs only near tile borders."""
    slide = write_synthetic_slide(tmp_path / "s.tif", 520, 700, tile=128, mpp=0.5, seed=3)
    net = DarkInContext()
    inferer, _ = bundle_inferer(0.5, False, roi=(32, 32))
    masks, summaries = {}, {}
    for shared in (True, False):
        segmenter = SlideSegmenter(net, inferer, tmp_path / str(shared), num_classes=2, tile_size=128, halo=32,
                                   mask_scale=1, tissue_detection=False, shared_windows=shared, progress=False)
        summaries[shared] = segmenter.segment(str(slide))
        masks[shared] = tifffile.imread(summaries[shared]["outputs"]["mask"], level=0)
    assert summaries[True]["settings"]["window_grid"] == "slide"
    assert summaries[False]["settings"]["window_grid"] == "tile" and summaries[False]["windows"] is None
    # 260 x 350 network pixels, windows every 24 up to the last margin pixel
    assert summaries[True]["windows"] == (260 // 24 + 1) * (350 // 24 + 1)
    assert set(summaries[True]["timing"]) == {"tissue_detection", "tiles", "read", "read_wait", "segment",
                                              "pyramid", "geojson"}
    assert 0.1 < masks[True].mean() < 0.9  # both classes occur, so agreement means something
    with open_slide(str(slide)) as opened:
        plan = window_plan(inferer, 128)
        expected = reference_logits(plan, inferer.inferer.inferer, False, net, segmenter._read_normalized(opened, 0, 1.0),
                                    520, 700)
    assert (masks[True] == labels_from_logits(expected)).mean() > 0.9999
    # a window cut by a tile border sees less of the image; this network weighs its whole window, so it shows
    assert (masks[True] == masks[False]).mean() > 0.97


def test_background_windows_are_skipped_and_reading_ahead_changes_nothing(tmp_path):
    """With tissue detection, windows with no tissue under them are not computed: inside the tissue the mask is
    the one of every window, outside what no window covers is background. A reader thread gives the same mask."""
    from PIL import Image

    slide = write_synthetic_slide(tmp_path / "s.tif", 768, 1024, tile=128, mpp=0.5, seed=2, tissue_regions=1,
                                  tissue_radius=(0.25, 0.25))
    inferer, _ = bundle_inferer(0.5, False, roi=(32, 32))
    masks, summaries = {}, {}
    for name, skip, ahead in (("all", False, False), ("skip", True, False), ("skip_thread", True, True)):
        segmenter = SlideSegmenter(BrightInContext(), inferer, tmp_path / name, num_classes=2, tile_size=256,
                                   mask_scale=1, skip_background_windows=skip, read_ahead=ahead, progress=False)
        summaries[name] = segmenter.segment(str(slide))
        masks[name] = tifffile.imread(summaries[name]["outputs"]["mask"], level=0)
    assert summaries["all"]["windows_skipped_background"] == 0
    skipped = summaries["skip"]["windows_skipped_background"]
    assert skipped > 0 and summaries["skip"]["windows"] + skipped == summaries["all"]["windows"]
    np.testing.assert_array_equal(masks["skip"], masks["skip_thread"])
    tissue = np.asarray(Image.open(tmp_path / "skip" / "s_tissue.png")) > 0
    inside = np.kron(tissue, np.ones((16, 16), bool))[:768, :1024]
    np.testing.assert_array_equal(masks["skip"][inside], masks["all"][inside])
    assert masks["all"][~inside].mean() > 0.1 and masks["skip"][~inside].mean() < 0.5 * masks["all"][~inside].mean()


class RecordingNet(DarkInContext):
    """DarkInContext plus a small convolution, which notes the dtype it computes in."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 5, padding=2)
        self.dtypes = set()

    def forward(self, x):
        y = self.conv(x)
        self.dtypes.add(y.dtype)
        return super().forward(x) + 0.3 * y


@pytest.mark.parametrize("shared", [True, False])
def test_amp_on_the_cpu_segments_slides_in_bfloat16(tmp_path, monkeypatch, shared):
    """``amp`` on a CPU that computes bfloat16: the network runs in it (on the shared grid and tile by tile), the
    summary's settings say so (a slide done in float32 is redone), and the mask stays close to float32's. On a CPU
    without it the segmenter is refused before any slide is read."""
    import scripts.inference.precision as precision
    from scripts.errors import ConfigError

    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda: True)
    slide = write_synthetic_slide(tmp_path / "s.tif", 520, 700, tile=128, mpp=0.5, seed=3)
    inferer, _ = bundle_inferer(0.5, False, roi=(32, 32))
    masks, summaries = {}, {}
    for amp in (False, True):
        net = RecordingNet()
        segmenter = SlideSegmenter(net, inferer, tmp_path / "out", num_classes=2, tile_size=128, halo=32,
                                   mask_scale=1, tissue_detection=False, shared_windows=shared, amp=amp,
                                   progress=False)
        summaries[amp] = segmenter.segment(str(slide))
        masks[amp] = tifffile.imread(summaries[amp]["outputs"]["mask"], level=0)
        assert net.dtypes == ({torch.bfloat16} if amp else {torch.float32})
    assert summaries[False]["settings"]["autocast"] is None and summaries[True]["settings"]["autocast"] == "bfloat16"
    assert 0.1 < masks[False].mean() < 0.9
    assert (masks[True] == masks[False]).mean() > 0.99
    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda: False)
    with pytest.raises(ConfigError, match="neither AVX512-BF16 nor AMX"):
        SlideSegmenter(RecordingNet(), inferer, tmp_path / "no", num_classes=2, amp=True)


def test_the_network_gets_plain_tensors(tmp_path):
    """MONAI's normalisation returns a MetaTensor; the network must get plain tensors (metadata bookkeeping on its
    every operation cost about 18 % of a slide at scale 1), with the same values."""
    from monai.data import MetaTensor

    slide = write_synthetic_slide(tmp_path / "s.tif", 256, 384, tile=128, mpp=0.5, seed=3)
    seen = []

    class Noting(DarkInContext):
        def forward(self, x):
            seen.append(type(x))
            return super().forward(x)

    for scale, shared in ((1.0, True), (0.5, True), (1.0, False)):
        inferer, _ = bundle_inferer(scale, False, roi=(32, 32))
        segmenter = SlideSegmenter(Noting(), inferer, tmp_path / f"{scale}{shared}", num_classes=2, tile_size=128,
                                   halo=16, tissue_detection=False, shared_windows=shared, progress=False)
        segmenter.segment(str(slide))
        with open_slide(str(slide)) as opened:
            region = opened.read(0, 0, 0, 64, 64)
        normalized = segmenter._normalized(region)
        assert type(normalized) is torch.Tensor and normalized.dtype == torch.float32
        expected = segmenter.normalize({"image": torch.from_numpy(region).permute(2, 0, 1).float()})["image"]
        assert isinstance(expected, MetaTensor)
        torch.testing.assert_close(normalized, expected.as_tensor(), rtol=0, atol=0)
    assert seen and set(seen) == {torch.Tensor}


def test_slides_are_segmented_with_batch_norms_folded(tmp_path):
    """The segmenter runs the folded view of a PyTorch network (no batch norm is called), on the shared grid and
    tile by tile, and leaves the network's own modules in place."""
    from tests.helpers import tiny_network

    slide = write_synthetic_slide(tmp_path / "s.tif", 256, 256, tile=128, mpp=0.5, seed=3)
    network = tiny_network()
    calls = []
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda *args: calls.append(1))
    for shared in (True, False):
        inferer, _ = bundle_inferer(1.0, False, roi=(32, 32))
        segmenter = SlideSegmenter(network, inferer, tmp_path / str(shared), num_classes=2, tile_size=128, halo=16,
                                   tissue_detection=False, shared_windows=shared, progress=False)
        assert segmenter.segment(str(slide))["tiles_segmented"] == 4
    assert calls == []
    with torch.no_grad():
        network(torch.zeros(1, 3, 32, 32))
    assert calls  # the network itself still has them


def test_summaries_without_the_autocast_key_count_as_float32(tmp_path):
    """A slide segmented before summaries recorded the autocast dtype is not redone in float32; one recorded as
    made in bfloat16 is."""
    import json

    slide = write_synthetic_slide(tmp_path / "s.tif", 256, 256, tile=128, mpp=0.5, seed=3)
    inferer, _ = bundle_inferer(1.0, False, roi=(32, 32))

    def segmenter():
        return SlideSegmenter(DarkInContext(), inferer, tmp_path / "out", num_classes=2, tile_size=128,
                              tissue_detection=False, progress=False)

    first = segmenter().segment(str(slide))
    path = tmp_path / "out" / "s_summary.json"
    older = json.loads(path.read_text())
    del older["settings"]["autocast"]
    older["seconds"] = -1.0  # marks the file: a redone slide would write a new summary
    path.write_text(json.dumps(older))
    assert segmenter().segment(str(slide))["seconds"] == -1.0
    older["settings"]["autocast"] = "bfloat16"
    path.write_text(json.dumps(older))
    redone = segmenter().segment(str(slide))  # made in bfloat16: other settings, so segmented again
    assert redone["seconds"] >= 0 and redone["settings"] == first["settings"]
