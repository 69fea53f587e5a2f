"""The study's results: ``results.csv`` (a row per run), ``results.md`` (means, paired differences to
``supervised`` with bootstrap intervals, the all-foreground baseline) and ``label_efficiency.png``."""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from scripts.files import atomic_path, write_text_atomically

__all__ = ["CSV_COLUMNS", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "paired_bootstrap_interval", "trivial_baseline",
           "write_results_csv", "write_results_markdown", "write_label_efficiency_plot", "paired_differences"]

logger = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 0
BASELINE = "supervised"
CSV_COLUMNS = ["method", "labeled_ratio", "seed", "run", "status", "n_labeled", "n_unlabeled", "n_test", "iterations",
               "train_seconds", "test_dice", "test_iou", "test_hd95", "test_object_f1", "test_object_dice",
               "trivial_dice", "note"]
# result.json metric name -> results.csv column
METRIC_COLUMNS = {"dice": "test_dice", "iou": "test_iou", "hd95": "test_hd95", "object_f1": "test_object_f1",
                  "object_dice": "test_object_dice"}


def paired_bootstrap_interval(differences: Sequence[float], n_resamples: int = BOOTSTRAP_RESAMPLES,
                              confidence: float = 0.95, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """Mean of paired differences and its percentile bootstrap interval.

    Args:
        differences: one difference per pair (non-finite values are left out).
        n_resamples: bootstrap resamples. Defaults to 10000.
        confidence: interval coverage. Defaults to 0.95.
        seed: seed of numpy's generator, so the interval is reproducible. Defaults to 0.

    Returns:
        ``(mean, low, high)``.

    Raises:
        ValueError: no finite difference.
    """
    values = np.asarray(list(differences), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("paired_bootstrap_interval needs at least one finite difference.")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // values.size)
    for start in range(0, n_resamples, chunk):
        count = min(chunk, n_resamples - start)
        means[start:start + count] = values[rng.integers(0, values.size, size=(count, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(values.mean()), float(low), float(high)


def trivial_baseline(test_entries: Iterable[Mapping], label_threshold: float = 0) -> dict[str, dict[str, float]]:
    """Dice and IoU of predicting foreground everywhere, per test image (keyed by the image's real path).

    Args:
        test_entries: datalist entries with absolute ``image`` and ``label`` paths.
        label_threshold: foreground is ``label > label_threshold``, as in training. Defaults to 0.
    """
    scores = {}
    for entry in test_entries:
        mask = np.asarray(Image.open(entry["label"]))
        mask = mask[..., 0] if mask.ndim == 3 else mask
        truth = float((mask > label_threshold).sum())
        total = float(mask.size)
        scores[os.path.realpath(entry["image"])] = {"dice": 2.0 * truth / (truth + total), "iou": truth / total}
    return scores


def _finite(values: Iterable) -> list[float]:
    return [float(v) for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]


def _mean_std(values: Iterable) -> tuple[float | None, float | None, int]:
    finite = _finite(values)
    if not finite:
        return None, None, 0
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else None, len(finite)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_mean_std(values: Iterable, digits: int = 4) -> str:
    mean, std, n = _mean_std(values)
    if n == 0:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def write_results_csv(path: str | os.PathLike, rows: Sequence[Mapping]) -> Path:
    """Writes one row per run with the columns of :data:`CSV_COLUMNS` (missing values left empty).

    Args:
        path: ``OUT/results.csv``.
        rows: one mapping per run.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    return path


def paired_differences(results: Sequence[Mapping], method: str, ratio: float, metric: str = "dice") -> dict:
    """Differences of ``method`` to ``supervised`` at ``ratio``, paired by training seed and test image.

    Args:
        results: finished runs' result records (``method``, ``labeled_ratio``, ``seed``, ``metrics``, ``per_image``).
        method: the method compared with ``supervised``.
        ratio: the labeled ratio.
        metric: the per-image metric. Defaults to ``"dice"``.

    Returns:
        ``{"seeds": [...], "per_seed": [run mean differences], "per_image": [differences averaged over seeds]}``.
    """
    def runs_of(name: str) -> dict[int, Mapping]:
        return {r["seed"]: r for r in results if r["method"] == name and r["labeled_ratio"] == ratio}

    ours, base = runs_of(method), runs_of(BASELINE)
    seeds = sorted(set(ours) & set(base))
    per_seed, by_image = [], {}
    for seed in seeds:
        a, b = ours[seed]["metrics"].get(metric), base[seed]["metrics"].get(metric)
        if _finite([a]) and _finite([b]):
            per_seed.append(float(a) - float(b))
        for image, values in ours[seed]["per_image"].items():
            other = base[seed]["per_image"].get(image, {}).get(metric)
            mine = values.get(metric)
            if _finite([mine]) and _finite([other]):
                by_image.setdefault(image, []).append(float(mine) - float(other))
    return {"seeds": seeds, "per_seed": per_seed, "per_image": [float(np.mean(v)) for v in by_image.values()]}


def write_results_markdown(path: str | os.PathLike, results: Sequence[Mapping], rows: Sequence[Mapping],
                           methods: Sequence[str], ratios: Sequence[float], trivial: Mapping[str, Mapping[str, float]],
                           header: Sequence[str] = ()) -> Path:
    """Writes ``results.md``: mean ± std over seeds per method and ratio, the all-foreground baseline, and each
    method's paired difference to ``supervised`` with a bootstrap 95 % interval over test images.

    Args:
        path: ``OUT/results.md``.
        results: finished runs' result records.
        rows: every run's CSV row (failed runs included), for the failure list.
        methods: methods in the order of the study.
        ratios: labeled ratios in the order of the study.
        trivial: per-image scores of the all-foreground prediction (:func:`trivial_baseline`).
        header: lines describing the study (data, test set, recipe), written first.
    """
    lines = ["# Study results", ""] + [f"- {line}" for line in header] + [""]
    lines += ["## Test metrics (mean ± std over training seeds)", "",
              "| method | labeled ratio | runs | Dice | IoU | HD95 (px) | object F1 | object Dice | iterations | train time (s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for ratio in ratios:
        for method in methods:
            done = [r for r in results if r["method"] == method and r["labeled_ratio"] == ratio]
            if not done:
                lines.append(f"| {method} | {ratio:g} | 0 | – | – | – | – | – | – | – |")
                continue
            metric = lambda name: _fmt_mean_std(r["metrics"].get(name) for r in done)  # noqa: E731
            iterations = sorted({r.get("iterations") for r in done if r.get("iterations") is not None})
            lines.append(
                f"| {method} | {ratio:g} | {len(done)} | {metric('dice')} | {metric('iou')} | "
                f"{_fmt_mean_std((r['metrics'].get('hd95') for r in done), 2)} | {metric('object_f1')} | "
                f"{metric('object_dice')} | {', '.join(map(str, iterations)) or '–'} | "
                f"{_fmt_mean_std((r.get('train_seconds') for r in done), 0)} |")
    dice = [v["dice"] for v in trivial.values()]
    iou = [v["iou"] for v in trivial.values()]
    lines.append(f"| all foreground (trivial) | any | – | {_fmt_mean_std(dice)} | {_fmt_mean_std(iou)} | – | – | – | – | – |")
    lines += ["", f"The all-foreground row predicts gland everywhere on the same {len(dice)} test images; its ± is the "
              "standard deviation over test images (it has no training seed). The other ± are standard deviations "
              "of the run means over training seeds (sample std; none with one run). Train time is the wall-clock time of "
              "the training process, start-up and validation included."]
    mismatched = []
    for ratio in ratios:
        counts: dict[str, set] = {}
        for r in results:
            if r["labeled_ratio"] == ratio and r.get("iterations") is not None:
                counts.setdefault(r["method"], set()).add(r["iterations"])
        if len(set().union(*counts.values())) > 1:
            mismatched.append(f"ratio {ratio:g}: " + ", ".join(
                f"{m} {'/'.join(map(str, sorted(c)))}" for m, c in counts.items()))
    if mismatched:
        lines += ["", "**Warning:** the methods did not train the same number of iterations (set `num_iterations` "
                  "in the recipe or `--override`): " + "; ".join(mismatched) + "."]

    lines += ["", f"## Paired difference to `{BASELINE}` (test Dice)", ""]
    others = [m for m in methods if m != BASELINE]
    if BASELINE not in methods or not others:
        lines.append(f"No paired comparison: the study needs `{BASELINE}` and at least one other method.")
    else:
        lines += [
            f"Each method's Dice minus `{BASELINE}`'s, paired by labeled ratio, training seed and test image. Per test "
            "image the differences are averaged over the paired seeds; the 95 % interval is a percentile bootstrap "
            f"over those per-image differences ({BOOTSTRAP_RESAMPLES} resamples, numpy generator seed "
            f"{BOOTSTRAP_SEED}). It shows how consistent the difference is across test images, not across "
            "training runs; the per-seed column gives the run-level differences for that.", "",
            "| method | labeled ratio | paired seeds | test images | Δ Dice | 95 % interval (per image) | Δ per seed |",
            "|---|---|---|---|---|---|---|"]
        for ratio in ratios:
            for method in others:
                pairs = paired_differences(results, method, ratio)
                if not pairs["per_image"]:
                    lines.append(f"| {method} | {ratio:g} | {len(pairs['seeds'])} | 0 | – | – | – |")
                    continue
                mean, low, high = paired_bootstrap_interval(pairs["per_image"])
                per_seed = ", ".join(f"{d:+.4f}" for d in pairs["per_seed"]) or "–"
                lines.append(f"| {method} | {ratio:g} | {len(pairs['seeds'])} | {len(pairs['per_image'])} | "
                             f"{mean:+.4f} | [{low:+.4f}, {high:+.4f}] | {per_seed} |")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r['run']}`: {r.get('note') or 'failed'}" for r in failed]
    path = Path(path)
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path


def write_label_efficiency_plot(path: str | os.PathLike, results: Sequence[Mapping], methods: Sequence[str],
                                ratios: Sequence[float], trivial_dice: float | None, title: str = "") -> Path | None:
    """Plots test Dice against labeled ratio: one line per method with std-over-seeds error bars, and the
    all-foreground baseline dashed. Returns None (with a warning) when matplotlib is not installed.

    Args:
        path: ``OUT/label_efficiency.png``.
        results: finished runs' result records.
        methods: methods in the order of the study.
        ratios: labeled ratios.
        trivial_dice: mean Dice of the all-foreground prediction, or None.
        title: the plot's title.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("[study] matplotlib is not installed, so label_efficiency.png was not drawn; install the "
                       "version pinned in requirements.txt.")
        return None
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    xs = sorted(set(ratios))
    for method in methods:
        points = []
        for ratio in xs:
            mean, std, n = _mean_std(r["metrics"].get("dice") for r in results
                                     if r["method"] == method and r["labeled_ratio"] == ratio)
            if n:
                points.append((ratio, mean, std or 0.0))
        if points:
            x, y, err = zip(*points)
            axes.errorbar(x, y, yerr=err, marker="o", capsize=4, label=method)
    if trivial_dice is not None:
        axes.axhline(trivial_dice, linestyle="--", color="grey", label="all foreground (trivial)")
    axes.set_xticks(xs)
    axes.set_xticklabels([f"{x:g}" for x in xs])
    axes.set_xlabel("labeled ratio")
    axes.set_ylabel("test Dice")
    axes.set_ylim(0.0, 1.0)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp)
    plt.close(figure)
    return path
