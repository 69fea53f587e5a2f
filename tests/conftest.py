"""Shared test settings and fixtures: offline hubs, a demo-data cache of the tests' own, the guard that keeps the
repository's outputs and the user's cache untouched, and the generated demo data set (helpers.py holds the shared
functions and constants)."""

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from scripts.data import demo_cache_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# What the tests must never read or write: the main job's outputs and the user's demo-data cache (found as the
# configs find it, before the tests get a cache of their own below).
GUARDED = {"models/": REPO / "models", "runs/": REPO / "runs", "eval/": REPO / "eval",
           "the demo-data cache": Path(demo_cache_dir()).parent}
# Every test, and every process a test starts, generates demo data into a cache of its own (removed at the end).
TEST_CACHE = Path(tempfile.mkdtemp(prefix="mpamatch-test-cache-"))
os.environ["MPAMATCH_CACHE"] = str(TEST_CACHE)

_SNAPSHOT = pytest.StashKey[dict]()
_CHANGES = pytest.StashKey[list]()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` (itself included) with its size (-1 for a folder) and modification
    time in nanoseconds; empty when ``folder`` does not exist."""
    if not folder.exists():
        return {}
    entries = {}
    for path in [folder, *folder.rglob("*")]:
        stat = path.lstat()
        entries[str(path.relative_to(folder))] = (-1 if path.is_dir() else stat.st_size, stat.st_mtime_ns)
    return entries


def changed_entries(before: dict, after: dict) -> list[str]:
    """What differs between two snapshots of one folder: added, removed and modified entries, by name."""
    changes = [f"added {name}" for name in sorted(after.keys() - before.keys())]
    changes += [f"removed {name}" for name in sorted(before.keys() - after.keys())]
    changes += [f"modified {name}" for name in sorted(before.keys() & after.keys()) if before[name] != after[name]]
    return changes


def pytest_sessionstart(session):
    session.config.stash[_SNAPSHOT] = {label: snapshot(folder) for label, folder in GUARDED.items()}


def pytest_sessionfinish(session):
    """Fails the session when any guarded folder changed while the tests ran."""
    before = session.config.stash.get(_SNAPSHOT, None)
    if before is None:
        return
    changes = []
    for label, folder in GUARDED.items():
        changes += [f"{folder} ({label}): {change}" for change in changed_entries(before[label], snapshot(folder))]
    session.config.stash[_CHANGES] = changes
    if changes:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, config):
    changes = config.stash.get(_CHANGES, [])
    if not changes:
        return
    terminalreporter.write_sep("=", "FAILED: the tests changed folders they must not touch", red=True)
    for line in changes[:50]:
        terminalreporter.write_line(line)
    if len(changes) > 50:
        terminalreporter.write_line(f"... and {len(changes) - 50} more")
    terminalreporter.write_line(
        "A test wrote the repository's models/, runs/ or eval/ or the user's demo-data cache: give its commands a "
        "tmp_path (--bundle_root, --ckpt_dir, --output_dir, --eval_dir, --ckpt_path, --onnx_path). If another "
        "program (a training of your own) wrote there while the tests ran, run them again."
    )


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small generated demo data set shared by the bundle tests: returns its datalist path."""
    from scripts.data import ensure_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "demo"
    return ensure_demo_dataset(root, seed=0, n_labeled=4, n_unlabeled=4, n_validation=2, n_test=2, image_size=(96, 128))
