"""The MONAI Label app against a real server: a ``monailabel start_server`` process on a free 127.0.0.1 port.

The datastore holds generated demo tiles and a small generated pyramidal slide; the served model is a tiny network
trained for a few iterations by the bundle itself. The server is stopped by its process group in every case.
"""

import io
import json
import shutil
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("monailabel", reason="the MONAI Label app needs requirements-monailabel.txt (README test command)")
requests = pytest.importorskip("requests")

from scripts.monailabel.annotations import mask_polygons, read_label_mask  # noqa: E402
from scripts.monailabel.infer import GlandPipeline  # noqa: E402
from scripts.monailabel.server import running_server  # noqa: E402
from scripts.networks import RECORD_KEYS  # noqa: E402
from scripts.wsi.slide import open_slide  # noqa: E402
from scripts.wsi.synthetic import write_synthetic_slide  # noqa: E402
from scripts.wsi.tissue import tissue_mask  # noqa: E402
from tests.helpers import REPO, run_python  # noqa: E402

BUNDLE = REPO / "bundle"
TINY = {"encoder_name": "vit_tiny", "encoder_kwargs": {"depth": 1}, "skip_channels": [16, 8, 8],
        "decoder_channels": [16, 16, 8, 8], "embed_dim": 32, "roi_size": [32, 32], "labeled_batch_size": 2,
        "unlabeled_batch_size": 2, "text_cfg": {"layers": 1}, "pixels_per_class": 32}


def _train_served_model(demo_data, folder: Path) -> Path:
    args = ["-m", "monai.bundle", "run", "training", "--config_file", str(BUNDLE / "configs" / "train.json"),
            "--bundle_root", str(BUNDLE), "--datalist", str(demo_data), "--ckpt_dir", str(folder / "models"),
            "--output_dir", str(folder / "runs"), "--method", "supervised", "--num_epochs", "4"]
    for key, value in TINY.items():
        args += [f"--{key}", json.dumps(value)]
    result = run_python(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "models" / "model.pt"


@pytest.fixture(scope="module")
def server(demo_data, tmp_path_factory):
    """A running server: (base URL, studies folder, served model path, demo datalist, log path)."""
    root = tmp_path_factory.mktemp("monailabel")
    model = _train_served_model(demo_data, root / "first")
    served = root / "served" / "model.pt"
    served.parent.mkdir()
    shutil.copyfile(model, served)
    studies = root / "studies"
    studies.mkdir()
    datalist = json.loads(Path(demo_data).read_text())
    base = Path(demo_data).parent
    tiles = [*datalist["training"], *datalist["unlabeled"]]
    for index, entry in enumerate(tiles):
        shutil.copyfile(base / entry["image"], studies / f"tile{index}.png")
    write_synthetic_slide(studies / "slide.tif", 768, 1024, tile=256, seed=1)
    # no network key: fine-tuning takes the served model's network and window from its record
    overrides = {key: value for key, value in TINY.items() if key not in RECORD_KEYS}
    conf = {"model_path": str(served), "train_overrides": {**overrides, "num_epochs": 2}, "device": "cpu"}
    log = root / "server.log"
    try:
        with running_server(studies, conf, log) as running:
            yield {"url": running["url"], "studies": studies, "model": served, "demo": (base, datalist, tiles),
                   "log": log}
    except RuntimeError as err:
        pytest.fail(str(err))


def _pipeline(model: Path) -> GlandPipeline:
    return GlandPipeline(BUNDLE, model, "cpu")


def test_info_lists_the_gland_model_for_qupath(server):
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    model = info["models"]["gland"]
    assert model["type"] == "segmentation" and model["labels"] == {"gland": 1}
    assert set(info["trainers"]) == {"gland"} and set(info["strategies"]) == {"entropy", "random"}
    assert set(info["scoring"]) == {"entropy"}


def test_infer_on_a_stored_tile_and_an_upload_equals_the_bundle_pipeline(server):
    expected = _pipeline(server["model"]).segment(server["studies"] / "tile0.png")
    stored = requests.post(f"{server['url']}/infer/gland", params={"image": "tile0", "output": "image"}, timeout=120)
    assert stored.status_code == 200, stored.text
    mask = np.asarray(Image.open(io.BytesIO(stored.content)))
    assert mask.shape == expected.shape and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask > 0, expected > 0)

    data = (server["studies"] / "tile1.png").read_bytes()
    uploaded = requests.post(f"{server['url']}/infer/gland", params={"output": "json"},
                             files={"file": ("upload.png", data, "image/png")}, timeout=120)
    assert uploaded.status_code == 200, uploaded.text
    result = uploaded.json()
    expected = _pipeline(server["model"]).segment(server["studies"] / "tile1.png")
    polygons = result["annotation"]["elements"][0]["contours"] if result["annotation"]["elements"] else []
    assert polygons == mask_polygons(expected)


