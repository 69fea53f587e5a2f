"""Atomic writes: the target is replaced only by a complete file, and a failed write leaves the old one."""

import os
import subprocess
import sys

import pytest

from scripts.files import atomic_files, atomic_path, write_text_atomically


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


def _dead_pid() -> int:
    """The id of a process that has exited, as a killed writer has."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "mask.tif"
    orphan = tmp_path / f".mask.tif.{_dead_pid()}.partial"
    orphan.write_bytes(b"half a slide")
    other = tmp_path / ".other.tif.1.partial"  # another file's temporary is not touched
    other.write_bytes(b"x")
    write_text_atomically(target, "done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tif.1.partial", "mask.tif"]


def _write_pair(path, model: str, data: str) -> None:
    """A model file and the data file it names, as an ONNX export with external data writes them."""
    with atomic_files(path) as folder:
        (folder / path.name).write_text(f"{model} -> {path.name}.data")
        (folder / f"{path.name}.data").write_text(data)


def test_a_file_and_its_companions_replace_the_old_ones_together(tmp_path):
    target = tmp_path / "models" / "model.onnx"
    _write_pair(target, "first", "weights 1")
    _write_pair(target, "second", "weights 2")
    assert target.read_text() == "second -> model.onnx.data"
    assert (tmp_path / "models" / "model.onnx.data").read_text() == "weights 2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_a_failed_write_of_a_file_set_changes_nothing(tmp_path):
    target = tmp_path / "model.onnx"
    _write_pair(target, "good", "good weights")
    with pytest.raises(RuntimeError):
        with atomic_files(target) as folder:
            (folder / "model.onnx.data").write_text("new weig")
            raise RuntimeError("the parity check failed")
    assert target.read_text() == "good -> model.onnx.data"
    assert (tmp_path / "model.onnx.data").read_text() == "good weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    with pytest.raises(FileNotFoundError, match="writes the main file as 'model.onnx'"):
        with atomic_files(target) as folder:
            (folder / "other.onnx").write_text("wrong name")
    assert target.read_text() == "good -> model.onnx.data"


def test_a_kill_between_the_renames_leaves_no_file_rather_than_an_old_one_with_new_data(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    _write_pair(target, "old", "old weights")
    real_replace = os.replace

    def killed_before_the_main_file(source, destination):
        if str(destination) == str(target):
            raise KeyboardInterrupt  # as if the process died here
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", killed_before_the_main_file)
    with pytest.raises(KeyboardInterrupt):
        _write_pair(target, "new", "new weights")
    assert not target.exists()  # never the old model beside the new data
    assert (tmp_path / "model.onnx.data").read_text() == "new weights"


def test_the_folder_of_a_killed_file_set_writer_is_removed_by_the_next_write(tmp_path):
    orphan = tmp_path / f".model.onnx.{_dead_pid()}.partial"
    orphan.mkdir()
    (orphan / "model.onnx.data").write_text("half the weights")
    _write_pair(tmp_path / "model.onnx", "done", "weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
