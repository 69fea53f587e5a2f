"""The study runner: datalists with a fixed test set for every adapter, the statistics, and a tiny real study on the
demo data through ``python -m scripts.cli study`` (resumable, refusing mixed settings, reporting failures)."""

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.errors import ConfigError
from scripts.study import build_datalists, encode_override, main, paired_bootstrap_interval
from scripts.study.datasets import load_sections
from scripts.study.report import paired_differences, write_label_efficiency_plot, write_results_markdown
from tests.helpers import fake_ebhi, fake_glas, fake_kpi, grey, rgb

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The tiny network of tests/test_bundle.py, as a recipe file; the overrides exercise a number, false and null.
TINY_RECIPE = {"encoder_name": "vit_tiny", "encoder_kwargs": {"depth": 1}, "skip_channels": [16, 8, 8],
               "decoder_channels": [16, 16, 8, 8], "roi_size": [32, 32], "labeled_batch_size": 2,
               "unlabeled_batch_size": 2, "text_cfg": {"layers": 1}}
TINY_OVERRIDE = {"num_epochs": 1, "eval_overlays": False, "grad_clip_norm": None}


# --- statistics and command-line values ---------------------------------------------------------------------------


def test_paired_bootstrap_interval_on_known_numbers():
    mean, low, high = paired_bootstrap_interval([0.05] * 12)
    assert mean == pytest.approx(0.05, abs=1e-12)
    assert low == pytest.approx(0.05, abs=1e-12) and high == pytest.approx(0.05, abs=1e-12)
    # +-1 in equal numbers: centred on 0, about 1.96 standard errors (1 / sqrt(100)) either side
    values = [1.0, -1.0] * 50
    mean, low, high = paired_bootstrap_interval(values)
    assert mean == 0.0 and low == pytest.approx(-0.196, abs=0.03) and high == pytest.approx(0.196, abs=0.03)
    assert paired_bootstrap_interval(values) == (mean, low, high)  # fixed generator seed
    assert paired_bootstrap_interval([0.1, float("nan"), 0.1]) == pytest.approx((0.1, 0.1, 0.1))
    with pytest.raises(ValueError):
        paired_bootstrap_interval([float("nan")])


def test_override_values_parse_back_as_monai_bundle_reads_them():
    from fire.parser import DefaultParseValue

    for value in (False, True, 2, 1e-4, [96, 96], {"depth": 1}, "supervised", "/data/a b.json", "0", "a,b", "$@x"):
        assert DefaultParseValue(encode_override(value)) == value
        assert type(DefaultParseValue(encode_override(value))) is type(value)
    assert encode_override(None) == "$None"  # monai.bundle drops a plain None override; the expression evaluates to None
    assert encode_override(False) == "False"  # 'false' would reach the config as a (truthy) string


def _result(method, ratio, seed, per_image):
    return {"method": method, "labeled_ratio": ratio, "seed": seed, "iterations": 10, "train_seconds": 1.0,
            "metrics": {"dice": float(np.mean(per_image)), "iou": 0.5, "hd95": 3.0, "object_f1": 0.5, "object_dice": 0.5},
            "per_image": {f"/img/{i}.png": {"dice": d} for i, d in enumerate(per_image)}}


