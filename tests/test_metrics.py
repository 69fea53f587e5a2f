"""GlaS object metrics against small hand-made cases with known answers."""

import math

import numpy as np
import pytest

from scripts.metrics import instances, object_dice, object_f1, object_hausdorff


def square(mask, top, left, size, value=1):
    mask[top:top + size, left:left + size] = value
    return mask


def two_glands():
    return square(square(np.zeros((20, 20), np.uint8), 2, 2, 4, 1), 10, 10, 6, 2)


def test_instances_keep_ids_or_label_components():
    truth = two_glands()
    assert set(np.unique(instances(truth))) == {0, 1, 2}
    binary = (truth > 0).astype(np.uint8) * 255
    labels = instances(binary)
    assert labels.max() == 2 and (labels > 0).sum() == 16 + 36


def test_perfect_prediction():
    truth = two_glands()
    pred = (truth > 0).astype(np.uint8) * 255
    assert object_f1(pred, truth) == 1.0
    assert object_dice(pred, truth) == 1.0
    assert object_hausdorff(pred, truth) == 0.0


def test_one_hit_one_miss_one_spurious():
    truth = two_glands()
    pred = square(np.zeros((20, 20), np.uint8), 10, 10, 6)  # finds the second gland only
    pred = square(pred, 2, 12, 3)  # and a spurious object
    # TP 1, FP 1, FN 1
    assert object_f1(pred, truth) == pytest.approx(2 / (2 + 1 + 1))


def test_object_under_half_covered_is_not_a_hit():
    truth = square(np.zeros((20, 20), np.uint8), 0, 0, 10)  # 100 pixels
    pred = square(np.zeros((20, 20), np.uint8), 0, 0, 7)  # covers 49 of them
    assert object_f1(pred, truth) == 0.0
    pred = square(np.zeros((20, 20), np.uint8), 0, 0, 8)  # covers 64
    assert object_f1(pred, truth) == 1.0


def test_shifted_square_dice_and_hausdorff():
    truth = square(np.zeros((12, 12), np.uint8), 2, 2, 4)
    pred = square(np.zeros((12, 12), np.uint8), 2, 3, 4)  # one column to the right: overlap 12 of 16
    assert object_dice(pred, truth) == pytest.approx(2 * 12 / 32)
    assert object_hausdorff(pred, truth) == pytest.approx(1.0)


def test_area_weighting_of_object_dice():
    truth = two_glands()  # areas 16 and 36
    pred = square(np.zeros((20, 20), np.uint8), 10, 10, 6)  # only the big gland, exactly
    # ground-truth side: 16/52 * 0 + 36/52 * 1; prediction side: 1 * 1
    assert object_dice(pred, truth) == pytest.approx(0.5 * (36 / 52 + 1.0))


def test_unmatched_object_uses_the_nearest_partner_for_hausdorff():
    truth = square(np.zeros((20, 20), np.uint8), 0, 0, 3)
    pred = square(np.zeros((20, 20), np.uint8), 0, 10, 3)  # no overlap, 10 columns away
    assert object_hausdorff(pred, truth) == pytest.approx(10.0)


def test_empty_masks():
    empty, truth = np.zeros((8, 8), np.uint8), square(np.zeros((8, 8), np.uint8), 1, 1, 3)
    assert object_f1(empty, empty) == 1.0 and object_dice(empty, empty) == 1.0 and object_hausdorff(empty, empty) == 0
    assert object_f1(empty, truth) == 0.0 and object_dice(empty, truth) == 0.0
    assert math.isinf(object_hausdorff(empty, truth))


def test_overlay_draws_prediction_green_and_truth_yellow():
    from scripts.data.images import draw_overlay

    image = np.full((20, 20, 3), 100, np.uint8)
    pred = square(np.zeros((20, 20), np.uint8), 2, 2, 8)
    truth = square(np.zeros((20, 20), np.uint8), 10, 10, 8)
    out = draw_overlay(image, pred, truth, width=1)
    assert tuple(out[2, 5]) == (0, 255, 0) and tuple(out[10, 12]) == (255, 255, 0)
    assert tuple(out[5, 5]) == (100, 100, 100) and tuple(out[0, 19]) == (100, 100, 100)


