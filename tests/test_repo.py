"""Promises the repository makes to users: CI runs the README's test command, configs agree with each other."""

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "bundle" / "configs"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text().splitlines()
    marker = readme.index("<!-- test-command -->")
    command = readme[marker + 2]
    assert "pip install -r requirements.txt" in command and "pytest" in command
    extracted = subprocess.run(
        ["awk", "/<!-- test-command -->/ {getline; getline; print; exit}", "README.md"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == command
    assert "README.md" in (REPO / ".ci" / "run").read_text()


def test_inference_network_matches_training_network():
    train = json.loads((CONFIGS / "train.json").read_text())
    infer = json.loads((CONFIGS / "inference.json").read_text())
    training_only = {"encoder_weights", "freeze_encoder", "freeze_blocks", "grad_checkpointing"}
    for key, value in train["network_def"].items():
        if key not in training_only:
            assert infer["network_def"][key] == value, key
            name = value[1:] if isinstance(value, str) and value.startswith("@") else None
            if name:
                assert infer[name] == train[name], f"inference.json '{name}' differs from train.json"
    assert infer["roi_size"] == train["roi_size"]


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
