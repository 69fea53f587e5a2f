"""The benchmark scripts' own logic (their figures are measured by running them, never in tests)."""

import sys
import time

from scripts.benchmarks import gpu


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
