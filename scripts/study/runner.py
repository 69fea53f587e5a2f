"""The study runner: trains and tests every method x labeled ratio x seed on one fixed test set, resumably.

Each run is two ``python -m monai.bundle run`` subprocesses (training, then evaluation on the datalist's ``test``
section with the test masks saved), in ``OUT/runs/<method>_r<ratio>_s<seed>/`` with its logs ``train.log`` and
``eval.log``. A run is finished when its ``result.json`` exists (written atomically, last); a later call with the
same ``OUT`` skips finished runs and starts unfinished ones afresh. ``OUT/study.json`` records the options, and a
call whose data, test or training settings differ from the recorded ones is refused.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from scripts.errors import ConfigError
from scripts.files import write_text_atomically
from scripts.paths import CONFIG_DIR, REPO

from .datasets import data_names, TEST_SEED, build_datalists, check_adapter_args, load_sections, ratio_label
from .masks import MASK_DIR_NAME, write_mask_config
from .report import (METRIC_COLUMNS, trivial_baseline, write_label_efficiency_plot, write_results_csv,
                     write_results_markdown)

__all__ = ["StudyOptions", "StudyRun", "encode_override", "parse_args", "run_study", "main", "shown_folder",
           "REPO_ROOT"]

logger = logging.getLogger("scripts.study")

REPO_ROOT = REPO  # the repository the study's commands run in (scripts.paths)
STUDY_FILE = "study.json"
RESULT_FILE = "result.json"
TRAINING_DONE_FILE = "training_done.json"
# Keys the study sets for each run; an override may not change them.
RESERVED_KEYS = ("datalist", "dataset_dir", "bundle_root", "method", "seed", "resume", "eval_section", "ckpt_dir",
                 "ckpt_path", "output_dir", "eval_dir")
# evaluate.json's metric names -> the study's
EVAL_METRICS = {"val_mean_dice": "dice", "val_mean_iou": "iou", "val_hd95": "hd95", "val_asd": "asd",
                "val_object_f1": "object_f1", "val_object_dice": "object_dice", "val_object_hausdorff": "object_hausdorff"}
_FINISHED = re.compile(r"Training finished after (\d+) epochs \((\d+) iterations\)")


@dataclass
class StudyOptions:
    """The options of one study call (see ``python -m scripts.cli study --help``).

    Args:
        data: data set adapter name, one of ``glas``, ``ebhi_gland``, ``ebhi_cancer``, ``kpi``, ``folder``, ``demo``.
        root: the data set's folder (for ``demo``: where the demo set is or is generated; None = the demo cache).
        out: the study's output folder.
        methods: methods to compare (``supervised`` is the reference of the paired differences).
        labeled_ratios: labeled ratios, each in (0, 1].
        seeds: training seeds.
        test_root: a folder in the same layout whose images form the test set, or None.
        test_count: training images held out for testing when there is no ``test_root``. Defaults to 20.
        split_seed: seed of validation and labeled / unlabeled splits. Defaults to 0.
        recipe: a config file merged after train.json and the data set's preset, or None.
        overrides: config keys for every run (training and evaluation), e.g. ``{"num_iterations": 300}``.
        adapter_args: extra keyword arguments of the data set's adapter, e.g. ``{"validation_ratio": 0.2}``.
    """

    data: str
    root: str | None
    out: str
    methods: list[str]
    labeled_ratios: list[float]
    seeds: list[int]
    test_root: str | None = None
    test_count: int = 20
    split_seed: int = 0
    recipe: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    adapter_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyRun:
    """One training run of the study."""

    method: str
    ratio: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_r{ratio_label(self.ratio)}_s{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.method} r{ratio_label(self.ratio)} s{self.seed}"


class RunFailed(Exception):
    """A run's training or evaluation did not complete; the message says which and where its log is."""


