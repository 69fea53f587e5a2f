"""Training with torchrun on CPU: two gloo processes stay in step, share one prototype bank and rank 0 alone writes.

The launched runs are real ``torchrun --standalone --nproc_per_node=2`` jobs of train.json + multi_gpu_train.json;
tests/distributed_probe.py makes each process dump its state at the end. The prototype all-reduce is also checked
on its own against the prototypes of the two processes' batches taken together.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scripts.engines import all_processes_agree, all_reduce_sum_, average_gradients_
from scripts.prototypes import PrototypeBank
from tests.helpers import REPO, TINY_MPAMATCH, TRAIN, assert_same, subprocess_env

MULTI = REPO / "bundle" / "configs" / "multi_gpu_train.json"
STATE_KEYS = ("network", "optimizer", "prototype_bank", "text_prototypes")


@pytest.fixture(scope="module")
def demo_two_ranks(tmp_path_factory):
    """A demo set with 8 unlabeled images: 2 iterations an epoch on each of 2 processes with batches of 2."""
    from scripts.data import ensure_demo_dataset

    root = tmp_path_factory.mktemp("demo_two_ranks") / "demo"
    return ensure_demo_dataset(root, seed=0, n_labeled=4, n_unlabeled=8, n_validation=2, n_test=2, image_size=(96, 128))


def _torchrun(datalist, folder: Path, probes: tuple[str, ...] = (), **overrides) -> subprocess.CompletedProcess:
    """Two CPU processes; every rank writes under <folder>/rank<r>/ unless ckpt_dir / output_dir are overridden.

    ``probes`` are more ``initialize`` expressions from tests/distributed_probe.py (imported as ``probe``).
    """
    train, multi = json.loads(TRAIN.read_text()), json.loads(MULTI.read_text())
    probe = {
        "imports": [*train["imports"], "$import tests.distributed_probe as probe"],
        "initialize": [*multi["initialize"], f"$probe.dump_state(@train#trainer, '{folder / 'dumps'}')", *probes],
        "ckpt_dir": f"$os.path.join('{folder}', 'rank' + os.environ['RANK'], 'models')",
        "output_dir": f"$os.path.join('{folder}', 'rank' + os.environ['RANK'], 'runs')",
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe.json").write_text(json.dumps(probe))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "training", "--config_file", f"['{TRAIN}','{MULTI}','{folder / 'probe.json'}']"]
    for key, value in {**TINY_MPAMATCH, "datalist": datalist, **overrides}.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def _dumps(folder: Path) -> list[dict]:
    return [torch.load(folder / "dumps" / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(demo_two_ranks, tmp_path_factory):
    """A 2-epoch, 2-process MPAMatch run (4 iterations): its folder."""
    folder = tmp_path_factory.mktemp("two_ranks")
    _torchrun(demo_two_ranks, folder, num_epochs=2)
    return folder


def test_multi_gpu_config_keeps_what_it_overrides_in_step_with_train_json():
    train, multi = json.loads(TRAIN.read_text()), json.loads(MULTI.read_text())
    # initialize: the one-line error hook, the command-line key check, the process group, the lock on rank 0 only,
    # then train.json's checks (the training config check told the number of processes) and the validation shard check
    hook, keys = "$scripts.errors.install_excepthook()", "$scripts.bundle_args.check_command_line_keys()"
    assert multi["initialize"][:2] == train["initialize"][:2] == [hook, keys]
    assert multi["initialize"][2].startswith("$scripts.engines.init_distributed(")
    assert train["initialize"][3] == "$scripts.handlers.acquire_run_lock(@ckpt_dir)"
    assert "acquire_run_lock(@ckpt_dir) if torch.distributed.get_rank() == 0" in multi["initialize"][3]
    told = "datalist=@datalist, processes=torch.distributed.get_world_size())"
    assert [x.replace(told, "datalist=@datalist)") for x in multi["initialize"][4:-1]] == [train["initialize"][2],
                                                                                           *train["initialize"][4:]]
    assert multi["initialize"][-1].startswith("$scripts.engines.check_validation_shards(")
    # the handlers disabled on ranks above 0 by position are the TensorBoard writers, which create files when built
    for key in ("train#handlers#5#_disabled_", "validate#handlers#1#_disabled_"):
        section, _, index, _ = key.split("#")
        assert train[section]["handlers"][int(index)]["_target_"] == "TensorBoardStatsHandler", key
        assert multi[key] == "@is_not_rank0"


def _reduce_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(rank)
        embeddings = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
        target = torch.randint(0, 3, (40,), generator=g)
        keep = torch.rand(40, generator=g) > 0.3
        if rank == 1:
            keep &= target != 2  # class 2 is present on rank 0 only
        bank = PrototypeBank(3, 8, momentum=0.5)
        for _ in range(2):
            bank.update(*bank.batch_prototypes(embeddings, target, keep, reduce=all_reduce_sum_))
        param = torch.nn.Parameter(torch.zeros(3))
        param.grad = torch.full((3,), float(rank + 1))
        average_gradients_([param])
        agree = all_processes_agree(rank == 0, "cpu")
        torch.save({"embeddings": embeddings, "target": target, "keep": keep, "bank": bank.state_dict(),
                    "grad": param.grad, "agree": agree}, f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_prototype_batch_is_that_of_both_processes_batches_together(tmp_path):
    mp.spawn(_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert_same(ranks[0]["bank"], ranks[1]["bank"], "bank")
    together = PrototypeBank(3, 8, momentum=0.5)
    joined = [torch.cat([r[key] for r in ranks]) for key in ("embeddings", "target", "keep")]
    for _ in range(2):
        together.update(*together.batch_prototypes(*joined))
    assert torch.allclose(ranks[0]["bank"]["prototypes"], together.prototypes, atol=1e-6)
    assert torch.equal(ranks[0]["bank"]["updates"], together.updates)
    assert torch.equal(ranks[0]["grad"], torch.full((3,), 1.5)) and torch.equal(ranks[1]["grad"], ranks[0]["grad"])
    assert ranks[0]["agree"] is False and ranks[1]["agree"] is False


def test_two_processes_train_in_step_on_disjoint_shards_and_only_rank_0_writes(two_ranks):
    rank0, rank1 = _dumps(two_ranks)
    assert rank0["iteration"] == rank1["iteration"] == 4
    for key in STATE_KEYS:  # weights, momentum, prototype bank and text prompts, BatchNorm statistics included
        assert_same(rank0[key], rank1[key], key)
    assert rank0["prototype_bank"]["initialized"].all()
    for name, shard in rank0["shards"].items():
        other = rank1["shards"][name]
        assert len(shard) == len(other) > 0, name
        if name != "labeled":  # the labeled stream repeats 4 images to 8 draws: each shard holds duplicates
            assert set(shard).isdisjoint(other) and sorted(shard + other) == list(range(8)), name
    assert not (two_ranks / "rank1").exists(), "a process other than rank 0 wrote files"
    models, runs = two_ranks / "rank0" / "models", two_ranks / "rank0" / "runs"
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint.pt", "model.pt"]  # the lock is released
    events = list(runs.glob("events.out.tfevents.*"))
    assert events and all(f".{rank0['pid']}." in e.name for e in events), "TensorBoard files of another process"
    checkpoint = torch.load(models / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key in STATE_KEYS:
        assert_same(checkpoint["model" if key == "network" else key], rank0[key], key)


def test_a_two_process_run_resumes_on_every_process(two_ranks, demo_two_ranks):
    shared = {"ckpt_dir": two_ranks / "rank0" / "models", "output_dir": two_ranks / "rank0" / "runs"}
    result = _torchrun(demo_two_ranks, two_ranks, num_epochs=3, **shared)
    log = result.stdout + result.stderr
    assert log.count("Resumed from") == 2 and "at epoch 2, iteration 4" in log
    rank0, rank1 = _dumps(two_ranks)
    assert rank0["iteration"] == rank1["iteration"] == 6
    for key in STATE_KEYS:
        assert_same(rank0[key], rank1[key], key)
    checkpoint = torch.load(shared["ckpt_dir"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 6
    assert_same(checkpoint["model"], rank0["network"], "model")
    assert not (two_ranks / "rank1").exists()


def test_a_preset_without_contrast_trains_and_a_step_bad_on_one_process_is_skipped_on_both(demo_two_ranks, tmp_path):
    # unimatch leaves the projection head idle (DDP's unused-parameter search); rank 1's loss is NaN at iteration 2
    result = _torchrun(demo_two_ranks, tmp_path, ("$probe.poison_loss(@train#trainer, 1, 2)",), method="unimatch",
                       num_epochs=2)
    assert "Iteration 2: non-finite loss or gradient (on another process)" in result.stdout + result.stderr
    rank0, rank1 = _dumps(tmp_path)
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == 1
    for key in ("network", "optimizer"):
        assert_same(rank0[key], rank1[key], key)


def _evaluate(config_files: list[Path], datalist, model: Path, out: Path, processes: int) -> subprocess.CompletedProcess:
    launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1
                else [])
    files = "[" + ",".join(f"'{f}'" for f in config_files) + "]"
    cmd = [sys.executable, *launcher, "-m", "monai.bundle", "run", "evaluating", "--config_file", files,
           "--datalist", str(datalist), "--ckpt_path", str(model), "--eval_dir", str(out / "eval"),
           "--output_dir", str(out / "runs"), "--bundle_root", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def test_a_sharded_evaluation_writes_the_report_of_one_process(two_ranks, tmp_path):
    """multi_gpu_evaluate.json: 5 test images split 3 + 2 over two processes give the one-process report."""
    from scripts.data import ensure_demo_dataset

    datalist = ensure_demo_dataset(tmp_path / "demo", seed=1, n_labeled=2, n_unlabeled=2, n_validation=2, n_test=5,
                                   image_size=(96, 128))
    model = two_ranks / "rank0" / "models" / "model.pt"
    evaluate = [TRAIN, TRAIN.parent / "evaluate.json"]
    _evaluate(evaluate, datalist, model, tmp_path / "one", 1)
    result = _evaluate([*evaluate, TRAIN.parent / "multi_gpu_evaluate.json"], datalist, model, tmp_path / "two", 2)
    log = result.stdout + result.stderr
    assert "Evaluated 3/3 images" in log and "Evaluated 2/2 images" in log  # each process its own share
    one, two = tmp_path / "one" / "eval", tmp_path / "two" / "eval"
    assert (two / "per_image.csv").read_text() == (one / "per_image.csv").read_text()
    assert json.loads((two / "summary.json").read_text()) == json.loads((one / "summary.json").read_text())
    assert json.loads((one / "summary.json").read_text())["n_images"] == 5
    assert sorted(p.name for p in (two / "overlays").iterdir()) == sorted(p.name for p in (one / "overlays").iterdir())
    assert len(list((two / "overlays").iterdir())) == 5


def _infer(config_files: list[Path], images: Path, model: Path, out: Path, processes: int) -> subprocess.CompletedProcess:
    launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1
                else [])
    files = "[" + ",".join(f"'{f}'" for f in config_files) + "]"
    cmd = [sys.executable, *launcher, "-m", "monai.bundle", "run", "inference", "--config_file", files,
           "--input_dir", str(images), "--ckpt_path", str(model), "--output_dir", str(out), "--bundle_root", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)


def test_a_sharded_folder_inference_writes_each_mask_once_as_one_process(two_ranks, tmp_path):
    """multi_gpu_inference.json: 5 images (and an unreadable file) over two processes give the one-process masks."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 96), (40, 40), (96, 128), (70, 50), (33, 81)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"tile_{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    model = two_ranks / "rank0" / "models" / "model.pt"
    inference = TRAIN.parent / "inference.json"
    one = _infer([inference], images, model, tmp_path / "one", 1)
    two = _infer([inference, TRAIN.parent / "multi_gpu_inference.json"], images, model, tmp_path / "two", 2)
    # The unreadable file is reported as by one process (by the first process only) and the run fails after the others.
    reports = [(r.stdout + r.stderr).count("1 of 6 images in") for r in (one, two)]
    assert one.returncode != 0 and two.returncode != 0 and reports[0] > 0 and reports[1] == reports[0], \
        (two.stdout + two.stderr)[-4000:]
    log = two.stdout + two.stderr
    assert "Segmented 3/3 images" in log and "Segmented 2/2 images" in log, log[-4000:]
    masks = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / "one").glob("*_mask.png")}
    sharded = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / "two").glob("*_mask.png")}
    assert sorted(masks) == [f"tile_{i}_mask.png" for i in range(5)] and sharded.keys() == masks.keys()
    for name, mask in masks.items():
        assert np.array_equal(sharded[name], mask), name


