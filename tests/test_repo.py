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


def test_inference_network_matches_training_network():
    """Inference and evaluation build the network and window a model records, from the keys training records."""
    from scripts.networks import RECORD_KEYS

    train = json.loads((CONFIGS / "train.json").read_text())
    infer = json.loads((CONFIGS / "inference.json").read_text())
    evaluate = json.loads((CONFIGS / "evaluate.json").read_text())
    training_only = {"encoder_weights", "freeze_encoder", "freeze_blocks", "grad_checkpointing"}
    recorded = RECORD_KEYS
    for key in recorded:
        assert f"{key}=@{key}" in train["model_record"], f"train.json does not record '{key}' in model.pt"
        assert infer[key] == train[key], f"inference.json '{key}' differs from train.json (files without a record)"
    for config in (infer, evaluate):
        assert set(config["network_def"]) == set(train["network_def"]) - training_only
        for key in recorded:
            assert f"'{key}': @{key}" in config["model_settings"], key
        for key, value in config["network_def"].items():
            if key != "_target_":
                assert value == f"$@model_settings['{'num_classes' if key == 'out_channels' else key}']", key


def test_class_names_come_from_the_model_record_unless_renamed_on_the_command_line(tmp_path, caplog):
    import logging

    import torch

    from scripts.errors import ConfigError
    from scripts.networks import model_record, trained_settings

    path = tmp_path / "model.pt"
    torch.save({"model": {}, "config": model_record(num_classes=2, roi_size=[32, 32], class_names=["background", "crypt"])},
               path)
    config = {"num_classes": 2, "roi_size": [64, 64], "class_names": ["background", "gland"]}
    assert trained_settings(path, config, argv=[])["class_names"] == ["background", "crypt"]
    caplog.set_level(logging.INFO, logger="scripts.networks.record")
    renamed = trained_settings(path, config, argv=["--class_names", "['background','gland']"])
    assert renamed["class_names"] == ["background", "gland"] and renamed["roi_size"] == [32, 32]
    assert "trained with class_names=['background', 'crypt']" in caplog.text
    with pytest.raises(ConfigError, match="drop --roi_size"):  # a network or window key is still refused
        trained_settings(path, config, argv=["--roi_size", "[64,64]", "--class_names", "['a','b']"])
    wsi = json.loads((CONFIGS / "inference_wsi.json").read_text())
    assert wsi["slide_segmenter"]["class_names"] == "$@model_settings['class_names']" and "class_names" not in wsi


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
