"""Command-line keys that no config file defines are refused before any work: the one reader of the
``python -m monai.bundle`` command line (scripts/bundle_args.py), the check in every config's ``initialize``, and
real bundle commands with a misspelt key."""

import json
import sys
from pathlib import Path

import monai.bundle.__main__ as bundle_main
import pytest
from monai.bundle import ConfigWorkflow

from scripts.bundle_args import bundle_arguments, check_command_line_keys, parse_bundle_arguments
from scripts.errors import ConfigError
from tests.helpers import REPO, run_python

CONFIGS = REPO / "bundle" / "configs"
TRAIN, EVALUATE, INFERENCE = (str(CONFIGS / f"{name}.json") for name in ("train", "evaluate", "inference"))
ENTRY = bundle_main.__file__  # sys.argv[0] of python -m monai.bundle


def _files(*names: str) -> str:
    return "[" + ",".join(f"'{CONFIGS / name}'" for name in names) + "]"


def _product_error(error: BaseException | None) -> ConfigError | None:
    """The ConfigError that MONAI wrapped while it evaluated a config expression."""
    while error is not None and not isinstance(error, ConfigError):
        error = error.__cause__ or error.__context__
    return error


# ----------------------------------------------------------------------------------------- reading the command line
def test_the_command_its_own_arguments_and_the_config_keys_are_told_apart():
    parsed = parse_bundle_arguments(["run", "training", "--config_file", _files("train.json", "evaluate.json"),
                                     "--encoder_kwargs#depth", "6", "--roi_size=[64,64]", "--decoder::x", "1",
                                     "--tta", "--run_id", "evaluating", "--lambda_img", "-0.5", "--wsi-mpp", "0.5"])
    assert parsed.command == "run" and parsed.positional == ("training",)
    assert parsed.arguments["run_id"] == "evaluating"
    assert parsed.config_files == [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")]
    assert parsed.overrides == ("encoder_kwargs#depth", "roi_size", "decoder::x", "tta", "lambda_img", "wsi_mpp")
    assert parsed.keys == {"encoder_kwargs", "roi_size", "decoder", "tta", "lambda_img", "wsi_mpp"}


def test_flags_without_a_value_and_fire_s_own_flags_follow_fire():
    # "--notta" alone sets tta to false in fire; after a lone "--" the flags are fire's (--help), not config keys
    parsed = parse_bundle_arguments(["run", "--config_file", TRAIN, "--notta", "--", "--help", "--verbose"])
    assert parsed.keys == {"tta"}
    # comma-separated files are read as MONAI reads them
    assert parse_bundle_arguments(["run", "--config_file", f"{TRAIN},{EVALUATE}"]).config_files == [TRAIN, EVALUATE]
    # overrides alone are read as those of run: config_file is an argument there, not a key
    overrides = parse_bundle_arguments(["--roi_size", "[64,64]", "--config_file", TRAIN, "--class_names#1", "crypt"])
    assert overrides.keys == {"roi_size", "class_names"}


def test_export_commands_have_their_own_arguments():
    parsed = parse_bundle_arguments(["onnx_export", "network_def", "--filepath", "m.onnx", "--ckpt_file", "m.pt",
                                     "--key_in_ckpt", "model", "--config_file", INFERENCE, "--use_trace", "true",
                                     "--roi_size", "[32,32]"])
    assert parsed.positional == ("network_def",) and parsed.keys == {"roi_size"}
    # under run, ckpt_file is no argument of MONAI's: it is a config key
    assert parse_bundle_arguments(["run", "--ckpt_file", "m.pt"]).keys == {"ckpt_file"}


def test_args_file_keys_count_as_command_line_keys(tmp_path):
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": INFERENCE, "run_id": "inference", "input_dir": "tiles",
                                     "save_overlay": True}))
    parsed = parse_bundle_arguments(["run", "--args_file", str(args_file), "--tta", "true"])
    assert parsed.config_files == [INFERENCE] and parsed.arguments["run_id"] == "inference"
    assert parsed.keys == {"tta", "input_dir", "save_overlay"}
    with pytest.raises(ConfigError, match=r"--save_overlay \(did you mean save_overlays"):
        check_command_line_keys([ENTRY, "run", "--args_file", str(args_file)])
    # the command line wins over the file, as in MONAI
    given_both = parse_bundle_arguments(["run", "--args_file", str(args_file), "--config_file", TRAIN])
    assert given_both.config_files == [TRAIN]


