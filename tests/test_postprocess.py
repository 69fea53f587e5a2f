"""Gland post-processing: small objects, holes, touching glands, the transform's layout, and the config wiring."""

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from scripts.errors import ConfigError
from scripts.inference import GlandPostprocessd, postprocess_mask, split_touching_objects

CONFIGS = Path(__file__).resolve().parent.parent / "bundle" / "configs"
EIGHT = np.ones((3, 3), dtype=bool)


def disk(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def count_objects(mask):
    return ndimage.label(mask > 0, structure=EIGHT)[1]


def speckled_mask():
    """A 0/255 mask: a gland with a 5 x 5 hole, a 12-pixel object, and speckles of 1, 2 and 4 pixels."""
    mask = np.zeros((64, 64), np.uint8)
    mask[disk(mask.shape, 20, 20, 12)] = 255
    mask[18:23, 18:23] = 0  # the hole (lumen left out)
    mask[50:53, 50:54] = 255  # 12 pixels: kept with min_object_size 10
    mask[5, 55] = 255
    mask[40, 5:7] = 255
    mask[60:62, 30:32] = 255
    return mask


def test_small_objects_removed_larger_kept():
    mask = speckled_mask()
    out = postprocess_mask(mask, min_object_size=10)
    assert count_objects(mask) == 5 and count_objects(out) == 2
    assert out[5, 55] == out[40, 5] == out[60, 30] == 0
    assert (out[50:53, 50:54] == 255).all()
    assert out.dtype == mask.dtype and set(np.unique(out)) == {0, 255}
    assert (out[18:23, 18:23] == 0).all()  # holes are left alone unless asked
    assert np.array_equal(postprocess_mask(mask, min_object_size=0), mask)


def test_holes_filled():
    mask = speckled_mask()
    out = postprocess_mask(mask, fill_holes=True)
    assert (out[18:23, 18:23] == 255).all()
    assert np.array_equal(out[mask > 0], mask[mask > 0])
    assert (out > 0).sum() == (mask > 0).sum() + 25
    both = postprocess_mask(mask, min_object_size=10, fill_holes=True)
    assert count_objects(both) == 2 and (both[18:23, 18:23] == 255).all()


def test_touching_glands_split_only_when_asked():
    shape = (80, 120)
    blob = (disk(shape, 40, 35, 20) | disk(shape, 40, 70, 18)).astype(np.uint8) * 255  # two disks with a neck
    assert count_objects(blob) == 1
    assert count_objects(postprocess_mask(blob)) == 1
    split = postprocess_mask(blob, split_touching=True)
    assert count_objects(split) == 2
    assert ((blob > 0) & (split == 0)).sum() < 30  # a one-pixel cut across the neck, nothing else
    assert not (split > blob).any()
    # glands of unequal size are split too; one round gland or two heavily overlapping disks are not
    assert split_touching_objects(disk(shape, 40, 40, 25) | disk(shape, 40, 74, 10)).max() == 2
    assert split_touching_objects(disk(shape, 40, 60, 25)).max() == 1
    assert split_touching_objects(disk(shape, 40, 50, 20) | disk(shape, 40, 62, 20)).max() == 1


def test_each_class_processed_on_its_own():
    mask = np.zeros((40, 40), np.int64)
    mask[disk(mask.shape, 12, 12, 8)] = 1
    mask[11:14, 11:14] = 0  # hole in class 1
    mask[disk(mask.shape, 28, 28, 8)] = 2
    mask[2, 38] = 2  # speckle of class 2
    out = postprocess_mask(mask, min_object_size=5, fill_holes=True)
    assert (out[11:14, 11:14] == 1).all() and out[2, 38] == 0
    assert np.array_equal(out == 2, disk(mask.shape, 28, 28, 8))


@pytest.mark.parametrize("kwargs,key", [
    ({"min_object_size": -1}, "min_object_size"),
    ({"min_object_size": 2.5}, "min_object_size"),
    ({"fill_holes": "yes"}, "fill_holes"),
    ({"split_touching": 1}, "split_touching"),
])
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"Config key '{key}' is"):
        GlandPostprocessd(**kwargs)
    with pytest.raises(ConfigError, match=f"Config key '{key}' is"):
        postprocess_mask(np.zeros((4, 4), np.uint8), **kwargs)


def test_command_line_true_and_false_are_accepted():
    # ``--fill_holes true`` reaches the config as the string 'true'
    step = GlandPostprocessd(fill_holes="true", split_touching="False")
    assert step.fill_holes is True and step.split_touching is False


def test_transform_keeps_one_hot_layout_and_metadata():
    indices = torch.from_numpy((speckled_mask() > 0).astype(np.int64))
    one_hot = MetaTensor(torch.stack([indices == 0, indices == 1]).float(), meta={"filename_or_obj": "a.png"})
    out = GlandPostprocessd(min_object_size=10, fill_holes=True)({"pred": one_hot, "other": 1})["pred"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a.png"
    assert out.shape == one_hot.shape and out.dtype == one_hot.dtype
    assert torch.equal(out.sum(0), torch.ones(64, 64))  # still one-hot
    expected = postprocess_mask(indices.numpy(), min_object_size=10, fill_holes=True)
    assert np.array_equal(out[1].numpy(), expected.astype(np.float32))
    assert torch.equal(one_hot[1], indices.float())  # the input is not modified


def test_transform_keeps_class_index_layout_and_passes_through_when_off():
    mask = torch.from_numpy((speckled_mask() > 0).astype(np.float32))
    indices = MetaTensor(mask[None], meta={"filename_or_obj": "b.png"})
    out = GlandPostprocessd(min_object_size=10)({"pred": indices})["pred"]
    assert out.shape == (1, 64, 64) and out.meta["filename_or_obj"] == "b.png"
    assert out[0, 5, 55] == 0 and out[0, 50, 50] == 1
    data = {"pred": indices}
    assert GlandPostprocessd()(data)["pred"] is indices


def test_inference_config_applies_postprocessing_before_saving(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    assert (parser["min_object_size"], parser["fill_holes"], parser["split_touching"]) == (0, False, False)
    parser.update({"min_object_size": 10, "fill_holes": True, "output_dir": str(tmp_path)})
    transforms = parser.get_parsed_content("postprocessing").transforms
    names = [type(t).__name__ for t in transforms]
    assert names.index("AsDiscreted") < names.index("GlandPostprocessd") < names.index("SavePredictiond")
    step = transforms[names.index("GlandPostprocessd")]
    assert (step.min_object_size, step.fill_holes, step.split_touching) == (10, True, False)


def test_evaluation_config_postprocesses_before_the_metrics():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    assert (parser["min_object_size"], parser["fill_holes"], parser["split_touching"]) == (0, False, False)
    parser.update({"min_object_size": 10, "fill_holes": True})
    post = parser.get_parsed_content("validate#postprocessing")
    mask = torch.from_numpy((speckled_mask() > 0).astype(np.float32))
    label = MetaTensor(mask[None], meta={"filename_or_obj": "c.png"})
    out = post({"pred": torch.stack([1 - mask, mask]) * 10.0, "label": label, "label_instances": label.clone()})
    # what every metric reads: the one-hot prediction, without speckles and with the hole filled
    assert out["pred"].shape == (2, 64, 64)
    assert out["pred"][1, 5, 55] == 0 and (out["pred"][1, 18:23, 18:23] == 1).all()
    assert out["label"].shape == (2, 64, 64) and "gt_instances" in out