def encode_override(value: Any) -> str:
    """A config value written so that ``python -m monai.bundle run --key <text>`` parses it back to ``value``.

    monai.bundle reads ``--key value`` with fire, which evaluates Python literals (``False``, ``[96, 96]``,
    ``{'depth': 1}``, quoted strings) and keeps other text as a string (JSON ``false`` / ``null`` would stay
    strings); it also drops a top-level None. So values are written as Python literals, strings quoted, and None
    as the config expression ``$None``.

    Args:
        value: a JSON value (None, bool, number, string, list or dict).
    """
    if value is None:
        return "$None"
    if isinstance(value, float) and not math.isfinite(value):
        return f"$float('{value}')"
    if isinstance(value, str):
        from fire.parser import DefaultParseValue

        parsed = DefaultParseValue(value)
        return value if isinstance(parsed, str) and parsed == value else repr(value)  # plain text stays readable
    return repr(value)


def _override_args(overrides: dict[str, Any]) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", encode_override(value)]
    return args


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _atomic_json(path: Path, content: dict) -> None:
    write_text_atomically(path, json.dumps(content, indent=2) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Study:
    """Runs the study described by ``options`` (see :func:`run_study`)."""

    def __init__(self, options: StudyOptions):
        self.options = options
        self._check_options()
        self.out = Path(options.out).expanduser().resolve()
        self.root = self._resolve_root()
        self.test_root = Path(options.test_root).expanduser().resolve() if options.test_root else None
        self.recipe = Path(options.recipe).expanduser().resolve() if options.recipe else None
        preset = CONFIG_DIR / "datasets" / f"{options.data}.json"
        self.train_files = [CONFIG_DIR / "train.json"] + ([preset] if preset.is_file() else [])
        self.train_files += [self.recipe] if self.recipe else []
        self.mask_config = self.out / "configs" / "save_test_masks.json"
        self.eval_files = self.train_files + [CONFIG_DIR / "evaluate.json", self.mask_config]
        self._check_override_keys()
        self.runs = [StudyRun(m, r, s) for r in options.labeled_ratios for s in options.seeds for m in options.methods]

    def _check_override_keys(self) -> None:
        """Refuses an ``--override`` key that neither training nor evaluation defines, before any run starts.

        Each step then gets the override keys its own config files define (``eval_overlays`` reaches evaluation
        only), since a bundle command refuses a key that none of its config files defines.
        """
        from scripts.bundle_args import closest_keys, config_file_keys, top_level_key

        known = config_file_keys([*self.train_files, CONFIG_DIR / "evaluate.json"])
        unknown = [key for key in self.options.overrides if top_level_key(key) not in known]
        if unknown:
            hints = [f"{key} ({closest_keys(top_level_key(key), known)})" for key in unknown]
            raise ConfigError(f"--override sets {', '.join(hints)}, which no config of the study defines "
                              "(train.json, evaluate.json, the data set's preset and the recipe).")

    # --- options and the study record -------------------------------------------------------------------------

    def _check_options(self) -> None:
        o = self.options
        if o.data not in data_names():
            raise ConfigError(f"--data '{o.data}' is not one of {list(data_names())}.")
        if o.root is None and o.data != "demo":
            raise ConfigError(f"--root is required for --data {o.data}: the data set's folder.")
        from scripts.engines.presets import METHOD_PRESETS

        unknown = [m for m in o.methods if m not in METHOD_PRESETS]
        if not o.methods or unknown:
            raise ConfigError(f"--methods {','.join(o.methods)}: use names from {list(METHOD_PRESETS)}, comma-separated.")
        if not o.labeled_ratios or any(not 0.0 < r <= 1.0 for r in o.labeled_ratios):
            raise ConfigError(f"--labeled_ratios {o.labeled_ratios}: each ratio must be in (0, 1], e.g. 0.1,0.2.")
        if not o.seeds or any(s < 0 for s in o.seeds):
            raise ConfigError(f"--seeds {o.seeds}: give one or more seeds >= 0, e.g. 0,1,2.")
        reserved = sorted(set(o.overrides) & set(RESERVED_KEYS))
        if reserved:
            raise ConfigError(f"--override sets {reserved}, which the study sets for each run (its datalist, folder, "
                              "method, seed, fresh start); leave them out.")
        if o.recipe and not Path(o.recipe).expanduser().is_file():
            raise ConfigError(f"--recipe '{o.recipe}' is not a file; give a config JSON such as "
                              "bundle/configs/recipes/cpu.json, or leave it out.")
        check_adapter_args(o.data, o.adapter_args)
        if o.data == "demo" and o.test_count != 20:
            logger.warning("[study] --test_count %d is not used with --data demo: its own test section is the test set.",
                           o.test_count)
        for name, path in (("--root", o.root), ("--test_root", o.test_root)):
            if path is not None and o.data != "demo" and not Path(path).expanduser().is_dir():
                raise ConfigError(f"{name} '{path}' is not a folder.")
        if o.test_root is not None and o.data == "demo" and not (Path(o.test_root).expanduser() / "datalist.json").is_file():
            raise ConfigError(f"--test_root '{o.test_root}' holds no demo datalist.json (write one with "
                              "`python -m scripts.cli demo-data`).")

    def _resolve_root(self) -> Path:
        if self.options.root is not None:
            return Path(self.options.root).expanduser().resolve()
        from scripts.data import demo_cache_dir

        return Path(demo_cache_dir()).resolve()

    def record(self) -> dict:
        """The study's settings as stored in ``study.json``; data, test and training settings must not change."""
        o = self.options
        if self.test_root is not None:
            test = {"test_root": str(self.test_root)}
        elif o.data == "demo":
            test = {"demo_test_section": True}
        else:
            test = {"held_out_count": o.test_count, "held_out_seed": TEST_SEED}
        return {
            "data": {"data": o.data, "root": str(self.root), "split_seed": o.split_seed, "adapter_args": o.adapter_args},
            "test": test,
            "training": {
                "config_files": [os.path.relpath(p, REPO_ROOT) if p != self.recipe else str(p) for p in self.train_files],
                "recipe_sha256": _sha256(self.recipe) if self.recipe else None,
                "overrides": o.overrides,
            },
            "grid": {"methods": o.methods, "labeled_ratios": o.labeled_ratios, "seeds": o.seeds},
            # the contents of every config file a run reads, so that an edited train.json or preset is noticed
            "files": {os.path.relpath(p, REPO_ROOT) if Path(p).is_relative_to(REPO_ROOT) else str(p): _sha256(Path(p))
                      for p in dict.fromkeys([*self.train_files, CONFIG_DIR / "evaluate.json"])},
        }

    def check_previous(self, record: dict) -> None:
        """Refuses an ``OUT`` that holds a study with other data, test or training settings."""
        path = self.out / STUDY_FILE
        if not path.is_file():
            if (self.out / "runs").is_dir() and any((self.out / "runs").iterdir()):
                raise ConfigError(f"--out '{self.out}' holds runs/ but no {STUDY_FILE}; it was not written by the "
                                  "study runner. Use a new --out.")
            return
        previous = json.loads(path.read_text())
        sections = ("data", "test", "training") + (("files",) if "files" in previous else ())
        for section in sections:
            old, new = previous.get(section), json.loads(json.dumps(record[section]))
            if old != new:
                keys = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
                changes = "; ".join(f"{k}: recorded {(old or {}).get(k)!r}, now {new.get(k)!r}" for k in keys)
                raise ConfigError(
                    f"--out '{self.out}' holds a study with other {section} settings ({changes}). Runs made with "
                    f"different {section} settings cannot be compared; use a new --out, or repeat the settings "
                    f"recorded in {path}.")

    # --- one run ----------------------------------------------------------------------------------------------

    def _command(self, run_id: str, files: Sequence[Path], run: StudyRun, run_dir: Path, datalist: Path,
                 extra: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", "monai.bundle", "run", run_id,
                "--config_file", encode_override([str(f) for f in files]),
                "--bundle_root", encode_override(str(run_dir)),
                "--datalist", encode_override(str(datalist)),
                "--method", encode_override(run.method),
                "--seed", encode_override(run.seed),
                *extra, *_override_args(self._overrides_for(files))]

    def _overrides_for(self, files: Sequence[Path]) -> dict[str, Any]:
        from scripts.bundle_args import config_file_keys, top_level_key

        defined = config_file_keys([f for f in files if Path(f).is_file()])
        return {key: value for key, value in self.options.overrides.items() if top_level_key(key) in defined}

    def _step(self, run_id: str, files: Sequence[Path], run: StudyRun, run_dir: Path, datalist: Path,
              extra: Sequence[str], log_name: str) -> tuple[str, float]:
        """Runs ``monai.bundle run <run_id>`` for one run; returns what it logged and its seconds.

        Raises:
            RunFailed: naming the step and its log when the command fails.
        """
        start = time.perf_counter()
        code, output = self._call(self._command(run_id, files, run, run_dir, datalist, extra), run_dir / log_name)
        seconds = time.perf_counter() - start
        if code != 0:
            step = "training" if run_id == "training" else "evaluation"
            logger.error("[study] %s: %s failed (exit code %d); last lines of %s:\n%s", run.name, step, code,
                         run_dir / log_name, self._tail(output))
            raise RunFailed(f"{step} failed (exit code {code}); see runs/{run.name}/{log_name}")
        return output, seconds

    def _call(self, command: list[str], log_path: Path) -> tuple[int, str]:
        """Runs ``command`` from the repository root, appending its output to ``log_path``; returns the exit code
        and what this call appended."""
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        with open(log_path, "a") as log:
            log.write(f"\n=== study {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n")
            log.flush()
            start = log.tell()
            code = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL).returncode
        with open(log_path, errors="replace") as log:
            log.seek(start)
            return code, log.read()

    @staticmethod
    def _tail(text: str, lines: int = 25) -> str:
        return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])

    def _execute(self, run: StudyRun, datalist: Path, test: list[dict]) -> dict:
        run_dir = self.out / "runs" / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        done_path = run_dir / TRAINING_DONE_FILE
        if done_path.is_file() and (run_dir / "models" / "model.pt").is_file():
            training = json.loads(done_path.read_text())
            logger.info("[study]   training of %s finished before; evaluating it", run.name)
        else:
            done_path.unlink(missing_ok=True)
            for sub in ("models", "runs", "eval", MASK_DIR_NAME):  # a killed run starts afresh, never half-resumed
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            output, seconds = self._step("training", self.train_files, run, run_dir, datalist,
                                         ["--resume", encode_override(False)], "train.log")
            found = _FINISHED.findall(output)
            training = {"train_seconds": round(seconds, 1), "iterations": int(found[-1][1]) if found else None}
            _atomic_json(done_path, training)
        for sub in ("eval", MASK_DIR_NAME):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        _, eval_seconds = self._step("evaluating", self.eval_files, run, run_dir, datalist,
                                     ["--eval_section", encode_override("test")], "eval.log")
        metrics, per_image = self._read_evaluation(run, run_dir)
        self._check_masks(run, run_dir, test)
        sections = load_sections(datalist)
        return {
            "run": run.name, "method": run.method, "labeled_ratio": run.ratio, "seed": run.seed, "status": "ok",
            "n_labeled": len(sections["training"]), "n_unlabeled": len(sections["unlabeled"]), "n_test": len(test),
            "iterations": training.get("iterations"), "train_seconds": training.get("train_seconds"),
            "eval_seconds": round(eval_seconds, 1), "metrics": metrics, "per_image": per_image,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _read_evaluation(self, run: StudyRun, run_dir: Path) -> tuple[dict, dict]:
        summary_path, table_path = run_dir / "eval" / "summary.json", run_dir / "eval" / "per_image.csv"
        if not summary_path.is_file() or not table_path.is_file():
            raise RunFailed(f"evaluation wrote no {summary_path.name} / {table_path.name}; see runs/{run.name}/eval.log")
        overall = json.loads(summary_path.read_text()).get("overall", {})
        metrics = {ours: (overall.get(theirs) or {}).get("mean") for theirs, ours in EVAL_METRICS.items()}
        metrics["hd95_not_finite"] = (overall.get("val_hd95") or {}).get("n_not_finite")
        per_image = {}
        with open(table_path, newline="") as handle:
            for row in csv.DictReader(handle):
                values = {}
                for theirs, ours in EVAL_METRICS.items():
                    try:
                        values[ours] = float(row[theirs]) if row.get(theirs) not in (None, "") else None
                    except ValueError:
                        values[ours] = None
                    if values[ours] is not None and not math.isfinite(values[ours]):
                        values[ours] = None
                per_image[os.path.realpath(row["image"])] = values
        return metrics, per_image

    @staticmethod
    def _check_masks(run: StudyRun, run_dir: Path, test: list[dict]) -> None:
        problems = []
        for entry in test:
            mask = run_dir / MASK_DIR_NAME / f"{entry['mask_name']}.png"
            if not mask.is_file():
                problems.append(f"{mask.name} missing")
                continue
            with Image.open(entry["image"]) as image, Image.open(mask) as written:
                if image.size != written.size:
                    problems.append(f"{mask.name} is {written.size[0]}x{written.size[1]}, its image "
                                    f"{image.size[0]}x{image.size[1]}")
        if problems:
            raise RunFailed(f"test masks wrong ({'; '.join(problems[:5])}); see runs/{run.name}/eval.log")

    # --- the whole study --------------------------------------------------------------------------------------

    def _estimate(self, durations: dict[str, list[float]], remaining: Sequence[StudyRun]) -> float | None:
        every = [d for values in durations.values() for d in values]
        if not every:
            return None
        overall = sum(every) / len(every)
        return sum((sum(durations[r.method]) / len(durations[r.method])) if durations.get(r.method) else overall
                   for r in remaining)

    def _label_threshold(self) -> float:
        value: Any = 0
        for path in self.train_files:
            value = json.loads(Path(path).read_text()).get("label_threshold", value)
        value = self.options.overrides.get("label_threshold", value)
        if not isinstance(value, (int, float)):
            logger.warning("[study] label_threshold is %r, not a number; the all-foreground baseline uses 0", value)
            return 0
        return value

    def run(self) -> list[str]:
        """Builds the datalists, runs every unfinished run and writes the results; returns the failed runs' names."""
        record = self.record()
        self.check_previous(record)
        self.out.mkdir(parents=True, exist_ok=True)
        if not (self.out / STUDY_FILE).is_file():
            shutil.rmtree(self.out / "datalists", ignore_errors=True)  # left by a call that stopped before recording
        o = self.options
        datalists = build_datalists(o.data, self.root, self.out, o.labeled_ratios, test_root=self.test_root,
                                    test_count=o.test_count, split_seed=o.split_seed, adapter_args=o.adapter_args)
        previous = json.loads((self.out / STUDY_FILE).read_text()) if (self.out / STUDY_FILE).is_file() else {}
        _atomic_json(self.out / STUDY_FILE, {**record, "created": previous.get("created", time.strftime("%Y-%m-%d %H:%M:%S")),
                                             "updated": time.strftime("%Y-%m-%d %H:%M:%S")})
        write_mask_config(self.mask_config)
        test = load_sections(datalists[o.labeled_ratios[0]])["test"]
        trivial = trivial_baseline(test, self._label_threshold())
        trivial_dice = sum(v["dice"] for v in trivial.values()) / len(trivial)

        results, rows, failed = [], [], []
        durations: dict[str, list[float]] = {}
        started = time.perf_counter()
        for index, run in enumerate(self.runs, start=1):
            result_path = self.out / "runs" / run.name / RESULT_FILE
            prefix = f"[study] run {index}/{len(self.runs)}: {run.label}"
            if result_path.is_file():
                result = json.loads(result_path.read_text())
                logger.info("%s skipped: finished before (%s)", prefix, result_path)
            else:
                left = self._estimate(durations, self.runs[index - 1:])
                eta = f"about {_format_duration(left)} left" if left is not None else "time left known after the first run"
                logger.info("%s ... (elapsed %s, %s)", prefix, _format_duration(time.perf_counter() - started), eta)
                begin = time.perf_counter()
                try:
                    result = self._execute(run, datalists[run.ratio], test)
                except RunFailed as err:
                    logger.error("%s failed: %s", prefix, err)
                    failed.append(run.name)
                    rows.append({"method": run.method, "labeled_ratio": run.ratio, "seed": run.seed, "run": run.name,
                                 "status": "failed", "trivial_dice": round(trivial_dice, 6), "note": str(err)})
                    continue
                _atomic_json(result_path, result)
                logger.info("%s done in %s: test Dice %s", prefix, _format_duration(time.perf_counter() - begin),
                            "n/a" if result["metrics"].get("dice") is None else f"{result['metrics']['dice']:.4f}")
            durations.setdefault(run.method, []).append((result.get("train_seconds") or 0) + (result.get("eval_seconds") or 0))
            results.append(result)
            rows.append(_csv_row(result, trivial_dice))
        # Finished runs of earlier calls with another grid (e.g. ablations with one seed) join the report: the
        # settings check above guarantees they share data, test set and training settings.
        grid = {run.name for run in self.runs}
        for path in sorted((self.out / "runs").glob(f"*/{RESULT_FILE}")):
            if path.parent.name in grid:
                continue
            result = json.loads(path.read_text())
            results.append(result)
            rows.append(_csv_row(result, trivial_dice))
        self._write_reports(results, rows, trivial, trivial_dice, len(test))
        if failed:
            logger.error("[study] %d of %d runs failed: %s (their logs are in %s)", len(failed), len(self.runs),
                         ", ".join(failed), self.out / "runs")
        else:
            logger.info("[study] all %d runs finished; results in %s", len(self.runs), self.out / "results.md")
        return failed

    def _write_reports(self, results: list[dict], rows: list[dict], trivial: dict, trivial_dice: float,
                       n_test: int) -> None:
        o = self.options
        methods = list(dict.fromkeys([*o.methods, *(r["method"] for r in results)]))
        ratios = sorted({*o.labeled_ratios, *(float(r["labeled_ratio"]) for r in results)})
        seeds = sorted({*o.seeds, *(int(r["seed"]) for r in results)})
        write_results_csv(self.out / "results.csv", rows)
        here = Path.cwd()
        if self.test_root is not None:
            test_note = f"{n_test} images from --test_root `{shown_folder(self.test_root, here)}`"
        elif o.data == "demo":
            test_note = f"the demo data set's test section ({n_test} images)"
        else:
            test_note = (f"{n_test} training images held out with seed {TEST_SEED} (stratified by the adapter's group; "
                         "never trained on or used for model selection)")
        shown = [shown_folder(Path(p), REPO_ROOT) for p in self.train_files]
        header = [f"data: `{o.data}` from `{shown_folder(self.root, here)}`", f"test set: {test_note}",
                  f"validation and labeled splits: the adapter's own, split seed {o.split_seed}",
                  f"config files: {', '.join(f'`{p}`' for p in shown)}",
                  f"overrides: `{json.dumps(o.overrides)}`" if o.overrides else "overrides: none",
                  f"methods: {', '.join(methods)}; labeled ratios: {', '.join(map(ratio_label, ratios))}; "
                  f"seeds: {', '.join(map(str, seeds))}"]
        write_results_markdown(self.out / "results.md", results, rows, methods, ratios, trivial, header)
        write_label_efficiency_plot(self.out / "label_efficiency.png", results, methods, ratios,
                                    trivial_dice, title=f"{o.data}: test Dice on {n_test} test images")


def shown_folder(path: Path, start: Path) -> str:
    """A path as a report names it: relative to ``start`` (where the study ran, or the repository for config files)
    when it lies inside, else by its own name, so that a report kept with its results names no absolute path of the
    machine it was written on."""
    return os.path.relpath(path, start) if path.is_relative_to(start) else path.name


def _csv_row(result: dict, trivial_dice: float) -> dict:
    """One run's row of ``results.csv``."""
    row = {k: result.get(k) for k in ("method", "labeled_ratio", "seed", "run", "status", "n_labeled", "n_unlabeled",
                                       "n_test", "iterations", "train_seconds")}
    row.update({column: result["metrics"].get(name) for name, column in METRIC_COLUMNS.items()})
    row["trivial_dice"] = round(trivial_dice, 6)
    return row


def run_study(options: StudyOptions) -> list[str]:
    """Runs a study; see the module docstring and :class:`StudyOptions`.

    Args:
        options: the study's options.

    Returns:
        The names of the runs that failed (empty when all finished).
    """
    return Study(options).run()


def _split_list(text: str, cast: type, option: str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = [cast(t) for t in items]
    except ValueError as err:
        raise ConfigError(f"{option} '{text}' is not a comma-separated list of {cast.__name__} values.") from err
    return list(dict.fromkeys(values))


def _json_object(text: str, option: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option} '{text}' is not valid JSON ({err}); give an object such as "
                          "'{\"num_iterations\": 300}'.") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{option} '{text}' must be a JSON object of key: value pairs.")
    return value


def parse_args(argv: Sequence[str] | None = None) -> StudyOptions:
    """Reads the command line of ``python -m scripts.cli study`` (``--help`` lists the options)."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.cli study",
        description="Train and test each method x labeled ratio x seed on one fixed test set; write results.csv, "
                    "results.md and label_efficiency.png under --out. Rerunning with the same --out skips finished runs.")
    parser.add_argument("--data", required=True, choices=data_names(), help="the data set's adapter")
    parser.add_argument("--root", help="the data set's folder (demo: where the demo set is or will be generated)")
    parser.add_argument("--out", required=True, help="output folder of the study")
    parser.add_argument("--methods", default="supervised,unimatch,mpamatch", help="comma-separated methods (default supervised,unimatch,mpamatch)")
    parser.add_argument("--labeled_ratios", default="0.1", help="comma-separated labeled ratios, e.g. 0.1,0.2 (default 0.1)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    parser.add_argument("--test_root", help="folder in the same layout whose images form the test set")
    parser.add_argument("--test_count", type=int, default=20,
                        help="training images held out as the test set when there is no --test_root (default 20)")
    parser.add_argument("--split_seed", type=int, default=0,
                        help="seed of the validation and labeled splits, the same for every run (default 0)")
    parser.add_argument("--recipe", help="config file merged after train.json and the data set's preset")
    parser.add_argument("--override", default="{}", help="JSON object of config keys for every run, e.g. '{\"num_iterations\": 300}'")
    parser.add_argument("--adapter_args", default="{}",
                        help="JSON object of extra adapter arguments, e.g. '{\"validation_ratio\": 0.2}'")
    args = parser.parse_args(argv)
    return StudyOptions(
        data=args.data, root=args.root, out=args.out, methods=_split_list(args.methods, str, "--methods"),
        labeled_ratios=_split_list(args.labeled_ratios, float, "--labeled_ratios"),
        seeds=_split_list(args.seeds, int, "--seeds"), test_root=args.test_root, test_count=args.test_count,
        split_seed=args.split_seed, recipe=args.recipe, overrides=_json_object(args.override, "--override"),
        adapter_args=_json_object(args.adapter_args, "--adapter_args"))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: runs the study and returns the exit status (1 when a run failed).

    Args:
        argv: the arguments after ``study``; None reads ``sys.argv``.
    """
    options = parse_args(argv)

    def stop(signum, frame):  # noqa: ARG001 - a terminated study also ends the run in progress
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop) if hasattr(signal, "SIGTERM") else None
    try:
        failed = run_study(options)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if failed:
        print(f"ERROR: {len(failed)} run(s) failed: {', '.join(failed)}; see their train.log / eval.log under "
              f"{Path(options.out) / 'runs'}.", file=sys.stderr)
        return 1
    return 0