def test_slide_region_polygons_sit_at_the_region_offset(server):
    location, size = [256, 128], [512, 384]
    wsi = {"location": location, "size": size, "level": 0, "tile_size": [256, 256], "min_poly_area": 0}
    with open_slide(server["studies"] / "slide.tif") as slide:
        region = slide.read(0, location[1], location[0], size[1], size[0])
    mask = _pipeline(server["model"]).segment(region)
    tissue, _ = tissue_mask(region[::8, ::8])
    mask = mask * tissue.repeat(8, 0).repeat(8, 1)[:size[1], :size[0]]
    expected = mask_polygons(mask, offset=location)
    assert expected, "the served model finds no gland in the test region; the offset check would be empty"

    asap = requests.post(f"{server['url']}/infer/wsi_v2/gland", params={"image": "slide", "output": "asap"},
                         data={"wsi": json.dumps(wsi)}, timeout=300)
    assert asap.status_code == 200, asap.text
    root = ElementTree.fromstring(asap.content)
    polygons = [[[int(float(c.get("X"))), int(float(c.get("Y")))] for c in a.iter("Coordinate")]
                for a in root.iter("Annotation")]
    assert sorted(polygons) == sorted(expected)
    xs = [p[0] for polygon in polygons for p in polygon]
    ys = [p[1] for polygon in polygons for p in polygon]
    assert location[0] <= min(xs) and max(xs) <= location[0] + size[0]
    assert location[1] <= min(ys) and max(ys) <= location[1] + size[1]

    dsa = requests.post(f"{server['url']}/infer/wsi_v2/gland", params={"image": "slide", "output": "dsa"},
                        data={"wsi": json.dumps(wsi)}, timeout=300)
    assert dsa.status_code == 200, dsa.text
    elements = dsa.json()["elements"]
    assert sorted([[p[0], p[1]] for p in e["points"]] for e in elements) == sorted(expected)
    assert all(p[2] == 0 for e in elements for p in e["points"])


def test_bad_requests_get_a_4xx_with_a_reason_and_the_server_stays_up(server):
    url = server["url"]
    unknown = requests.post(f"{url}/infer/nuclei", params={"image": "tile0", "output": "json"}, timeout=30)
    assert unknown.status_code == 404 and "Unknown model 'nuclei'" in unknown.json()["detail"]
    missing = requests.post(f"{url}/infer/gland", params={"image": "no_such_tile", "output": "json"}, timeout=30)
    assert missing.status_code == 404 and "no_such_tile" in missing.json()["detail"]
    garbage = requests.post(f"{url}/infer/gland", params={"output": "json"},
                            files={"file": ("broken.png", b"not an image", "image/png")}, timeout=30)
    assert garbage.status_code == 400 and "cannot be read" in garbage.json()["detail"]
    wrong = io.BytesIO()
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(wrong, format="PNG")
    label = requests.put(f"{url}/datastore/label", params={"image": "tile2", "tag": "final"},
                         files={"label": ("tile2.png", wrong.getvalue(), "image/png")}, timeout=30)
    assert label.status_code == 422 and "10 x 10" in label.json()["detail"]
    assert not (server["studies"] / "labels" / "final" / "tile2.png").exists()
    strategy = requests.post(f"{url}/activelearning/nonsense", timeout=30)
    assert strategy.status_code == 404 and "entropy" in strategy.json()["detail"]
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200


