"""The bundle's configs run through ``python -m monai.bundle`` on tiny settings: train, resume, evaluate, infer.

Each run is a real subprocess with the command users type, so config wiring, CLI overrides, outputs and the
one-line error messages are what users get.
"""

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import NET_ARGS, run_python, tiny_network

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "bundle" / "configs"
TRAIN = str(CONFIGS / "train.json")
EVALUATE = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']"
INFERENCE = str(CONFIGS / "inference.json")

# Network and schedule small enough for a few seconds of CPU per run.
TINY_NET = [*NET_ARGS, "--roi_size", "[32,32]"]
# Training-only settings: small batches (the fixture has 4 unlabeled images, so 2 iterations an epoch) and a
# one-layer random text tower.
TINY_TRAIN = [*TINY_NET, "--labeled_batch_size", 2, "--unlabeled_batch_size", 2, "--text_cfg", "{'layers': 1}"]


def run_bundle(run_id, config_file, *args, check=True):
    cmd = ["-m", "monai.bundle", "run", run_id, "--config_file", config_file, *map(str, args)]
    result = run_python(cmd)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """Trains the tiny network for two epochs; returns the output folder and the training log."""
    out = tmp_path_factory.mktemp("bundle")
    result = run_bundle(
        "training", TRAIN, "--datalist", demo_data, *TINY_TRAIN,
        "--ckpt_dir", out / "models", "--output_dir", out / "runs", "--num_epochs", 2,
    )
    return out, result.stdout + result.stderr


