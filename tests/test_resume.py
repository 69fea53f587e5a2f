"""Resume after a kill is exact in every output, runs can be extended, checkpoints load safely, one run per folder.

The kill tests are real subprocesses that send themselves SIGKILL (tests/faults.py) at three points: in the middle
of an epoch, during validation, and halfway through writing a training checkpoint. The same command is then run
again; its ``checkpoint.pt``, ``model.pt``, best-metric record and closing summary must equal those of a run that
was never interrupted.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scripts.errors import ConfigError
from tests.helpers import REPO, TINY_MPAMATCH, TRAIN, assert_same, subprocess_env


# A tiny MPAMatch run: 4 unlabeled images in batches of 2 make 2 iterations an epoch; 3 epochs, validation on
# the 2 validation images after each.


def _command(demo_data, folder, extra_config=None, **overrides):
    config = f"['{TRAIN}','{extra_config}']" if extra_config else str(TRAIN)
    args = {**TINY_MPAMATCH, "datalist": demo_data, "ckpt_dir": folder / "models", "output_dir": folder / "runs", **overrides}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config]
    for key, value in args.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    return cmd


def _train(demo_data, folder, check=True, extra_config=None, **overrides):
    result = subprocess.run(_command(demo_data, folder, extra_config, **overrides), cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _summary(log: str) -> str:
    return re.search(r"Training finished after .*? best validation Dice [0-9.]+ at epoch \d+", log).group(0)


def _fault_config(folder: Path, point: str, count: int) -> Path:
    config = json.loads(TRAIN.read_text())
    imports = [*config.get("imports", []), "$import tests.faults as faults"]
    initialize = config["initialize"]
    initialize.append(f"$faults.kill_at(@train#trainer, @validate#evaluator, '{point}', {count})")
    path = folder / "fault.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"imports": imports, "initialize": initialize}))
    return path


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)




@pytest.fixture(scope="module")
def straight(demo_data, tmp_path_factory):
    """The uninterrupted 3-epoch run: its output folder and closing summary."""
    folder = tmp_path_factory.mktemp("straight")
    result = _train(demo_data, folder)
    return folder, _summary(result.stdout + result.stderr)


@pytest.mark.parametrize("point,count", [("iteration", 3), ("validation", 3), ("checkpoint_write", 2)])
def test_killed_run_resumes_to_the_same_files_and_summary(straight, demo_data, tmp_path, point, count):
    reference, reference_summary = straight
    killed = _train(demo_data, tmp_path, check=False, extra_config=_fault_config(tmp_path, point, count))
    assert killed.returncode == -9, f"the run was not killed at {point} {count}: {killed.stderr[-2000:]}"
    models = tmp_path / "models"
    if point == "checkpoint_write":
        assert list(models.glob(".checkpoint.pt.*.tmp")), "the kill did not leave a half-written checkpoint"
    # Every kill point here lies in epoch 2, so the rerun starts from epoch 1's checkpoint.
    assert _load(models / "checkpoint.pt")["trainer"]["iteration"] == 2
    assert (models / "training.lock").exists(), "a killed run leaves its lock behind"

    rerun = _train(demo_data, tmp_path)
    log = rerun.stdout + rerun.stderr
    assert "Resumed from" in log and "at epoch 1, iteration 2" in log
    assert "Taking over the lock" in log
    assert _summary(log) == reference_summary
    for name in ("checkpoint.pt", "model.pt"):
        assert_same(_load(reference / "models" / name), _load(models / name), name)
    assert not list(models.glob("*.tmp")) and not list(models.glob(".*.tmp")), "temporary files left behind"
    assert not (models / "training.lock").exists(), "the lock outlived the run"


def test_best_metric_record_travels_in_the_checkpoint(straight):
    folder, summary = straight
    record = _load(folder / "models" / "checkpoint.pt")["best_metric"]
    best, epoch = re.search(r"best validation Dice ([0-9.]+) at epoch (\d+)", summary).groups()
    assert record["best_epoch"] == int(epoch) and f"{record['best']:.4f}" == best


def test_a_resumed_run_does_not_replace_a_better_model_with_a_worse_one(tmp_path):
    from ignite.engine import Engine

    from scripts.handlers import BestMetricSaver

    network = torch.nn.Linear(2, 2)

    def validated(saver, epoch, dice):
        engine = Engine(lambda *_: None)
        saver.attach(engine)
        engine.state.epoch, engine.state.metrics, engine.state.key_metric_name = epoch, {"dice": dice}, "dice"
        saver(engine)
        return engine

    first = BestMetricSaver(str(tmp_path), {"model": network})
    validated(first, 1, 0.8)
    saved = _load(tmp_path / "model.pt")["model"]["weight"].clone()
    record = first.state_dict()

    with torch.no_grad():
        network.weight.add_(1.0)  # the resumed run's weights after more training
    resumed = BestMetricSaver(str(tmp_path), {"model": network})
    evaluator = Engine(lambda *_: None)
    resumed.attach(evaluator)
    resumed.load_state_dict(record)
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.8, 1)
    validated(resumed, 2, 0.7)
    assert torch.equal(_load(tmp_path / "model.pt")["model"]["weight"], saved), "a worse model replaced the best one"
    validated(resumed, 3, 0.9)
    assert not torch.equal(_load(tmp_path / "model.pt")["model"]["weight"], saved)
    assert resumed.state_dict() == {"best": 0.9, "best_epoch": 3}


# ------------------------------------------------------------------------------------- a longer or shorter run
def test_poly_lr_matches_the_method_schedule_and_extends_to_a_new_end():
    from torch.optim.lr_scheduler import PolynomialLR

    from scripts.engines import PolyLR

    def sgd():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)

    ours, theirs = sgd(), sgd()
    ours_schedule, theirs_schedule = PolyLR(ours, 10, 0.9), PolynomialLR(theirs, 10, 0.9)
    for _ in range(10):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        ours.step(), theirs.step(), ours_schedule.step(), theirs_schedule.step()
    assert ours.param_groups[0]["lr"] == 0.0
    longer = sgd()
    longer_schedule = PolyLR(longer, 20, 0.9)
    longer.load_state_dict(ours.state_dict())
    longer_schedule.load_state_dict(ours_schedule.state_dict())
    assert longer_schedule.total_iters == 20
    assert longer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 0.9)
    for _ in range(10):
        longer.step(), longer_schedule.step()
    assert longer.param_groups[0]["lr"] == 0.0


def test_a_finished_run_resumed_with_more_epochs_keeps_learning(straight, demo_data, tmp_path):
    reference, _ = straight
    models = tmp_path / "models"
    models.mkdir()
    (models / "checkpoint.pt").write_bytes((reference / "models" / "checkpoint.pt").read_bytes())
    result = _train(demo_data, tmp_path, num_epochs=4)
    log = result.stdout + result.stderr
    assert "The run now trains 4 epochs (8 iterations) instead of 3" in log
    assert "Training finished after 4 epochs (8 iterations)" in log
    before, after = _load(models.parent.parent / reference.name / "models" / "checkpoint.pt"), _load(models / "checkpoint.pt")
    assert after["lr_scheduler"]["last_epoch"] == 8 and after["lr_scheduler"]["total_iters"] == 8
    changed = [k for k, v in before["model"].items() if v.is_floating_point() and "running" not in k
               and not torch.equal(v, after["model"][k])]
    assert len(changed) > 10, "the extra epoch did not change the weights (learning rate 0?)"


def test_a_run_shorter_than_the_finished_epochs_is_refused(straight, demo_data, tmp_path):
    reference, _ = straight
    models = tmp_path / "models"
    models.mkdir()
    (models / "checkpoint.pt").write_bytes((reference / "models" / "checkpoint.pt").read_bytes())
    result = _train(demo_data, tmp_path, check=False, num_epochs=2)
    assert result.returncode != 0
    assert (f"ERROR: Checkpoint '{models / 'checkpoint.pt'}' has finished 3 epochs, more than the 2 this config "
            "trains") in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------- safe loading
class Foreign:
    """A pickled Python object: loading with ``weights_only=True`` refuses to run its code."""


def _damaged(tmp_path, good: Path) -> dict:
    data = good.read_bytes()
    files = {"empty": b"", "truncated": data[: len(data) // 2], "not a checkpoint": b"hello, I am a text file\n"}
    paths = {}
    for kind, content in files.items():
        paths[kind] = tmp_path / f"{kind.replace(' ', '_')}.pt"
        paths[kind].write_bytes(content)
    paths["python objects"] = tmp_path / "foreign.pt"
    torch.save({"model": Foreign()}, paths["python objects"])
    paths["a list"] = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], paths["a list"])
    return paths


@pytest.mark.parametrize("kind,message", [
    ("empty", "is empty (0 bytes"), ("truncated", "is truncated, corrupt or not a PyTorch file"),
    ("not a checkpoint", "is truncated, corrupt or not a PyTorch file"),
    ("python objects", "holds Python objects besides tensors and plain values"), ("a list", "holds a list"),
])
def test_damaged_checkpoints_get_a_named_error(straight, tmp_path, kind, message):
    from scripts.networks import read_checkpoint

    path = _damaged(tmp_path, straight[0] / "models" / "model.pt")[kind]
    with pytest.raises(ConfigError) as caught:
        read_checkpoint(path, "ckpt_path")
    assert f"Checkpoint '{path}' {message}" in str(caught.value)
    assert "Train first" in str(caught.value)


def test_a_damaged_training_checkpoint_stops_resume_with_what_to_do(straight, demo_data, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    data = (straight[0] / "models" / "checkpoint.pt").read_bytes()
    (models / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    result = _train(demo_data, tmp_path, check=False)
    assert result.returncode != 0
    assert f"ERROR: Checkpoint '{models / 'checkpoint.pt'}' is truncated, corrupt or not a PyTorch file" in result.stderr
    assert "set 'resume' to false" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ one run per folder
def _holder(folder: Path):
    """Another process that takes the training lock of ``folder`` and keeps it for a minute."""
    code = ("import sys, time; from scripts.handlers import acquire_run_lock; acquire_run_lock(sys.argv[1]); "
            "print('ready', flush=True); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_a_second_training_on_the_same_folder_stops_at_once_naming_the_holder(demo_data, tmp_path):
    holder = _holder(tmp_path / "models")
    try:
        start = time.perf_counter()
        result = _train(demo_data, tmp_path, check=False)
        assert result.returncode != 0
        assert (f"ERROR: Another training is writing to '{tmp_path / 'models'}': lock "
                f"'{tmp_path / 'models' / 'training.lock'}' is held by process {holder.pid}") in result.stderr
        assert not (tmp_path / "models" / "checkpoint.pt").exists()
        assert time.perf_counter() - start < 60
    finally:
        holder.kill()
        holder.wait()


def test_a_held_lock_is_respected_whatever_its_file_says(tmp_path):
    from scripts.handlers import acquire_run_lock

    holder = _holder(tmp_path)
    try:
        # the file's content is only a description: a dead or foreign process id there does not free the lock
        (tmp_path / "training.lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))
        with pytest.raises(ConfigError, match="is held by process 999999 on elsewhere"):
            acquire_run_lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert acquire_run_lock(tmp_path).exists()  # the kernel released the killed holder's lock


def test_a_stale_lock_is_taken_over_and_released(tmp_path, caplog):
    from scripts.handlers import acquire_run_lock
    from scripts.handlers.lock import _release

    (tmp_path / "training.lock").write_text(json.dumps({"pid": 4242, "host": "node-7", "command": "old run"}))
    with caplog.at_level("WARNING"):
        path = acquire_run_lock(tmp_path)
    assert "left by process 4242 on node-7" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert acquire_run_lock(tmp_path) == path  # the same process may train again in the same folder
    _release(str(path.resolve()))
    assert not path.exists()


@pytest.mark.parametrize("content", [b"", b"not an onnx model", b"\x08\x07\x12\x04" * 10])
def test_a_damaged_onnx_model_gets_a_named_error(tmp_path, content):
    from scripts.deploy.onnx import OnnxSegmenter

    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"ONNX model '{re.escape(str(path))}' cannot be loaded by ONNX Runtime"):
        OnnxSegmenter(path, num_classes=2)
