"""The distributable bundle: assembled by the CLI, accepted by MONAI's own tools, runnable from inside dist/."""

import json
import re
from pathlib import Path

import jsonschema
import pytest

from scripts.deploy import META_SCHEMA
from tests.helpers import REPO, run_python, save_tiny_model


def run(args, cwd):
    return run_python(args, cwd, repo_on_path=False)  # inside dist/ the bundle's own scripts/ must be what is imported


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pack")
    save_tiny_model(folder / "model.pt")  # with its record: the packed configs name no network key
    result = run(["-m", "scripts.cli", "pack", "--out_dir", folder / "dist", "--model", folder / "model.pt"], REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "dist" / "mpamatch_gland_segmentation"


def test_layout(bundle):
    for path in ("configs/train.json", "configs/inference.json", "configs/metadata.json", "configs/logging.conf",
                 "scripts/__init__.py", "scripts/deploy/meta_schema.json", "models/model.pt", "docs/README.md", "LICENSE"):
        assert (bundle / path).is_file(), path
    assert not list(bundle.rglob("__pycache__"))


def test_links_in_the_packed_docs_resolve(bundle):
    """Every relative link and image of the packed documentation points at a file the bundle holds."""
    broken = []
    for doc in (bundle / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not re.match(r"[a-z]+://|mailto:", target) and not (doc.parent / target).exists():
                broken.append(f"{doc.name}: {target}")
    assert not broken, broken


def test_monai_verify_metadata_and_net_in_out(bundle):
    result = run(["-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json",
                  "--filepath", "scripts/deploy/meta_schema.json"], bundle)
    assert result.returncode == 0 and "metadata is verified with no error" in result.stdout + result.stderr
    result = run(["-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                  "--config_file", "configs/inference.json", "--n", 2], bundle)
    assert result.returncode == 0 and "data shape of network is verified with no error" in result.stdout + result.stderr


def test_inference_runs_from_inside_dist(bundle, demo_data):
    images = Path(demo_data).parent / "test" / "images"
    result = run(["-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
                  "--input_dir", images], bundle)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (bundle / "eval" / "masks").glob("*_mask.png")) == ["demo_0000_mask.png", "demo_0001_mask.png"]


def test_schema_rejects_incomplete_metadata():
    schema = json.loads(META_SCHEMA.read_text())
    meta = json.loads((REPO / "bundle/configs/metadata.json").read_text())
    jsonschema.validate(meta, schema)
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    with pytest.raises(jsonschema.ValidationError, match="channel_def"):
        jsonschema.validate(meta, schema)
