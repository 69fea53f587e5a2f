"""Promises the repository makes to users: CI runs the README's test commands, configs agree with each other."""

import ast
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_python

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "bundle" / "configs"


def _readme_command(marker):
    """The command two lines below ``<!-- marker -->`` in README.md (the line after the code fence)."""
    readme = (REPO / "README.md").read_text().splitlines()
    return readme[readme.index(f"<!-- {marker} -->") + 2]


def test_ci_runs_the_readme_test_commands_in_order_and_fails_if_either_fails(tmp_path):
    main, deploy = _readme_command("test-command"), _readme_command("deploy-test-command")
    assert "pip install -r requirements.txt" in main and "pytest -q tests" in main
    assert "pip install -r requirements.txt -r scripts/deploy/app/requirements.txt" in deploy
    assert "MPAMATCH_REQUIRE_DEPLOY=1" in deploy and "pytest -q tests/test_deploy_app.py" in deploy
    readme = (REPO / "README.md").read_text()
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")

    def ci(first, second, text=readme):
        """.ci/run on a copy of README.md whose two test commands are ``first`` and ``second``."""
        (tmp_path / "README.md").write_text(text.replace(main, first).replace(deploy, second))
        return subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60)

    result = ci("echo one", "echo two")
    assert result.returncode == 0 and result.stdout == "+ echo one\none\n+ echo two\ntwo\n", result.stdout
    result = ci("exit 3", "echo two")  # the deploy tests still run after the main ones failed
    assert result.returncode == 3 and result.stdout.endswith("two\n") and "'<!-- test-command -->'" in result.stderr
    assert ci("true", "exit 5").returncode == 5  # pytest's "no tests ran" fails CI
    result = ci("true", "true", readme.replace("<!-- deploy-test-command -->", ""))
    assert result.returncode == 2 and "no command after '<!-- deploy-test-command -->'" in result.stderr


def test_only_a_new_training_lists_the_network_keys():
    """A user reads a new training's network keys in train.json: they are the defaults of the one description,
    ``scripts.networks.RECORD_FIELDS``. No other config lists them: evaluation, inference and the whole-slide
    config take the network and window from the model's record."""
    from monai.bundle import ConfigParser

    from scripts.networks import DEFAULT_RECORD, RECORD_KEYS

    config = json.loads((CONFIGS / "train.json").read_text())
    assert {key: config[key] for key in RECORD_KEYS} == DEFAULT_RECORD
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    assert parser.get_parsed_content("model_record") == DEFAULT_RECORD
    for name in ("evaluate.json", "inference.json", "inference_wsi.json", "multi_gpu_inference.json",
                 "multi_gpu_evaluate.json", "multi_gpu_train.json"):
        config = json.loads((CONFIGS / name).read_text())
        assert not set(config) & set(RECORD_KEYS), name
        text = json.dumps(config)
        assert not [key for key in RECORD_KEYS if f"@{key}" in text.replace("@num_classes", "")], name
        assert "@num_classes" not in text or name in ("evaluate.json", "multi_gpu_train.json"), name  # train.json's
    for name in ("evaluate.json", "inference.json"):
        config = json.loads((CONFIGS / name).read_text())
        assert config["network_def"] == "$scripts.networks.network_from_record(@model_settings)", name
    assert json.loads((CONFIGS / "inference.json").read_text())["model_overrides"] == {}