def test_report_pairs_by_seed_and_image_and_draws_the_plot(tmp_path):
    results = []
    for ratio in (0.1, 0.2):
        for seed in (0, 1):
            base = [0.5 + ratio, 0.6, 0.7]
            results += [_result("supervised", ratio, seed, base),
                        _result("unimatch", ratio, seed, [d + 0.1 * (seed + 1) for d in base])]
    pairs = paired_differences(results, "unimatch", 0.1)
    assert pairs["seeds"] == [0, 1]
    assert pairs["per_seed"] == pytest.approx([0.1, 0.2])
    assert pairs["per_image"] == pytest.approx([0.15, 0.15, 0.15])  # averaged over the two seeds, per image
    rows = [{"run": "mpamatch_r0.1_s0", "status": "failed", "note": "training failed (exit code 1)"}]
    trivial = {"/img/0.png": {"dice": 0.4, "iou": 0.25}, "/img/1.png": {"dice": 0.6, "iou": 0.43}}
    text = write_results_markdown(tmp_path / "results.md", results, rows, ["supervised", "unimatch"], [0.1, 0.2],
                                  trivial, ["data: test"]).read_text()
    assert "| unimatch | 0.1 | 2 | 3 | +0.1500 | [+0.1500, +0.1500] | +0.1000, +0.2000 |" in text
    assert "| all foreground (trivial) | any | – | 0.5000 ± 0.1414 |" in text
    assert "bootstrap" in text and "`mpamatch_r0.1_s0`: training failed" in text
    plot = write_label_efficiency_plot(tmp_path / "plot.png", results, ["supervised", "unimatch"], [0.1, 0.2], 0.5)
    assert plot.read_bytes().startswith(PNG_SIGNATURE)


# --- datalists ----------------------------------------------------------------------------------------------------


def _fake_folder(root: Path) -> Path:
    for i in range(12):
        rgb(root / "images" / f"s{i}.png"), grey(root / "masks" / f"s{i}.png", np.zeros((16, 16)))
    for i in range(3):
        rgb(root / "unlabeled" / f"u{i}.png")
    return root


FAKES = {"glas": lambda root: fake_glas(root, n_train=30), "ebhi_gland": fake_ebhi, "ebhi_cancer": fake_ebhi,
         "kpi": fake_kpi, "folder": _fake_folder}


@pytest.mark.parametrize("data", sorted(FAKES))
def test_datalists_share_one_held_out_test_set(tmp_path, data):
    root = FAKES[data](tmp_path / "data")
    count = 2 if data == "kpi" else 6
    out = tmp_path / "study"
    paths = build_datalists(data, root, out, [0.3, 0.6], test_count=count)
    first, second = (load_sections(paths[r]) for r in (0.3, 0.6))
    names = lambda section: [e["image"] for e in section]  # noqa: E731
    assert len(first["test"]) == count and names(first["test"]) == names(second["test"])
    assert names(first["validation"]) == names(second["validation"])  # validation does not depend on the ratio
    assert len(first["training"]) < len(second["training"])
    for sections in (first, second):
        test = {os.path.realpath(e["image"]) for e in sections["test"]}
        for key in ("training", "unlabeled", "validation"):
            assert sections[key] and not test & {os.path.realpath(e["image"]) for e in sections[key]}
        for entry in (e for section in sections.values() for e in section):
            assert Path(entry["image"]).is_file() and not Path(entry["image"]).is_symlink()
        assert len({e["mask_name"] for e in sections["test"]}) == count
    # the held-out test set does not move with the split seed
    other = load_sections(build_datalists(data, root, tmp_path / "other", [0.3], test_count=count, split_seed=5)[0.3])
    assert [e["mask_name"] for e in other["test"]] == [e["mask_name"] for e in first["test"]]


def test_glas_test_set_is_grade_stratified_or_the_official_one(tmp_path):
    root = fake_glas(tmp_path / "GlaS", n_train=30)  # 8 benign, 22 malignant training images
    held_out = load_sections(build_datalists("glas", root, tmp_path / "a", [0.2], test_count=10)[0.2])["test"]
    assert sorted(e["grade"] for e in held_out).count("benign") == 3  # 10 * 8 / 30 = 2.7
    official = load_sections(build_datalists("glas", root, tmp_path / "b", [0.2], test_root=root)[0.2])
    assert sorted(Path(e["image"]).stem for e in official["test"]) == ["testA_1", "testA_2", "testA_3", "testB_1", "testB_2"]
    assert len(official["training"]) + len(official["unlabeled"]) + len(official["validation"]) == 30
    with pytest.raises(ConfigError, match="--adapter_args has key"):
        build_datalists("glas", root, tmp_path / "c", [0.2], adapter_args={"seed": 3})