def test_training_writes_checkpoints_and_reports_dice(trained):
    out, log = trained
    assert "Training finished after 2 epochs (4 iterations): best validation Dice" in log
    assert re.search(r"Training speed: \d+\.\d+ s/it over 4 iterations of this run", log)
    assert "val_mean_dice" in log
    model = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    tiny_network().load_state_dict(model["model"], strict=True)
    state = torch.load(out / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(state) == {"model", "optimizer", "lr_scheduler", "trainer", "prototype_bank", "text_prototypes", "random_state",
                          "best_metric", "weight_average"}
    assert state["weight_average"] == {"decay": 0.0, "updates": 0}  # averaging is off by default
    assert state["trainer"]["iteration"] == 4 and state["trainer"]["epoch_length"] == 2
    assert not list((out / "models").glob("*.tmp")), "temporary checkpoint files left behind"
    assert list((out / "runs").glob("events.out.tfevents.*")), "no TensorBoard log written"
    # A line per epoch with the time left, for log files (the progress bar is for terminals only).
    assert re.search(r"Epoch 1/2: iteration 2/4, \d+:\d\d elapsed, about \d+:\d\d left", log)
    assert "Epoch 2/2: iteration 4/4" in log


def test_training_writes_validation_overlays_to_tensorboard(trained, demo_data):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained
    validation = json.loads(Path(demo_data).read_text())["validation"][:4]
    images = {}
    for events in (out / "runs").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["images"]:
            images[tag] = accumulator.Images(tag)
    assert sorted(images) == sorted(f"validation/{Path(item['image']).stem}" for item in validation)
    for item in validation:
        events = images[f"validation/{Path(item['image']).stem}"]
        assert [e.step for e in events] == [1, 2]  # one overlay per validation (the trainer's epoch)
        picture = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
        source = np.asarray(Image.open(Path(demo_data).parent / item["image"]).convert("RGB"))
        assert picture.shape == source.shape  # drawn at the image's own size (under 768 px)
        yellow = (picture == (255, 255, 0)).all(-1)
        green = (picture == (0, 255, 0)).all(-1)
        assert yellow.any(), "no ground-truth contour drawn"
        assert np.array_equal(picture[~(yellow | green)], source[~(yellow | green)]), "the image itself was altered"


def test_mlflow_tracking_records_losses_and_validation_metrics(demo_data, tmp_path):
    """MONAI's ``--tracking mlflow`` works on this bundle's trainer and evaluator, into a local SQLite store."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns.db"
    run_bundle(
        "training", TRAIN, "--datalist", demo_data, *TINY_TRAIN, "--ckpt_dir", tmp_path / "models",
        "--output_dir", tmp_path / "runs", "--num_epochs", 2, "--tracking", "mlflow",
        "--tracking_uri", f"sqlite:///{store}", "--experiment_name", "glands",
    )
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("glands")
    (run,) = client.search_runs([experiment.experiment_id])
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert all(0 < m.value < 10 for m in losses)
    dice = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert [m.step for m in dice] == [1, 2] and all(0 <= m.value <= 1 for m in dice)


def test_training_resumes_from_last_checkpoint(trained, demo_data, tmp_path):
    out, _ = trained
    models = tmp_path / "models"
    models.mkdir()
    (models / "checkpoint.pt").write_bytes((out / "models" / "checkpoint.pt").read_bytes())
    result = run_bundle(
        "training", TRAIN, "--datalist", demo_data, *TINY_TRAIN,
        "--ckpt_dir", models, "--output_dir", tmp_path / "runs", "--num_epochs", 3,
    )
    log = result.stdout + result.stderr
    assert "Resumed from" in log and "at epoch 2, iteration 4" in log
    assert "Training finished after 3 epochs (6 iterations)" in log
    state = torch.load(models / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 6


def test_evaluate_writes_per_image_metrics_summary_and_overlays(trained, demo_data, tmp_path):
    import json

    out, _ = trained
    eval_dir = out / "eval"
    # the same demo data, with the test images tagged as two subsets, as the GlaS adapter tags testA / testB
    content = json.loads(Path(demo_data).read_text())
    for entry, subset in zip(content["test"], ("testA", "testB")):
        entry["subset"] = subset
    tagged = Path(demo_data).parent / "tagged_datalist.json"
    tagged.write_text(json.dumps(content))
    run_bundle(
        "evaluating", EVALUATE, "--datalist", tagged,  # no network keys: the model's record gives them
        "--ckpt_dir", out / "models", "--output_dir", out / "runs", "--eval_dir", eval_dir,
    )
    with open(eval_dir / "val_mean_dice_raw.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(row["filename"]).name for row in rows] == ["demo_0000.png", "demo_0001.png"]
    per_image = [float(row["mean"]) for row in rows]
    assert all(0.0 <= value <= 1.0 for value in per_image)
    with open(eval_dir / "metrics.csv") as handle:
        summary = dict(csv.reader(handle))
    assert float(summary["val_mean_dice"]) == pytest.approx(np.mean(per_image), abs=1e-6)
    assert set(summary) >= {"val_mean_iou", "val_hd95", "val_asd", "val_object_f1", "val_object_dice", "val_object_hausdorff"}
    for name in ("val_object_f1", "val_object_dice"):
        with open(eval_dir / f"{name}_raw.csv") as handle:
            values = [float(row["mean"]) for row in csv.DictReader(handle)]
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)

    # the report: one row per image with its subset, a summary overall and per subset, one overlay per image
    with open(eval_dir / "per_image.csv") as handle:
        report = list(csv.DictReader(handle))
    assert [r["subset"] for r in report] == ["testA", "testB"]
    assert [float(r["val_mean_dice"]) for r in report] == pytest.approx(per_image, abs=1e-6)
    result = json.loads((eval_dir / "summary.json").read_text())
    assert result["overall"]["val_mean_dice"]["mean"] == pytest.approx(np.mean(per_image), abs=1e-6)
    assert result["by_subset"]["testB"]["val_mean_dice"]["mean"] == pytest.approx(per_image[1], abs=1e-6)
    assert result["by_subset"]["testA"]["val_mean_dice"]["std"] == 0.0
    overlay = np.asarray(Image.open(eval_dir / "overlays" / "demo_0000_overlay.png"))
    assert overlay.shape == (96, 128, 3)


def test_inference_masks_match_direct_sliding_window(trained, demo_data, tmp_path):
    from monai.inferers import SlidingWindowInferer

    from scripts.data import IMAGENET_MEAN_255, IMAGENET_STD_255

    out, _ = trained
    input_dir = Path(demo_data).parent / "test" / "images"
    mask_dir = tmp_path / "masks"
    # no network or window overrides: the model rebuilds the tiny network and the 32 x 32 window it records
    result = run_bundle(
        "inference", INFERENCE, "--input_dir", input_dir,
        "--ckpt_path", out / "models" / "model.pt", "--output_dir", mask_dir,
    )
    log = result.stdout + result.stderr
    assert "Segmented 2/2 images" in log
    assert "Network and window from" in log and "encoder_name='vit_tiny'" in log and "roi_size=[32, 32]" in log

    net = tiny_network().eval()
    net.load_state_dict(torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)["model"])
    inferer = SlidingWindowInferer(roi_size=(32, 32), sw_batch_size=4, overlap=0.25, mode="gaussian")
    for image_path in sorted(input_dir.glob("*.png")):
        rgb = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32)
        x = (torch.from_numpy(rgb).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN_255)[:, None, None]) / torch.tensor(
            IMAGENET_STD_255
        )[:, None, None]
        with torch.no_grad():
            probs = inferer(x[None], net).softmax(1)[0].numpy()
        expected = probs.argmax(0).astype(np.uint8) * 255
        mask = np.asarray(Image.open(mask_dir / f"{image_path.stem}_mask.png"))
        assert mask.shape == rgb.shape[:2]  # 96 x 128: orientation kept on a non-square image
        assert set(np.unique(mask)) <= {0, 255}
        # A barely trained tiny network has near-ties; compare where the decision is not a rounding matter.
        decisive = np.abs(probs[1] - probs[0]) > 1e-3
        assert decisive.mean() > 0.5
        assert (mask == expected)[decisive].all()


def test_model_records_its_network_and_refuses_contradicting_overrides(trained, demo_data, tmp_path):
    out, _ = trained
    record = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)["config"]
    assert record == {"num_classes": 2, "encoder_name": "vit_tiny", "encoder_kwargs": {"depth": 1}, "n_skip": 3,
                      "skip_channels": [16, 8, 8], "decoder_channels": [16, 16, 8, 8], "embed_dim": record["embed_dim"],
                      "hybrid": False, "roi_size": [32, 32], "image_scale": 1.0, "class_names": ["background", "gland"]}
    # evaluation: a chosen value that contradicts the record is refused, naming both
    result = run_bundle(
        "evaluating", EVALUATE, "--datalist", demo_data, "--encoder_name", "vit_tiny_reg_p14", "--roi_size", "[64,64]",
        "--ckpt_dir", out / "models", "--output_dir", tmp_path / "runs", "--eval_dir", tmp_path / "eval", check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (f"ERROR: Model '{out / 'models' / 'model.pt'}' was trained with encoder_name='vit_tiny', roi_size=[32, 32], "
            "but this run asks for encoder_name='vit_tiny_reg_p14', roi_size=[64, 64]. The model rebuilds its own "
            "network and window: drop --encoder_name, --roi_size") in result.stderr
    assert not (tmp_path / "eval").exists()
    # inference lists no network key: one on its command line is refused before anything runs
    result = run_bundle(
        "inference", INFERENCE, "--input_dir", Path(demo_data).parent / "test" / "images",
        "--encoder_name", "vit_tiny_reg_p14", "--ckpt_path", out / "models" / "model.pt",
        "--output_dir", tmp_path / "masks", check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert ("ERROR: --encoder_name: inference takes the network, window and class names from the trained model's "
            "record") in result.stderr and "--model_overrides \"{'encoder_name': ...}\"" in result.stderr
    assert not (tmp_path / "masks").exists()
    # ... and in model_overrides, a contradiction is refused by the same rule as evaluation
    result = run_bundle(
        "inference", INFERENCE, "--input_dir", Path(demo_data).parent / "test" / "images",
        "--model_overrides", "{'roi_size': [64, 64]}", "--ckpt_path", out / "models" / "model.pt",
        "--output_dir", tmp_path / "masks", check=False,
    )
    assert "was trained with roi_size=[32, 32], but this run asks for roi_size=[64, 64]" in result.stderr
    assert result.returncode != 0 and not (tmp_path / "masks").exists()


def test_fine_tuning_takes_the_network_and_window_from_init_weights(trained, demo_data, tmp_path):
    """--init_weights with train.json's defaults: the network and window are the trained model's (none of the
    tiny network's keys repeated), the fine-tuned model records them again, and its evaluation needs none either."""
    out, _ = trained
    start = out / "models" / "model.pt"
    result = run_bundle(
        "training", TRAIN, "--datalist", demo_data, "--init_weights", start, "--labeled_batch_size", 2,
        "--unlabeled_batch_size", 2, "--text_cfg", "{'layers': 1}", "--ckpt_dir", tmp_path / "models",
        "--output_dir", tmp_path / "runs", "--num_epochs", 1,
    )
    log = result.stdout + result.stderr
    assert f"Network initialised from {start}" in log and "encoder_name='vit_tiny'" in log
    before = torch.load(start, map_location="cpu", weights_only=True)["config"]
    after = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)["config"]
    assert after == before and after["roi_size"] == [32, 32]
    evaluated = run_bundle("evaluating", EVALUATE, "--datalist", demo_data, "--ckpt_dir", tmp_path / "models",
                           "--output_dir", tmp_path / "runs", "--eval_dir", tmp_path / "eval")
    assert evaluated.returncode == 0 and (tmp_path / "eval" / "summary.json").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--encoder_name", "vit_nonexistent"], "Unknown encoder name 'vit_nonexistent'"),
        (["--roi_size", "[40,40]"], "Config key 'roi_size' is [40, 40]; each side must be a positive multiple of the encoder patch size 16"),
        (["--datalist", "/nonexistent/datalist.json"], "Datalist '/nonexistent/datalist.json' does not exist"),
        (["--dataset_dir", "/nonexistent/folder"], "Dataset folder '/nonexistent/folder' does not exist"),
        (["--learning_rate", "0"], "Config key 'learning_rate' is 0; it must be a positive number, e.g. 0.01."),
        (["--labeled_batch_size", "9"], "Config key 'labeled_batch_size' is 9, more than the 4 images in the 'training' section"),
    ],
)
def test_bad_config_values_stop_with_one_line(demo_data, tmp_path, args, message):
    base = ["--datalist", demo_data, *TINY_TRAIN, "--ckpt_dir", tmp_path / "models", "--output_dir", tmp_path / "runs"]
    # later occurrences of a flag override earlier ones
    result = run_bundle("training", TRAIN, *base, *args, "--num_epochs", 1, check=False)
    assert result.returncode != 0
    assert f"ERROR: {message}" in result.stderr
    assert "Traceback" not in result.stderr