def test_a_sharded_slide_run_segments_each_slide_once_as_one_process(tmp_path):
    """inference_wsi.json + multi_gpu_inference.json: 3 slides over two processes (2 + 1) give the one-process
    masks and summaries."""
    import numpy as np
    import tifffile

    from scripts.wsi import write_synthetic_slide
    from tests.helpers import save_tiny_model, tiny_record

    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        write_synthetic_slide(slides / f"s{i}.tif", 300, 400, tile=128, mpp=0.5, seed=i, variants=2)
    save_tiny_model(tmp_path / "model.pt", tiny_record(roi_size=[64, 64]))
    configs = [TRAIN.parent / "inference.json", TRAIN.parent / "inference_wsi.json"]
    runs = {}
    for processes, files in ((1, configs), (2, [*configs, TRAIN.parent / "multi_gpu_inference.json"])):
        out = tmp_path / f"out{processes}"
        launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1
                    else [])
        listed = "[" + ",".join(f"'{f}'" for f in files) + "]"
        cmd = [sys.executable, *launcher, "-m", "monai.bundle", "run", "--config_file", listed,
               "--slides", str(slides), "--ckpt_path", str(tmp_path / "model.pt"),
               "--wsi_output_dir", str(out), "--wsi_tile_size", "256", "--bundle_root", str(tmp_path)]
        result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        runs[processes] = (out, result.stdout + result.stderr)
    log = runs[2][1]
    assert "Slide 1/2" in log and "Slide 2/2" in log and "Slide 1/1" in log  # process shares of 2 and 1 slides
    for i in range(3):
        masks = []
        for processes in (1, 2):
            out = runs[processes][0]
            with tifffile.TiffFile(out / f"s{i}_mask.tif") as tif:
                masks.append(tif.pages[0].asarray())
            summary = json.loads((out / f"s{i}_summary.json").read_text())
            masks.append({k: v for k, v in summary.items() if k not in ("seconds", "timing", "outputs")})  # times, folder
        assert np.array_equal(masks[0], masks[2]), f"s{i}"
        assert masks[1] == masks[3], f"s{i}"