def test_an_adapter_registered_once_is_offered_by_prepare_and_the_study(tmp_path, monkeypatch):
    from scripts.cli import commands
    from scripts.data.adapters import ADAPTERS, Adapter, folder
    from scripts.study import data_names
    from scripts.study.runner import parse_args

    assert set(commands()["prepare"]) == set(ADAPTERS)
    assert data_names() == ("glas", "ebhi_gland", "ebhi_cancer", "kpi", "folder", "demo")
    monkeypatch.setitem(ADAPTERS, "my_lab", Adapter(folder.folder_datalist, folder.folder_listing, folder.folder_split,
                                                    {"my_lab": {}}))
    assert "my_lab" in commands()["prepare"] and "my_lab" in data_names()
    assert parse_args(["--data", "my_lab", "--root", str(tmp_path), "--out", str(tmp_path / "o")]).data == "my_lab"
    root = _fake_folder(tmp_path / "data")
    written = commands()["prepare"]["my_lab"](root, tmp_path / "prepared.json", validation_ratio=0.25)
    assert len(load_sections(written)["validation"]) == 3
    sections = load_sections(build_datalists("my_lab", root, tmp_path / "study", [0.5], test_count=3)[0.5])
    assert len(sections["test"]) == 3 and len(sections["unlabeled"]) >= 3
    with pytest.raises(ConfigError, match="--data 'nope' is not one of"):
        build_datalists("nope", root, tmp_path / "none", [0.5])


def _comparable(path: Path) -> dict:
    """A datalist's sections and source, each path resolved and named relative to the datalist's folder when it lies
    there (KPI's converted patches), without the study's mask names."""
    folder = path.parent.resolve()

    def shown(value: str) -> str:
        value = Path(value).resolve()
        return str(value.relative_to(folder)) if value.is_relative_to(folder) else str(value)

    sections = {key: [{k: shown(v) if k in ("image", "label") else v for k, v in entry.items() if k != "mask_name"}
                      for entry in entries] for key, entries in load_sections(path).items()}
    assert not [e for entries in sections.values() for e in entries if "group" in e]  # the split's strata stay unwritten
    return {**sections, "source": json.loads(path.read_text())["source"]}


# data: (prepare arguments that match the study's, whether the study tests on --root's own test section)
SAME_SPLIT = {"glas": ({}, True), "ebhi_gland": ({"preset": "ebhi_gland", "test_ratio": 0.0}, False),
              "kpi": ({"rule": "tile", "tile_size": 32}, True), "folder": ({}, False)}


@pytest.mark.parametrize("data", sorted(SAME_SPLIT))
def test_prepare_and_the_study_split_alike_without_links(tmp_path, monkeypatch, data):
    from scripts.cli import commands

    root = FAKES[data](tmp_path / "data")
    prepare_args, own_test = SAME_SPLIT[data]
    test_root = root if own_test else FAKES[data](tmp_path / "test_data")
    adapter_args = {k: v for k, v in prepare_args.items() if k not in ("preset", "test_ratio")}
    prepare = commands()["prepare"]["ebhi" if data.startswith("ebhi") else data]

    def no_links(*args, **kwargs):
        raise AssertionError(f"a symbolic link was made: {args}")

    monkeypatch.setattr(os, "symlink", no_links)
    for seed, ratio in ((0, 0.3), (4, 0.6)):
        prepared = Path(prepare(str(root), str(tmp_path / f"prepared_{seed}" / "datalist.json"), labeled_ratio=ratio,
                                seed=seed, **prepare_args))
        studied = build_datalists(data, root, tmp_path / f"study_{seed}", [ratio], test_root=test_root,
                                  split_seed=seed, adapter_args=adapter_args)[ratio]
        expected, got = _comparable(prepared), _comparable(studied)
        if not own_test:
            expected.pop("test"), got.pop("test")
        assert got == expected and got["training"] and got["unlabeled"] and got["validation"]
    assert not [p for p in tmp_path.rglob("*") if p.is_symlink()]