@pytest.mark.parametrize("argv", [
    ["/usr/bin/pytest", "run", "--config_file", TRAIN, "--encoder_weight", "x"],  # a test process
    ["monailabel/main.py", "start_server", "--app", "scripts/monailabel", "--conf", "model_path", "m.pt"],
    [ENTRY, "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "schema.json"],  # no config keys
    [ENTRY],
])
def test_a_process_not_started_by_a_config_command_of_monai_bundle_has_nothing_to_check(argv, monkeypatch):
    assert bundle_arguments(argv) is None
    check_command_line_keys(argv)  # no error
    monkeypatch.setattr(sys, "argv", argv)
    assert bundle_arguments() is None


# ----------------------------------------------------------------------------------------------------- the check
def test_a_misspelt_key_is_refused_naming_it_and_the_closest_keys():
    with pytest.raises(ConfigError) as raised:
        check_command_line_keys([ENTRY, "run", "training", "--config_file", TRAIN, "--encoder_weight", "/uni.bin",
                                 "--roi_size", "[64,64]"])
    message = str(raised.value)
    assert message.startswith("Unknown config key on the command line: --encoder_weight (did you mean encoder_weights")
    assert "roi_size" not in message.split("did you mean")[0] and "\n" not in message
    assert f"No config file of this command ({TRAIN}) defines it" in message
    assert "passed last in --config_file" in message


def test_inference_refuses_network_keys_and_points_at_model_overrides():
    """inference.json lists no network key: one on its command line (even where a recipe defines it) would be
    ignored, since the model's record decides, so it is refused with the model_overrides form; training and
    evaluation, which take them, accept them."""
    from scripts.networks import RECORD_KEYS

    for files in (INFERENCE, _files("inference.json", "recipes/cpu.json"), _files("inference.json", "inference_wsi.json")):
        with pytest.raises(ConfigError) as raised:
            check_command_line_keys([ENTRY, "run", "--config_file", files, "--roi_size", "[64,64]", "--class_names",
                                     "['a','b']"], record_keys=RECORD_KEYS)
        message = str(raised.value)
        assert message.startswith("--class_names, --roi_size: inference takes the network, window and class names "
                                  "from the trained model's record"), message
        assert """--model_overrides "{'class_names': ..., 'roi_size': ...}".""" in message
    check_command_line_keys([ENTRY, "run", "--config_file", INFERENCE, "--model_overrides", "{'roi_size': [64, 64]}"],
                            record_keys=RECORD_KEYS)
    check_command_line_keys([ENTRY, "run", "evaluating", "--config_file", _files("train.json", "evaluate.json"),
                             "--roi_size", "[64,64]"], record_keys=RECORD_KEYS)
    with pytest.raises(ConfigError, match=r"--encoder_nme \(did you mean encoder_name, "):
        check_command_line_keys([ENTRY, "run", "--config_file", INFERENCE, "--encoder_nme", "x"],
                                record_keys=RECORD_KEYS)


def test_every_unknown_key_is_named_and_a_misspelt_argument_of_run_is_suggested_too():
    with pytest.raises(ConfigError) as raised:
        check_command_line_keys([ENTRY, "run", "evaluating", "--config_file", _files("train.json", "evaluate.json"),
                                 "--eval_sectoin", "test", "--config_files", "x.json", "--zzqq", "1"])
    message = str(raised.value)
    assert message.startswith("Unknown config keys on the command line: --config_files (did you mean config_file")
    assert "--eval_sectoin (did you mean eval_section" in message and "--zzqq (no similar key)" in message


def test_a_nested_key_is_checked_by_its_top_level_part():
    check_command_line_keys([ENTRY, "run", "--config_file", TRAIN, "--train#trainer#max_epochs", "2",
                             "--encoder_kwargs#depth", "6"])
    with pytest.raises(ConfigError, match=r"--trian \(did you mean train"):
        check_command_line_keys([ENTRY, "run", "--config_file", TRAIN, "--trian#trainer#max_epochs", "2"])


def test_a_key_defined_in_the_user_s_own_config_file_is_known(tmp_path):
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"site_name": "lab 2", "handlers#0#_disabled_": False}))
    files = f"['{TRAIN}','{own}']"
    check_command_line_keys([ENTRY, "run", "training", "--config_file", files, "--site_name", "lab 3"])
    with pytest.raises(ConfigError, match="--site_name"):
        check_command_line_keys([ENTRY, "run", "training", "--config_file", TRAIN, "--site_name", "lab 3"])


def test_tracking_keys_are_known_only_with_tracking():
    check_command_line_keys([ENTRY, "run", "--config_file", TRAIN, "--tracking", "mlflow", "--tracking_uri", "x",
                             "--experiment_name", "glands"])
    with pytest.raises(ConfigError, match="--tracking_uri"):
        check_command_line_keys([ENTRY, "run", "--config_file", TRAIN, "--tracking_uri", "x"])