def test_active_learning_picks_the_least_certain_unlabeled_tile(server):
    url = server["url"]
    scored = requests.post(f"{url}/scoring/entropy", params={"run_sync": True}, timeout=300)
    assert scored.status_code == 200, scored.text
    pipeline = _pipeline(server["model"])
    labelled = {p.stem for p in (server["studies"] / "labels" / "final").glob("*")} if (
        server["studies"] / "labels" / "final").exists() else set()
    candidates = [p for p in sorted(server["studies"].glob("tile*.png")) if p.stem not in labelled]
    entropies = {}
    for path in candidates:
        p = pipeline.probabilities(path, tta=True).clamp_min(1e-8)
        entropies[path.stem] = float(-(p * p.log2()).sum(0).mean())
    pick = requests.post(f"{url}/activelearning/entropy", timeout=300)
    assert pick.status_code == 200, pick.text
    chosen = pick.json()
    assert chosen["id"] == max(entropies, key=entropies.get)
    assert chosen["entropy"] == pytest.approx(entropies[chosen["id"]], rel=1e-4)
    info = requests.get(f"{url}/datastore/image/info", params={"image": chosen["id"]}, timeout=30).json()
    assert info["gland_entropy"] == pytest.approx(chosen["entropy"], rel=1e-6)
    random_pick = requests.post(f"{url}/activelearning/random", timeout=30).json()
    assert random_pick["id"] in {p.stem for p in server["studies"].glob("*.png")} | {"slide"}