def test_a_trained_model_record_wins_and_a_chosen_contradiction_is_refused(tmp_path, caplog):
    """The precedence rule, from values alone: the record gives the network and window; a default in the config
    gives way (with a log line); a chosen value (not the default) that contradicts the record is refused; chosen
    class names rename the classes and win; num_classes must match."""
    import logging

    import torch

    from scripts.errors import ConfigError
    from scripts.networks import DEFAULT_RECORD, model_record, trained_settings

    path = tmp_path / "model.pt"
    trained = model_record(encoder_name="vit_tiny", roi_size=[32, 32], class_names=["background", "crypt"])
    torch.save({"model": {}, "config": trained}, path)
    caplog.set_level(logging.INFO, logger="scripts.networks.record")
    assert trained_settings(path, DEFAULT_RECORD) == trained
    assert "Network and window from" in caplog.text and "roi_size=[32, 32]" in caplog.text
    assert trained_settings(tmp_path / "absent.pt", {"roi_size": (64, 64)}) == model_record(roi_size=[64, 64])
    renamed = trained_settings(path, {**DEFAULT_RECORD, "class_names": ["background", "lumen"]})
    assert renamed["class_names"] == ["background", "lumen"] and renamed["roi_size"] == [32, 32]
    assert "trained with class_names=['background', 'crypt']" in caplog.text
    with pytest.raises(ConfigError, match=r"roi_size=\[32, 32\], but this run asks for roi_size=\[64, 64\].*drop "
                                          r"--roi_size \(from the command line, the recipe, model_overrides or your "):
        trained_settings(path, {**DEFAULT_RECORD, "roi_size": [64, 64], "class_names": ["a", "b"]})
    with pytest.raises(ConfigError, match="set num_classes to the trained count"):
        trained_settings(path, {"num_classes": 3})
    # inference gives no key (model_overrides {}): every value is the record's, num_classes included
    three = tmp_path / "three.pt"
    torch.save({"model": {}, "config": model_record(num_classes=3, roi_size=[32, 32])}, three)
    assert trained_settings(three, {}) == model_record(num_classes=3, roi_size=[32, 32])
    assert trained_settings(three, None)["num_classes"] == 3
    assert trained_settings(three, {"class_names": ["a", "b", "c"]})["class_names"] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match=r"'model_overrides' has \['sw_batch_size'\], which are not network"):
        trained_settings(three, {"sw_batch_size": 4})
    with pytest.raises(ConfigError, match="'model_overrides' is 'vit_tiny'; give a JSON object"):
        trained_settings(three, "vit_tiny")
    assert trained_settings(None, {"roi_size": [48, 48]}) == model_record(roi_size=[48, 48])  # no init_weights
    # model_overrides: every key was written by the user, so a default value is a choice as well
    assert trained_settings(path, {"class_names": ["background", "gland"]}, explicit=True)["class_names"] == \
        ["background", "gland"]
    assert trained_settings(path, {"class_names": ["background", "gland"]})["class_names"] == ["background", "crypt"]
    with pytest.raises(ConfigError, match=r"roi_size=\[32, 32\], but this run asks for roi_size=\[96, 96\]"):
        trained_settings(path, {"roi_size": [96, 96]}, explicit=True)
    # an older file without a record, or the ONNX backend for model.pt: the config's values, as they are
    torch.save({"model": {}}, tmp_path / "old.pt")
    assert trained_settings(tmp_path / "old.pt", {"roi_size": [64, 64]})["roi_size"] == [64, 64]
    assert trained_settings(path, {"roi_size": [64, 64]}, enabled=False)["roi_size"] == [64, 64]
    wsi = json.loads((CONFIGS / "inference_wsi.json").read_text())
    assert wsi["slide_segmenter"]["class_names"] == "$@model_settings['class_names']" and "class_names" not in wsi


