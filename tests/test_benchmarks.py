"""The benchmark scripts' own logic (their figures are measured by running them, never in tests)."""

import json
import sys
import time

import pytest

from scripts.benchmarks import gpu, throughput


def test_gpu_checks_run_in_order_within_the_budget_and_report_as_they_go(tmp_path):
    quick = [sys.executable, "-c", "print('| tiles/s | 12.5 |')"]
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    planned = [
        {"name": "first", "cap": 100, "rows": gpu._table_rows, "command": quick},
        {"name": "second", "cap": 100, "rows": gpu._table_rows, "command": slow},
        {"name": "third", "cap": 100, "rows": gpu._table_rows, "command": quick},
    ]
    seen = []
    start = time.perf_counter()
    results = gpu.run_checks(planned, tmp_path, budget=4.0, record=lambda entry: seen.append(entry["check"]),
                             minimum=1.0)
    elapsed = time.perf_counter() - start
    assert seen == ["first", "second", "third"]  # each result is recorded as it ends
    assert results[0]["status"] == "ok" and results[0]["table"] == ["| tiles/s | 12.5 |"]
    assert results[1]["status"].startswith("timed out after")  # cut at what was left of the budget, not its cap
    assert results[2]["status"].startswith("skipped")
    assert elapsed < 4.0 + 2.0
    assert (tmp_path / "first.log").read_text().strip() == "| tiles/s | 12.5 |"


def test_gpu_checks_put_the_wanted_figures_first_and_fit_the_default_budget(tmp_path):
    planned = gpu.checks(tmp_path, smoke=False)
    assert [c["name"] for c in planned] == ["trainer", "inference_uni", "wsi", "training"]
    assert "uni" in planned[0]["command"] and "true" in planned[0]["command"]  # UNI-size encoder, bf16
    default_budget = gpu.main.__defaults__[2]
    assert default_budget + 30 <= 8 * 60  # the checks plus start-up end within 8 minutes


@pytest.mark.parametrize("native", [True, False])
def test_throughput_measures_bfloat16_only_where_the_cpu_computes_it(tmp_path, capsys, monkeypatch, native):
    import scripts.inference.precision as precision

    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda: native)
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({"encoder_name": "vit_tiny", "encoder_kwargs": {"depth": 1},
                                  "skip_channels": [16, 8, 8], "decoder_channels": [16, 16, 8, 8],
                                  "roi_size": [32, 32], "image_scale": 0.5}))
    throughput.main(recipe=str(recipe), seconds=0.2, workdir=str(tmp_path / "work"), backends="pytorch-bf16",
                    slides=False)
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    windows = [r for r in rows if r["kind"] == "windows"]
    if native:
        assert [r["name"] for r in windows] == ["pytorch-bf16"] and windows[0]["windows_per_s"] > 0
    else:
        assert windows == [] and "pytorch-bf16 left out: this CPU has neither AVX512-BF16 nor AMX" in out


def test_throughput_measures_windows_and_slides_end_to_end(tmp_path, capsys):
    """A tiny network on a small generated slide: every row is there, and the slide rows add up."""
    from scripts.wsi import write_synthetic_slide

    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({"encoder_name": "vit_tiny", "encoder_kwargs": {"depth": 1},
                                  "skip_channels": [16, 8, 8], "decoder_channels": [16, 16, 8, 8],
                                  "roi_size": [32, 32], "image_scale": 0.5}))
    slide = write_synthetic_slide(tmp_path / "s.tif", 512, 640, tile=128, seed=1)
    throughput.main(recipe=str(recipe), seconds=0.2, workdir=str(tmp_path / "work"), backends="pytorch",
                    slide=str(slide))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["kind"] for r in rows] == ["matmul"] + ["windows"] * 2 + ["slide"] * 4 + ["matmul"]
    windows = {r["name"]: r for r in rows if r["kind"] == "windows"}
    assert set(windows) == {"pytorch", "pytorch-channels-last"}
    for row in windows.values():
        assert row["windows_per_s"] > 0 and row["roi"] == [32, 32] and row["gflop_per_window"] > 0
        assert row["gflops"] == pytest.approx(row["windows_per_s"] * row["gflop_per_window"], rel=0.01, abs=0.06)
    slides = {r["name"]: r for r in rows if r["kind"] == "slide"}
    assert set(slides) == {"pytorch", "pytorch-per-tile", "pytorch-tta", "pytorch-tta-per-tile"}
    assert slides["pytorch"]["windows"] > 0 and slides["pytorch-per-tile"]["windows"] is None
    for row in slides.values():
        shares = [row[k] for k in ("share_read_wait", "share_segment", "share_tissue_detection", "share_write")]
        assert sum(shares) == pytest.approx(1.0, abs=0.01) and min(shares) >= -0.01
        assert row["tiles"] > 0 and row["peak_rss_mb"] > 100 and row["command_s"] >= row["slide_s"]