def test_labels_then_train_publish_a_model_that_infer_then_uses(server):
    url = server["url"]
    base, datalist, tiles = server["demo"]
    # Labels for the first two tiles: one as a mask, one as QuPath's ASAP XML polygons of the same mask.
    mask0 = np.asarray(Image.open(base / tiles[0]["label"]))
    put = requests.put(f"{url}/datastore/label", params={"image": "tile0", "tag": "final"},
                       files={"label": ("tile0.png", (base / tiles[0]["label"]).read_bytes(), "image/png")}, timeout=30)
    assert put.status_code == 200, put.text
    mask1 = np.asarray(Image.open(base / tiles[1]["label"])) > 0
    xml = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "<Annotations>"]
    for polygon in mask_polygons(mask1):
        xml.append('<Annotation Name="gland" Type="Polygon" PartOfGroup="gland"><Coordinates>')
        xml += [f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in enumerate(polygon)]
        xml.append("</Coordinates></Annotation>")
    xml += ["</Annotations>", "</ASAP_Annotations>"]
    put = requests.put(f"{url}/datastore/label", params={"image": "tile1", "tag": "final"},
                       files={"label": ("tile1.xml", "\n".join(xml).encode(), "application/xml")}, timeout=30)
    assert put.status_code == 200, put.text
    # A new tile uploaded to the datastore, then labelled.
    extra = datalist["validation"][0]
    added = requests.put(f"{url}/datastore/image", params={"image": "uploaded"},
                         files={"file": ("uploaded.png", (base / extra["image"]).read_bytes(), "image/png")}, timeout=30)
    assert added.status_code == 200 and added.json()["image"] == "uploaded", added.text
    put = requests.put(f"{url}/datastore/label", params={"image": "uploaded", "tag": "final"},
                       files={"label": ("uploaded.png", (base / extra["label"]).read_bytes(), "image/png")}, timeout=30)
    assert put.status_code == 200, put.text
    rasterised = read_label_mask(server["studies"] / "labels" / "final" / "tile1.xml", *mask1.shape)
    assert (rasterised.astype(bool) != mask1).mean() < 0.05  # polygon outlines of the same glands
    assert (mask0 > 0).any()

    before = server["model"].read_bytes()
    old_model = server["model"].with_name("before_training.pt")
    old_model.write_bytes(before)
    # As QuPath does: start training (a task process of its own), then poll its status.
    started = requests.post(f"{url}/train/gland", json={"num_epochs": 2, "method": "mpamatch"}, timeout=60)
    assert started.status_code == 200, started.text
    deadline = time.time() + 900
    while True:
        status = requests.get(f"{url}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR") or time.time() > deadline:
            break
        time.sleep(2)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))[-3000:]
    assert any("Training finished after" in line for line in status.get("details", [])), status
    after = server["model"].read_bytes()
    assert after != before, "training did not publish a new model"
    stats = requests.get(f"{url}/info/", timeout=30).json()["train_stats"]["gland"]
    assert stats["method"] == "mpamatch" and (stats["labelled"], stats["validation"]) == (2, 1)
    assert stats["unlabeled"] == len(tiles) - 2 and stats["skipped"] == 1  # the slide is not trained on
    run_log = (Path(stats["run_dir"]) / "train.log").read_text()
    assert f"Network initialised from {server['model']}" in run_log  # fine-tuned from the served model
    state = torch.load(server["model"], map_location="cpu", weights_only=True)
    assert state["config"] == torch.load(old_model, map_location="cpu", weights_only=True)["config"]
    assert state["config"]["encoder_name"] == "vit_tiny" and state["config"]["roi_size"] == [32, 32]

    # The server reloads the published weights: its suggestion is the new model's, not the old one's.
    new = _pipeline(server["model"]).probabilities(server["studies"] / "tile3.png")
    old = _pipeline(old_model).probabilities(server["studies"] / "tile3.png")
    assert not torch.allclose(new, old)
    result = requests.post(f"{url}/infer/gland", params={"image": "tile3", "output": "image"}, timeout=120)
    assert result.status_code == 200, result.text
    expected = _pipeline(server["model"]).segment(server["studies"] / "tile3.png")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(result.content))) > 0, expected > 0)


# --------------------------------------------------------------------------------------- in-process pieces
def test_one_label_trains_and_validates_on_separate_files_the_datalist_check_accepts(demo_data, tmp_path):
    from monailabel.datastore.local import LocalDatastore

    from scripts.data import checked_datalist
    from scripts.monailabel.train import build_datalist

    base = Path(demo_data).parent
    datalist = json.loads(Path(demo_data).read_text())
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for index, entry in enumerate(datalist["training"][:3]):
        shutil.copyfile(base / entry["image"], studies / f"tile{index}.png")
    shutil.copyfile(base / datalist["training"][0]["label"], studies / "labels" / "final" / "tile0.png")
    data = build_datalist(LocalDatastore(str(studies), extensions=["*.png"], auto_reload=False), tmp_path / "run")
    assert len(data["training"]) == len(data["validation"]) == 1 and len(data["unlabeled"]) == 2
    assert data["training"][0]["image"] != data["validation"][0]["image"]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({k: data[k] for k in ("training", "validation", "unlabeled")}))
    checked = checked_datalist(str(path), str(tmp_path), ["training", "unlabeled", "validation"], 2, True, False)
    assert len(checked["validation"]) == 1


def test_a_mask_label_with_alpha_reads_its_grey_band_not_the_alpha(tmp_path):
    grey = np.zeros((6, 8), dtype=np.uint8)
    grey[2:4, 3:6] = 255
    path = tmp_path / "label.png"
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), mode="LA").save(path)
    np.testing.assert_array_equal(read_label_mask(path, 6, 8), (grey > 0).astype(np.uint8))
