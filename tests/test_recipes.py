"""The recipes of bundle/configs/recipes/ over training, evaluation and inference, parsed as a user's command layers
them; the foundation-model encoders are built on the meta device, so UNI and UNI2-h cost no memory here."""

import json

import pytest
import torch
from monai.bundle import ConfigParser

from scripts.data import check_roi_size
from scripts.errors import ConfigError
from scripts.networks import NETWORK_KEYS, WINDOW_KEYS, build_encoder, encoder_patch_size
from tests.helpers import REPO

CONFIGS = REPO / "bundle" / "configs"
RECIPES = sorted(path.name for path in (CONFIGS / "recipes").glob("*.json"))
# The foundation-model recipes: the encoder each trains and the file name its weights are read from.
FOUNDATION = {"uni.json": "uni", "uni2h.json": "uni2-h"}


def parsed(tmp_path, names, **overrides):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in names])
    parser["bundle_root"] = str(tmp_path)  # no model.pt there: evaluation and inference read the config's keys
    for key, value in overrides.items():
        parser[key] = value
    return parser


def window_fits(parser, settings):
    """The window of ``settings`` checked against the patch of the encoder they name, built on the meta device."""
    with torch.device("meta"):
        encoder = build_encoder(settings["encoder_name"], **settings["encoder_kwargs"])
    return check_roi_size(settings["roi_size"], encoder_patch_size(encoder))


def test_recipes_set_only_keys_the_configs_read():
    train = json.loads((CONFIGS / "train.json").read_text())
    for name in RECIPES:
        recipe = json.loads((CONFIGS / "recipes" / name).read_text())
        unknown = sorted(set(recipe) - set(train) - ({"conch_dir"} if name in FOUNDATION else set()))
        assert not unknown, f"recipes/{name} sets {unknown}, which train.json does not read (a typo is ignored)"


def test_the_refused_uni2h_window_names_the_nearest_valid_ones():
    with pytest.raises(ConfigError, match=r"patch size 14: use 252 or 266 instead of 256, e\.g\. --roi_size "
                                          r"\[252,252\]"):
        check_roi_size([256, 256], 14)


@pytest.mark.parametrize("preset", [None, "glas.json", "kpi.json"])
@pytest.mark.parametrize("recipe", sorted(FOUNDATION))
def test_foundation_recipe_trains_the_method_setting(tmp_path, recipe, preset):
    names = ["train.json", *([f"datasets/{preset}"] if preset else []), f"recipes/{recipe}"]
    parser = parsed(tmp_path, names)
    record = parser.get_parsed_content("model_record")
    assert record["encoder_name"] == FOUNDATION[recipe] and record["hybrid"] is False
    assert record["skip_channels"] == [512, 256, 64] and record["decoder_channels"] == [256, 128, 64, 16]
    assert window_fits(parser, record) == record["roi_size"]  # refused at start otherwise
    assert (parser["labeled_batch_size"], parser["unlabeled_batch_size"], parser["amp_dtype"]) == (8, 8, "bfloat16")
    assert parser.get_parsed_content("train#method_config").name == "mpamatch"
    # the network reads the recipe's weights file, which names its encoder's folder
    assert "encoder_weights=@encoder_weights" in parser["network_def"]
    assert parser.get_parsed_content("encoder_weights").endswith(f"/{FOUNDATION[recipe]}/pytorch_model.bin")


@pytest.mark.parametrize("recipe", sorted(FOUNDATION))
def test_foundation_recipe_layers_on_evaluation_and_inference(tmp_path, recipe):
    """Evaluation with the recipe (no model yet) builds the recipe's network; inference, with or without the recipe,
    builds the one the trained model records (a record alone stands for the model here: nothing loads weights)."""
    trained = parsed(tmp_path, ["train.json", f"recipes/{recipe}"]).get_parsed_content("model_record")
    (tmp_path / "recorded" / "models").mkdir(parents=True)
    torch.save({"model": {}, "config": trained}, tmp_path / "recorded" / "models" / "model.pt")
    for names, root in ((["train.json", f"recipes/{recipe}", "evaluate.json"], tmp_path),
                        (["inference.json", f"recipes/{recipe}"], tmp_path / "recorded"),
                        (["inference.json"], tmp_path / "recorded")):
        parser = parsed(root, names)
        settings = parser.get_parsed_content("model_settings")
        assert {key: settings[key] for key in NETWORK_KEYS + WINDOW_KEYS} == \
            {key: trained[key] for key in NETWORK_KEYS + WINDOW_KEYS}, names
        assert window_fits(parser, settings) == trained["roi_size"]
        # the trained model.pt holds the encoder: evaluation and inference never need the published weights file
        assert parser["network_def"] == "$scripts.networks.network_from_record(@model_settings)", names


def test_conch_dir_sets_the_text_tower_in_one_key(tmp_path):
    from tests.helpers import CONCH_TINY, conch_state, write_conch_tokenizer

    parser = parsed(tmp_path, ["train.json", "recipes/uni.json"])
    assert [parser.get_parsed_content(key) for key in ("text_arch", "text_weights", "text_tokenizer")] == \
        ["ViT-B-16", None, None]  # no CONCH: train.json's random tower, announced by the run

    folder = tmp_path / "conch"
    folder.mkdir()
    torch.save(conch_state(CONCH_TINY), folder / "pytorch_model.bin")
    parser = parsed(tmp_path, ["train.json", "recipes/uni.json"], conch_dir=str(folder))
    with pytest.raises(RuntimeError) as err:  # MONAI's parser wraps the error the entry points print
        parser.get_parsed_content("text_tokenizer")
    assert isinstance(err.value.__cause__, ConfigError)
    assert f"CONCH folder '{folder}' (config key 'conch_dir') has no conch_byte_level_bpe_uncased.json" in \
        str(err.value.__cause__)

    write_conch_tokenizer(folder / "conch_byte_level_bpe_uncased.json")
    parser = parsed(tmp_path, ["train.json", "recipes/uni.json"], conch_dir=str(folder), text_cfg=CONCH_TINY)
    assert parser.get_parsed_content("text_weights") == str(folder / "pytorch_model.bin")
    prompts = parser.get_parsed_content("train#text_prototypes")  # the tower the trainer gets, CONCH's weights loaded
    assert prompts.has_language_prior and prompts.ctx.shape == (8, CONCH_TINY["width"])
