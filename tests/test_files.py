"""Atomic writes: the target is replaced only by a complete file, and a failed write leaves the old one."""

import subprocess
import sys

import pytest

from scripts.files import atomic_path, write_text_atomically


def test_a_complete_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "sub" / "report.md"
    write_text_atomically(target, "first\n")
    write_text_atomically(target, "second\n")
    assert target.read_text() == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("good\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("the writer failed")
    assert target.read_text() == "good\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_the_temporary_name_keeps_a_suffix_for_writers_that_need_one(tmp_path):
    with atomic_path(tmp_path / "plot.png", suffix=".png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".plot.png.")
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "mask.tif"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # a process that has exited, as a killed writer has
    orphan = tmp_path / f".mask.tif.{dead_pid}.partial"
    orphan.write_bytes(b"half a slide")
    other = tmp_path / ".other.tif.1.partial"  # another file's temporary is not touched
    other.write_bytes(b"x")
    write_text_atomically(target, "done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tif.1.partial", "mask.tif"]