# Every bundle command, as the README and docs/scale.md give it; the check is the first thing its initialize does.
COMMANDS = [
    ("training", ["train.json"]),
    ("training", ["train.json", "recipes/cpu.json"]),
    ("evaluating", ["train.json", "evaluate.json"]),
    ("inference", ["inference.json"]),
    ("run", ["inference.json", "inference_wsi.json"]),
    ("training", ["train.json", "multi_gpu_train.json"]),
    ("evaluating", ["train.json", "evaluate.json", "multi_gpu_evaluate.json"]),
    ("inference", ["inference.json", "multi_gpu_inference.json"]),
    ("run", ["inference.json", "inference_wsi.json", "multi_gpu_inference.json"]),
]


@pytest.mark.parametrize("run_id,names", COMMANDS, ids=["+".join(n) for _, n in COMMANDS])
def test_every_config_refuses_an_unknown_key_first_thing(run_id, names, monkeypatch, tmp_path):
    # every path a config would write to is under tmp_path, so that a check that let the key pass writes nowhere else
    paths = {"bundle_root": str(tmp_path), "demo_dir": str(tmp_path / "demo")}
    monkeypatch.setattr(sys, "argv", [ENTRY, "run", run_id, "--config_file", _files(*names), "--input_dirr", "x",
                                      *[token for key, value in paths.items() for token in (f"--{key}", value)]])
    monkeypatch.setenv("MPAMATCH_CACHE", str(tmp_path / "cache"))  # the demo slide's folder
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # initialize installs the product's hook
    workflow = ConfigWorkflow(config_file=[str(CONFIGS / n) for n in names], logging_file=False,
                              meta_file=str(CONFIGS / "metadata.json"), run_id=run_id, **paths)
    with pytest.raises(Exception) as raised:
        workflow.initialize()
    error = _product_error(raised.value)
    assert error is not None and "--input_dirr" in str(error), raised.value
    # nothing after the check ran: no process group, no lock, no demo data, no network
    assert list(tmp_path.iterdir()) == []
    evaluated = workflow.parser.ref_resolver.resolved_content
    assert not {"datalists", "network", "model_settings", "inputs"} & set(evaluated)


@pytest.mark.parametrize("command", ["onnx_export", "ckpt_export"])
def test_monai_export_commands_refuse_an_unknown_key_before_building_the_network(command, monkeypatch, tmp_path):
    from monai.bundle import scripts as bundle_scripts

    (tmp_path / "model.pt").write_bytes(b"never read")  # ckpt_export wants the file to exist before parsing
    args = {"filepath": str(tmp_path / "model.out"), "ckpt_file": str(tmp_path / "model.pt"), "config_file": INFERENCE,
            "input_shape": [1, 3, 32, 32], "bundle_root": str(tmp_path), "encoder_nme": "vit_tiny"}
    monkeypatch.setattr(sys, "argv", [ENTRY, command, "network_def",
                                      *[token for key, value in args.items() for token in (f"--{key}", str(value))]])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the check installs the product's hook
    built = []
    monkeypatch.setattr("scripts.networks.UNITransUNet.__init__", lambda *a, **k: built.append(1))
    with pytest.raises(Exception) as raised:
        getattr(bundle_scripts, command)(net_id="network_def", **args)
    error = _product_error(raised.value)
    assert error is not None and "--encoder_nme (did you mean encoder_name" in str(error), raised.value
    assert not built and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# ---------------------------------------------------------------------------------------- real bundle commands
def test_training_with_a_misspelt_key_stops_before_any_work(tmp_path):
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"site_name": "lab 2"}))
    result = run_python(["-m", "monai.bundle", "run", "training", "--config_file", f"['{TRAIN}','{own}']",
                         "--encoder_weight", tmp_path / "uni.bin", "--site_name", "lab 3",
                         "--datalist", tmp_path / "datalist.json", "--demo_dir", tmp_path / "demo",
                         "--ckpt_dir", tmp_path / "models", "--output_dir", tmp_path / "runs"])
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(error) == 1 and "--encoder_weight (did you mean encoder_weights" in error[0], result.stderr[-2000:]
    assert "site_name" not in error[0] and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json"]  # no models/, runs/, demo data


@pytest.mark.parametrize("run_id,names,typo,meant", [
    ("inference", ["inference.json"], "input_dirr", "input_dir"),
    ("evaluating", ["train.json", "evaluate.json"], "eval_sectoin", "eval_section"),
])
def test_inference_and_evaluation_with_a_misspelt_key_stop_before_any_work(run_id, names, typo, meant, tmp_path):
    result = run_python(["-m", "monai.bundle", "run", run_id, "--config_file", _files(*names), f"--{typo}", "test",
                         "--bundle_root", tmp_path / "bundle", "--demo_dir", tmp_path / "demo",
                         "--output_dir", tmp_path / "out", "--ckpt_path", tmp_path / "bundle" / "model.pt"])
    assert result.returncode != 0
    assert f"ERROR: Unknown config key on the command line: --{typo} (did you mean {meant}" in result.stderr, \
        result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