# --- a tiny real study ----------------------------------------------------------------------------------------------


def _study_args(demo_root, out, recipe, *extra):
    return ["--data", "demo", "--root", str(demo_root), "--methods", "supervised,unimatch", "--labeled_ratios", "0.5",
            "--seeds", "0", "--recipe", str(recipe), "--override", json.dumps(TINY_OVERRIDE), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def study(demo_data, tmp_path_factory):
    """Runs the tiny study once through the command line; returns its folder, arguments and output."""
    folder = tmp_path_factory.mktemp("study")
    recipe = folder / "tiny_recipe.json"
    recipe.write_text(json.dumps(TINY_RECIPE))
    args = _study_args(Path(demo_data).parent, folder / "out", recipe)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "scripts.cli", "study", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return folder / "out", args, log


def test_study_writes_results_masks_and_plot(study, demo_data):
    out, _, log = study
    assert "[study] run 1/2: supervised r0.5 s0 ..." in log and "[study] run 2/2: unimatch r0.5 s0" in log
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["labeled_ratio"], r["seed"], r["status"]) for r in rows] == [
        ("supervised", "0.5", "0", "ok"), ("unimatch", "0.5", "0", "ok")]
    for row in rows:
        assert (row["n_labeled"], row["n_unlabeled"]) == ("4", "4") and int(row["iterations"]) == 2
        for column in ("test_dice", "test_iou", "test_object_f1", "test_object_dice", "trivial_dice"):
            assert 0.0 <= float(row[column]) <= 1.0, column
        assert float(row["train_seconds"]) > 0
    markdown = (out / "results.md").read_text()
    assert "| supervised | 0.5 | 1 |" in markdown and "| unimatch | 0.5 | 1 |" in markdown
    # the data folder lies outside the folder the study ran from: named by its name, no absolute path of this machine
    assert "- data: `demo` from `demo`" in markdown and str(out.parent.parent) not in markdown
    assert "all foreground (trivial)" in markdown and "| unimatch | 0.5 | 1 | 2 |" in markdown  # paired: 1 seed, 2 images
    plot = (out / "label_efficiency.png").read_bytes()
    assert plot.startswith(PNG_SIGNATURE) and len(plot) > 1000
    assert Image.open(out / "label_efficiency.png").size[0] > 100

    test = load_sections(Path(demo_data))["test"]
    for run in ("supervised_r0.5_s0", "unimatch_r0.5_s0"):
        for entry in test:
            mask = np.asarray(Image.open(out / "runs" / run / "masks" / f"{Path(entry['image']).stem}.png"))
            assert mask.shape == np.asarray(Image.open(entry["image"])).shape[:2] == (96, 128)
            assert set(np.unique(mask)) <= {0, 255}
        assert not (out / "runs" / run / "eval" / "overlays").exists()  # eval_overlays false arrived as False
        assert "--resume False" in (out / "runs" / run / "train.log").read_text()
    recorded = json.loads((out / "study.json").read_text())
    assert recorded["test"] == {"demo_test_section": True} and recorded["training"]["overrides"] == TINY_OVERRIDE


def test_reports_name_folders_relative_to_where_the_study_ran(tmp_path, monkeypatch):
    from scripts.study import shown_folder

    monkeypatch.chdir(tmp_path)
    assert shown_folder(tmp_path / "data" / "GlaS-train", Path.cwd()) == os.path.join("data", "GlaS-train")
    assert shown_folder(tmp_path.parent / "elsewhere" / "GlaS-train", Path.cwd()) == "GlaS-train"
    assert shown_folder(REPO / "bundle" / "configs" / "train.json", REPO) == "bundle/configs/train.json"