def test_weights_for_other_architecture_stop_with_one_line(demo_data, tmp_path):
    from scripts.networks import build_encoder

    weights = tmp_path / "uni2h_like.bin"
    torch.save(build_encoder("vit_tiny_reg_p14", depth=1).state_dict(), weights)
    result = run_bundle(
        "training", TRAIN, "--datalist", demo_data, *TINY_TRAIN, "--encoder_weights", weights,
        "--ckpt_dir", tmp_path / "models", "--output_dir", tmp_path / "runs", check=False,
    )
    assert result.returncode != 0
    assert f"ERROR: Weights file '{weights}' does not fit encoder preset 'vit_tiny'" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluation_scores_the_weights_it_loads_even_with_weight_averaging(trained, demo_data):
    """evaluate.json reuses train.json's evaluator; with ema_decay that evaluator would score the training-time
    average, a fresh copy of the untrained network, instead of the network model.pt is loaded into."""
    from monai.bundle import ConfigParser

    out, _ = trained
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    settings = {"datalist": str(demo_data), "ckpt_dir": str(out / "models"), "output_dir": str(out / "runs"),
                "ema_decay": 0.9, "encoder_name": "vit_tiny", "encoder_kwargs": {"depth": 1},
                "skip_channels": [16, 8, 8], "decoder_channels": [16, 16, 8, 8], "roi_size": [32, 32]}
    for key, value in settings.items():
        parser[key] = value
    evaluator = parser.get_parsed_content("validate#evaluator")
    network = parser.get_parsed_content("network")
    assert evaluator.network is network
    loader = next(h for h in parser.get_parsed_content("validate#handlers") if hasattr(h, "network"))
    assert loader.network is network
