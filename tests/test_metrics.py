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
    from scripts.handlers import draw_overlay

    image = np.full((20, 20, 3), 100, np.uint8)
    pred = square(np.zeros((20, 20), np.uint8), 2, 2, 8)
    truth = square(np.zeros((20, 20), np.uint8), 10, 10, 8)
    out = draw_overlay(image, pred, truth, width=1)
    assert tuple(out[2, 5]) == (0, 255, 0) and tuple(out[10, 12]) == (255, 255, 0)
    assert tuple(out[5, 5]) == (100, 100, 100) and tuple(out[0, 19]) == (100, 100, 100)