def test_a_new_record_key_is_recorded_restored_and_exported(tmp_path, monkeypatch):
    """One line in ``RECORD_FIELDS`` makes a key part of the model: a new training records it, inference rebuilds
    the network with the model's value (whose weights then load strictly) and the ONNX export carries it."""
    from monai.bundle import ConfigParser

    import torch

    from scripts.deploy.onnx import export_trained_model as export_onnx
    from scripts.networks import RecordField, load_trained_weights, model_record, network_from_record, stored_record
    from scripts.networks import record as record_module

    field = RecordField("head_width", "network", 512, int, "decoder_head_channels")
    monkeypatch.setattr(record_module, "RECORD_FIELDS", (*record_module.RECORD_FIELDS, field))
    tiny = {"encoder_name": "vit_tiny", "encoder_kwargs": {"depth": 1}, "skip_channels": [16, 8, 8],
            "decoder_channels": [16, 16, 8, 8], "embed_dim": 16, "roi_size": [32, 32]}
    train = ConfigParser()
    train.read_config(str(CONFIGS / "train.json"))
    for key, value in tiny.items():
        train[key] = value
    assert train.get_parsed_content("model_record")["head_width"] == 512  # recorded, though train.json names it not
    assert train.get_parsed_content("network_def").decoder.conv_more[0].out_channels == 512

    record = model_record(**tiny, head_width=24)
    torch.manual_seed(0)
    network = network_from_record(record)
    assert network.decoder.conv_more[0].out_channels == 24
    torch.save({"model": network.state_dict(), "config": record}, tmp_path / "model.pt")

    infer = ConfigParser()
    infer.read_config(str(CONFIGS / "inference.json"))
    infer.update({"bundle_root": str(tmp_path), "ckpt_path": str(tmp_path / "model.pt"), "device": "cpu"})
    assert infer.get_parsed_content("model_settings") == record
    load_trained_weights(infer.get_parsed_content("network_def"), tmp_path / "model.pt")  # strict: the same shapes

    out = export_onnx(ckpt=str(tmp_path / "model.pt"), out=str(tmp_path / "model.onnx"), example_size=(2, 3, 32, 32))
    assert stored_record(out) == record


def test_metadata_pins_match_requirements():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    pins = dict(
        line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line
    )
    assert meta["monai_version"] == pins["monai"]
    assert meta["pytorch_version"] == pins["torch"]
    for package, version in meta["required_packages_version"].items():
        assert pins[package] == version, package
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == json.loads(
        (CONFIGS / "train.json").read_text()
    )["class_names"]


def test_importing_the_package_leaves_the_excepthook_alone():
    import subprocess
    import sys

    code = "import sys; hook = sys.excepthook; import scripts; assert sys.excepthook is hook, 'replaced'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("kind", ["ConfigError", "RunError"])
def test_the_entry_point_hook_prints_any_product_error_as_one_line(kind):
    code = ("from scripts.errors import install_excepthook, " + kind + "\n"
            "install_excepthook()\n"
            "try:\n    raise " + kind + "('the file x.pt is damaged; train again')\n"
            "except Exception as err:\n    raise RuntimeError('wrapped by MONAI') from err\n")
    result = run_python(["-c", code])
    assert result.returncode == 1
    assert result.stderr.strip() == "ERROR: the file x.pt is damaged; train again"


def test_the_hook_leaves_other_errors_their_traceback():
    code = "from scripts.errors import install_excepthook\ninstall_excepthook()\nraise KeyError('bug')\n"
    result = run_python(["-c", code])
    assert result.returncode == 1 and "Traceback" in result.stderr and "KeyError: 'bug'" in result.stderr


def _imports_between_modules(package: Path) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports, counting imports inside functions too (a lazy import
    hides a circle from Python, not from a reader)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        home = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(home[:len(home) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                    else node.module
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                               for alias in node.names)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def test_scripts_has_no_import_circle():
    graph = _imports_between_modules(REPO / "scripts")
    assert len(graph) > 50 and graph["scripts.prototypes.text"] >= {"scripts.networks.text_towers"}
    done, path = set(), []

    def visit(name):
        if name in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name not in done:
            path.append(name)
            for target in sorted(graph[name]):
                visit(target)
            path.pop()
            done.add(name)

    for name in sorted(graph):
        visit(name)


def test_test_files_share_code_through_helpers_and_conftest_only():
    graph = _imports_between_modules(REPO / "tests")
    assert graph["tests.test_network"] >= {"tests.helpers"}
    imported = {name: sorted(t for t in targets if t.startswith("tests.test_") or t == "tests.conftest")
                for name, targets in graph.items()}
    assert not {name: targets for name, targets in imported.items() if targets}
