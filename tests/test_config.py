"""Config values: yes / no keys from the command line, training configs refused up front, one autocast dtype."""

from pathlib import Path

import pytest

from scripts.config import as_bool
from scripts.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "bundle" / "configs"


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("true", True), ("False", False),
                                            (" TRUE ", True), ("false", False)])
def test_as_bool_reads_json_and_command_line_spellings(value, expected):
    assert as_bool(value, "resume") is expected


@pytest.mark.parametrize("value", ["yes", "0", 1, None, "flase"])
def test_as_bool_refuses_anything_else_and_names_the_key(value):
    with pytest.raises(ConfigError, match="Config key 'resume'"):
        as_bool(value, "resume")


def test_resume_false_from_the_command_line_does_not_resume(tmp_path):
    from scripts.handlers import ResumeFromCheckpoint

    (tmp_path / "checkpoint.pt").write_bytes(b"not read")
    assert ResumeFromCheckpoint(str(tmp_path / "checkpoint.pt"), {}, enabled="false").enabled is False
    assert ResumeFromCheckpoint(str(tmp_path / "checkpoint.pt"), {}, enabled="true").enabled is True


# ------------------------------------------------------------------------- bad configuration, refused up front
def _checked(**changes):
    from scripts.config import check_training_config
    from scripts.engines import resolve_method

    settings = dict(method_config=resolve_method("mpamatch"), learning_rate=0.01, encoder_lr_scale=0.1, num_epochs=6,
                    num_iterations=None, labeled_batch_size=2, unlabeled_batch_size=2, num_classes=2,
                    class_descriptions=["stroma", "gland"], text_source="prompt",
                    datalists={"training": [{}] * 3, "unlabeled": [{}] * 5}, datalist="demo.json")
    settings.update(changes)
    check_training_config(**settings)


def test_a_sound_training_config_passes():
    _checked()
    _checked(num_iterations=600, num_epochs=0)  # an iteration budget replaces num_epochs
    from scripts.engines import resolve_method

    _checked(method_config=resolve_method("supervised"), unlabeled_batch_size=50, class_descriptions=[])  # unused


@pytest.mark.parametrize("changes,message", [
    ({"learning_rate": -0.01}, "Config key 'learning_rate' is -0.01; it must be a positive number, e.g. 0.01."),
    ({"learning_rate": 0}, "Config key 'learning_rate' is 0; it must be a positive number"),
    ({"learning_rate": "fast"}, "Config key 'learning_rate' is 'fast'"),
    ({"encoder_lr_scale": -1}, "Config key 'encoder_lr_scale' is -1; it must be a number >= 0"),
    ({"num_epochs": 0}, "Config key 'num_epochs' is 0; it must be a positive whole number, e.g. 6."),
    ({"num_epochs": 2.5}, "Config key 'num_epochs' is 2.5; it must be a positive whole number"),
    ({"num_iterations": -5}, "Config key 'num_iterations' is -5; it must be a positive whole number"),
    ({"num_classes": 1}, "Config key 'num_classes' is 1; a segmentation needs at least 2"),
    ({"labeled_batch_size": 4}, "Config key 'labeled_batch_size' is 4, more than the 3 images in the 'training' "
                                "section of 'demo.json'; use at most 3, e.g. --labeled_batch_size 3"),
    ({"unlabeled_batch_size": 8}, "Config key 'unlabeled_batch_size' is 8, more than the 5 images in the 'unlabeled'"),
    ({"labeled_batch_size": 0}, "Config key 'labeled_batch_size' is 0; it must be a positive whole number"),
    ({"class_descriptions": ["gland"]}, "Config key 'class_descriptions' has 1 entries for num_classes=2"),
])
def test_bad_training_config_is_refused_naming_key_value_and_example(changes, message):
    with pytest.raises(ConfigError) as caught:
        _checked(**changes)
    assert message in str(caught.value)


def test_roi_size_of_the_wrong_length_names_the_key():
    from scripts.data import check_roi_size

    with pytest.raises(ConfigError, match=r"Config key 'roi_size' is \[224\]; it needs 2 sides \(height, width\)"):
        check_roi_size([224], 16)


# --------------------------------------------------------------------------------- one autocast dtype everywhere
@pytest.mark.parametrize("files,item", [
    (["train.json"], "validate#evaluator#amp_kwargs"),
    (["train.json", "evaluate.json"], "validate#evaluator#amp_kwargs"),
])
def test_validation_evaluation_and_inference_autocast_in_the_configured_dtype(files, item):
    import torch
    from monai.bundle import ConfigParser

    for dtype in ("bfloat16", "float16"):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / name) for name in files])
        parser["amp_dtype"] = dtype
        assert parser.get_parsed_content(item) == {"dtype": getattr(torch, dtype)}


def test_inference_autocasts_in_the_configured_dtype():
    """inference.json autocasts in its inferer (so MONAI Label and the Deploy app, which call the inferer, do too);
    MONAI's evaluator, which would autocast on CUDA only, is left out of it."""
    import torch
    from monai.bundle import ConfigParser

    for dtype in ("bfloat16", "float16"):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "inference.json")])
        parser.update({"amp_dtype": dtype, "amp": True, "device": "$torch.device('cuda')"})
        assert parser.get_parsed_content("inferer").autocast == getattr(torch, dtype)
        assert parser.get_parsed_content("evaluator#amp") is False
    parser["amp"] = False
    assert parser.get_parsed_content("inferer").autocast is None


def test_whole_slide_segmenter_takes_the_configured_dtype():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "inference_wsi.json")])
    assert parser["slide_segmenter"]["amp_dtype"] == "@amp_dtype" and parser["amp_dtype"] == "bfloat16"