# --- which objects the ground truth holds: instance maps (GlaS) or thresholded grey-level masks (EBHI-SEG) ---

CONFIGS = __import__("pathlib").Path(__file__).resolve().parent.parent / "bundle" / "configs"


def evaluation_parser(**overrides):
    """train.json + evaluate.json as ``monai.bundle run evaluating`` reads them, with key overrides."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def evaluate_one(parser, image_path, mask_path, foreground):
    """One image through evaluate.json's preprocessing, post-processing and object metrics.

    The network's output is replaced by confident logits of ``foreground`` (H x W booleans).
    """
    import torch

    item = parser.get_parsed_content("validate#preprocessing")({"image": str(image_path), "label": str(mask_path)})
    fg = torch.as_tensor(foreground, dtype=torch.float32)
    logits = torch.stack([1 - fg, fg]) * 10.0
    out = parser.get_parsed_content("validate#postprocessing")({**item, "pred": logits})
    values = {}
    for name in ("val_object_f1", "val_object_dice"):
        metric = parser.get_parsed_content(f"validate#additional_metrics#{name}#metric_fn")
        values[name] = float(metric(y_pred=[out["pred"]], y=[out["gt_instances"]])[0, 0])
    return values, out


def grey_level_mask(rng, shape=(48, 64)):
    """Two separate glands drawn with many grey levels above 127 over background noise below 127."""
    mask = rng.integers(0, 127, shape).astype(np.uint8)  # noise: every value 0..126
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    glands = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 100) | ((yy - 30) ** 2 + (xx - 46) ** 2 <= 144)
    mask[glands] = rng.integers(128, 256, int(glands.sum()))  # every value 128..255
    return mask, glands


def test_grey_level_ground_truth_is_thresholded_not_read_as_instances(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    mask, glands = grey_level_mask(rng)
    assert len(np.unique(mask[glands])) > 100
    Image.fromarray(rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(mask, mode="L").save(tmp_path / "mask.png")
    # the EBHI-SEG presets' settings: foreground above 127, the glands are its connected components
    parser = evaluation_parser(label_threshold=127, instance_labels=False)
    values, out = evaluate_one(parser, tmp_path / "image.png", tmp_path / "mask.png", glands)
    assert np.array_equal(np.unique(out["gt_instances"].numpy()), [0, 1, 2])
    assert values == {"val_object_f1": 1.0, "val_object_dice": pytest.approx(1.0)}
    # read as an instance map, each grey level would be a gland of its own: F1 near 0 despite a perfect mask
    assert object_f1(glands.astype(np.uint8), instances(np.where(mask > 127, mask, 0))) < 0.05


def test_instance_map_ground_truth_keeps_touching_glands_apart(tmp_path):
    from PIL import Image

    truth = np.zeros((24, 32), np.uint8)
    truth[4:16, 4:14], truth[4:16, 14:26] = 1, 2  # two GlaS-style glands that touch
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(truth, mode="L").save(tmp_path / "mask.png")
    # the prediction finds the glands' area as one blob: one hit (the larger gland), one gland missed
    files = tmp_path / "image.png", tmp_path / "mask.png"
    as_ids, _ = evaluate_one(evaluation_parser(instance_labels=True), *files, truth > 0)
    assert as_ids["val_object_f1"] == pytest.approx(2 / 3)
    as_binary, _ = evaluate_one(evaluation_parser(instance_labels=False), *files, truth > 0)
    assert as_binary["val_object_f1"] == 1.0


def test_instances_threshold_and_reading():
    rng = np.random.default_rng(1)
    mask, glands = grey_level_mask(rng)
    labels = instances(mask, threshold=127, instance_labels=False)
    assert labels.max() == 2 and np.array_equal(labels > 0, glands)
    ids = square(square(np.full((20, 20), 3, np.uint8), 2, 2, 4, 7), 10, 10, 6, 9)  # background value 3
    assert set(np.unique(instances(ids, threshold=3))) == {0, 7, 9}
    assert set(np.unique(instances(ids, threshold=3, instance_labels=False))) == {0, 1, 2}


def test_instance_transform_refuses_a_non_boolean_setting():
    from scripts.errors import ConfigError
    from scripts.metrics import GlandInstancesd

    with pytest.raises(ConfigError, match="Config key 'instance_labels' is 'yes'"):
        GlandInstancesd(instance_labels="yes")


@pytest.mark.parametrize(
    "preset,expected", [("glas", True), ("ebhi_gland", False), ("ebhi_cancer", False), ("kpi", False)]
)
def test_dataset_presets_say_how_their_masks_hold_glands(preset, expected):
    import json

    from monai.bundle import ConfigParser

    assert json.loads((CONFIGS / "datasets" / f"{preset}.json").read_text())["instance_labels"] is expected
    # the preset before evaluate.json, as docs/data.md shows: evaluate.json must not reset the preset's value
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in ("train.json", f"datasets/{preset}.json", "evaluate.json")])
    step = parser.get_parsed_content("eval_keep_instances")
    assert step.instance_labels is expected and step.threshold == parser["label_threshold"]


def _reference_object_metrics(pred, truth):
    """Straight from the GlaS definitions, one full-image mask per object (slow, for small images only)."""
    from scipy import ndimage

    def objects(mask):
        ids = np.unique(mask[mask > 0])
        if len(ids) <= 1:
            mask, _ = ndimage.label(mask > 0, structure=np.ones((3, 3), dtype=bool))
            ids = np.unique(mask[mask > 0])
        return [mask == i for i in ids]

    seg, gt = objects(pred), objects(truth)
    ov = np.array([[np.count_nonzero(s & g) for g in gt] for s in seg])
    tp, used = 0, set()
    for j in range(len(seg)):
        best = int(ov[j].argmax())
        if ov[j, best] > 0 and ov[j, best] >= 0.5 * gt[best].sum() and best not in used:
            used.add(best)
            tp += 1
    f1 = 2 * tp / (2 * tp + len(seg) + len(gt) - 2 * tp)

    def dice(a, b):
        return 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())

    g_area, s_area = sum(g.sum() for g in gt), sum(s.sum() for s in seg)
    term_g = sum(g.sum() / g_area * (dice(g, seg[ov[:, i].argmax()]) if ov[:, i].max() > 0 else 0) for i, g in enumerate(gt))
    term_s = sum(s.sum() / s_area * (dice(s, gt[ov[j].argmax()]) if ov[j].max() > 0 else 0) for j, s in enumerate(seg))

    def boundary(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), dtype=bool), border_value=0))

    def hausdorff(a, b):
        d = np.sqrt(((boundary(a)[:, None, :] - boundary(b)[None, :, :]) ** 2).sum(-1))
        return max(d.min(1).max(), d.min(0).max())

    def partner(obj, others, counts):
        if counts.max() > 0:
            return hausdorff(obj, others[int(counts.argmax())])
        return min(hausdorff(obj, other) for other in others)

    haus_g = sum(g.sum() / g_area * partner(g, seg, ov[:, i]) for i, g in enumerate(gt))
    haus_s = sum(s.sum() / s_area * partner(s, gt, ov[j]) for j, s in enumerate(seg))
    return f1, 0.5 * (term_g + term_s), 0.5 * (haus_g + haus_s)


@pytest.mark.parametrize("seed, id_step", [(3, 1), (5, 7)])
def test_object_metrics_of_speckled_masks_match_the_definitions(seed, id_step):
    rng = np.random.default_rng(seed)
    truth = np.zeros((60, 80), dtype=np.int64)
    for k in range(1, 7):
        y, x = rng.integers(5, 50), rng.integers(5, 70)
        truth[y - 4:y + 5, x - 5:x + 6] = k * id_step  # later glands overwrite earlier ones where they touch
    pred = ((truth > 0) & (rng.random(truth.shape) > 0.1)) | (rng.random(truth.shape) > 0.97)
    pred = pred.astype(np.uint8) * 255
    f1, dice, hausdorff = _reference_object_metrics(pred, truth)
    assert object_f1(pred, truth) == pytest.approx(f1, abs=1e-12)
    assert object_dice(pred, truth) == pytest.approx(dice, abs=1e-12)
    # speckles that touch no gland take the nearest gland in Hausdorff distance, one distance matrix for all glands
    assert object_hausdorff(pred, truth) == pytest.approx(hausdorff, abs=1e-9)
    assert 0 < f1 < 0.5  # speckles are false positives