def test_rerun_skips_finished_runs(study, caplog):
    out, args, _ = study
    logs = sorted((out / "runs").glob("*/*.log")) + sorted((out / "runs").glob("*/result.json"))
    before = {p: p.stat().st_mtime_ns for p in logs}
    caplog.set_level(logging.INFO, logger="scripts.study")
    assert main(args) == 0
    assert caplog.text.count("skipped: finished before") == 2
    assert {p: p.stat().st_mtime_ns for p in logs} == before
    with open(out / "results.csv") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["ok", "ok"]
    # a call with a smaller grid (e.g. one more method with one seed) reports the earlier runs too
    subset = [*args]
    subset[subset.index("--methods") + 1] = "unimatch"
    assert main(subset) == 0
    with open(out / "results.csv") as handle:
        assert sorted(r["method"] for r in csv.DictReader(handle)) == ["supervised", "unimatch"]
    assert "| supervised | 0.5 | 1 |" in (out / "results.md").read_text()


def test_an_override_no_config_defines_is_refused_before_any_run(study, tmp_path):
    out, args, _ = study
    other_out = tmp_path / "typo"
    typo = [*args[:args.index("--override")], "--override", json.dumps({"num_epoch": 1}), "--out", str(other_out)]
    with pytest.raises(ConfigError, match="num_epoch .did you mean num_epochs"):
        main(typo)
    assert not (other_out / "runs").exists()


def test_other_test_setting_in_the_same_out_is_refused(study, tmp_path):
    from scripts.data import ensure_demo_dataset

    out, args, _ = study
    other = ensure_demo_dataset(tmp_path / "other_demo", n_labeled=1, n_unlabeled=1, n_validation=1, n_test=1,
                                image_size=(64, 64)).parent
    with pytest.raises(ConfigError, match="other test settings .*test_root"):
        main([*args, "--test_root", str(other)])
    with pytest.raises(ConfigError, match="other data settings .*split_seed"):
        main([*args, "--split_seed", "1"])


def test_an_edited_config_file_in_the_same_out_is_refused(study):
    out, args, _ = study
    path = out / "study.json"
    original = path.read_text()
    recorded = json.loads(original)
    assert "bundle/configs/train.json" in recorded["files"] and "bundle/configs/evaluate.json" in recorded["files"]
    recorded["files"]["bundle/configs/train.json"] = "0" * 64  # as if train.json had been edited since
    path.write_text(json.dumps(recorded))
    try:
        with pytest.raises(ConfigError, match="other files settings .*train.json"):
            main(args)
    finally:
        path.write_text(original)


def test_killed_run_restarts_cleanly(study, caplog):
    out, args, _ = study
    run = out / "runs" / "unimatch_r0.5_s0"
    (run / "result.json").unlink()
    (run / "training_done.json").unlink()
    (run / "models" / "checkpoint.pt").write_bytes(b"half-written")  # what a kill during training can leave
    caplog.set_level(logging.INFO, logger="scripts.study")
    assert main(args) == 0
    assert "run 1/2: supervised r0.5 s0 skipped" in caplog.text and "run 2/2: unimatch r0.5 s0 ..." in caplog.text
    log = (run / "train.log").read_text()
    assert log.count("=== study") == 2 and "Resumed from" not in log  # appended, and trained from scratch
    assert json.loads((run / "result.json").read_text())["status"] == "ok"


def test_failed_run_is_reported_and_exits_non_zero(study, tmp_path, caplog):
    _, args, _ = study
    out = tmp_path / "failing"
    index = args.index("--override")
    bad = [*args[:index], "--override", json.dumps({**TINY_OVERRIDE, "roi_size": [40, 40]}), *args[index + 2:]]
    bad[bad.index("--methods") + 1] = "supervised"
    bad[bad.index("--out") + 1] = str(out)
    caplog.set_level(logging.INFO, logger="scripts.study")
    assert main(bad) == 1
    assert "supervised_r0.5_s0: training failed (exit code 1); last lines of" in caplog.text
    assert "multiple of the encoder patch size" in caplog.text  # the tail of train.log
    with open(out / "results.csv") as handle:
        row = next(csv.DictReader(handle))
    assert row["status"] == "failed" and "train.log" in row["note"]
    assert not (out / "runs" / "supervised_r0.5_s0" / "result.json").exists()
