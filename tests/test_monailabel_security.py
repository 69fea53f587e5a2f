"""The MONAI Label server against hostile clients: a real ``monailabel start_server`` on a free 127.0.0.1 port.

Each attack of docs/security.md is sent as a request. The tests assert the refusal and its reason, that nothing was
written, read or removed outside the datastore, that no code ran (a marker file that must not appear), that a final
label is unchanged, and that the server still answers afterwards. No trained model is served: every check must
happen before a model would be used. Request counts are bounded and every request has a timeout.
"""

import asyncio
import io
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("monailabel", reason="the MONAI Label app needs requirements-monailabel.txt (README test command)")
requests = pytest.importorskip("requests")

from scripts.monailabel import guard  # noqa: E402
from scripts.monailabel.activelearning import _stored_score  # noqa: E402
from scripts.monailabel.annotations import LabelError, read_asap_polygons, read_label_mask  # noqa: E402
from scripts.monailabel.server import running_server  # noqa: E402
from scripts.monailabel.train import GlandTrainTask  # noqa: E402
from tests.helpers import REPO  # noqa: E402

TIMEOUT = 60


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _declared_png(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` pixels (its data would decode to far more)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * width) * 64, 9)  # the first rows only: enough to look like an image
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server over three generated tiles (one with a final label) and no trained model."""
    root = tmp_path_factory.mktemp("hostile")
    studies = root / "lab" / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(studies / f"tile{index}.png")
    final = np.zeros((64, 64), np.uint8)
    final[10:30, 10:30] = 255
    (studies / "labels" / "final" / "tile0.png").write_bytes(_png(final))
    secret = root / "secret.png"  # an image of the server outside the datastore
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(secret)
    served = root / "served" / "model.pt"
    served.parent.mkdir()
    conf = {"model_path": str(served), "device": "cpu", "max_upload_mb": 1}
    log = root / "server.log"
    try:
        with running_server(studies, conf, log) as running:
            yield {"url": running["url"], "root": root, "studies": studies, "secret": secret, "log": log,
                   "work_dir": served.parent / "monailabel"}
    except RuntimeError as err:
        pytest.fail(str(err))


def _upload_dir(server) -> Path:
    for line in server["log"].read_text().splitlines():
        if "Uploads are handled in the private folder " in line:
            return Path(line.split("Uploads are handled in the private folder ")[-1].strip())
    raise AssertionError("the server did not say where it keeps uploads")


def _still_up(server):
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200


def test_client_strings_never_reach_a_config_and_no_code_runs(server):
    url, marker = server["url"], server["root"] / "marker"
    payload = f"$__import__('pathlib').Path({str(marker)!r}).write_text('ran')"
    for body in ({"method": payload}, {"seed": payload}, {"num_epochs": "@method"}, {"datalist": "/etc"},
                 {"method": "mpamatch", "ckpt_dir": "%train.json#ckpt_dir"}):
        answer = requests.post(f"{url}/train/gland", json=body, timeout=TIMEOUT)
        assert answer.status_code == 422, (body, answer.text)
        assert next(iter(body)) in answer.json()["detail"]
    every_model = requests.post(f"{url}/train/", json={"gland": {"method": payload}}, timeout=TIMEOUT)
    assert every_model.status_code == 422 and "method" in every_model.json()["detail"]
    sync = requests.post(f"{url}/train/gland", params={"run_sync": "true"}, json={}, timeout=TIMEOUT)
    assert sync.status_code == 422 and "run_sync" in sync.json()["detail"]
    scoring = requests.post(f"{url}/scoring/entropy", json={"method": payload}, timeout=TIMEOUT)
    assert scoring.status_code == 422
    assert not marker.exists()
    assert not server["work_dir"].exists() or not list(server["work_dir"].glob("run_*"))  # nothing was started
    status = requests.get(f"{url}/train/", timeout=TIMEOUT)
    assert status.status_code == 404  # MONAI Label: no training task has run
    _still_up(server)


def test_ids_and_tags_cannot_leave_the_studies_folder(server):
    url, studies, root = server["url"], server["studies"], server["root"]
    before_root = sorted(p.name for p in root.iterdir())
    before = _snapshot(studies)
    tile = _png(np.full((64, 64, 3), 120, np.uint8))
    attacks = [
        ("put", "/datastore/image", {"image": "../../escape"}, {"file": ("escape.png", tile, "image/png")}),
        ("put", "/datastore/image", {"image": ".hidden"}, {"file": ("x.png", tile, "image/png")}),
        ("put", "/datastore/image", {}, {"file": (".profile.png", tile, "image/png")}),
        ("put", "/datastore/image", {"image": "script"}, {"file": ("script.py", b"print('x')", "text/plain")}),
        ("put", "/datastore/label", {"image": "tile1", "tag": "../.."}, {"label": ("l.png", tile, "image/png")}),
        ("put", "/datastore/label", {"image": "../tile1", "tag": "final"}, {"label": ("l.png", tile, "image/png")}),
        ("delete", "/datastore/image", {"id": "../studies"}, None),
        ("delete", "/datastore/label", {"id": "tile0", "tag": "../../.."}, None),
        ("delete", "/datastore/label", {"id": "tile0", "tag": ".."}, None),
    ]
    for verb, path, params, files in attacks:
        answer = getattr(requests, verb)(f"{url}{path}", params=params, files=files, timeout=TIMEOUT)
        assert answer.status_code in (404, 422), (path, params, answer.status_code, answer.text)
        assert answer.json()["detail"], answer.text
    assert sorted(p.name for p in root.iterdir()) == before_root
    assert not list(root.parent.glob("escape*")) and not list(root.glob("escape*"))
    assert _snapshot(studies) == before
    assert not list(_upload_dir(server).iterdir())  # refused uploads are removed too
    _still_up(server)


def test_infer_reads_only_datastore_images_or_its_own_upload(server):
    url, secret = server["url"], server["secret"]
    refused = []
    for image in (str(secret), str(secret.parent / "does_not_exist.png"), "../secret", "/etc/passwd"):
        for path in ("/infer/gland", "/infer/wsi_v2/gland"):
            answer = requests.post(f"{url}{path}", params={"image": image, "output": "json"}, timeout=TIMEOUT)
            refused.append((answer.status_code, answer.json()["detail"].replace(image, "<image>")))
    # The same answer whether the path exists or not: nothing about the server's files is told.
    assert {code for code, _ in refused} == {404} and len({detail for _, detail in refused[:4]}) <= 2
    # A path in the request's params instead of the upload it sent: also refused.
    upload = _png(np.full((32, 32, 3), 200, np.uint8))
    swapped = requests.post(f"{url}/infer/gland", params={"output": "json"},
                            data={"params": json.dumps({"image": str(secret)})},
                            files={"file": ("tile.png", upload, "image/png")}, timeout=TIMEOUT)
    assert swapped.status_code == 404 and swapped.json()["detail"].replace(str(secret), "<image>") == refused[0][1]
    # That request no longer names its upload; the sweep of uploads left by refused requests removes it.
    assert len(list(_upload_dir(server).iterdir())) == 1
    assert guard.sweep_uploads.__defaults__ == (300.0,)
    for leftover in _upload_dir(server).iterdir():
        os.utime(leftover, (0, 0))
    # A datastore id passes the checks and meets the missing model (409), the same for this request's own upload.
    known = requests.post(f"{url}/infer/gland", params={"image": "tile1", "output": "json"}, timeout=TIMEOUT)
    own = requests.post(f"{url}/infer/gland", params={"output": "json"},
                        files={"file": ("tile.png", upload, "image/png")}, timeout=TIMEOUT)
    assert known.status_code == own.status_code == 409, (known.text, own.text)
    assert not list(_upload_dir(server).iterdir())
    _still_up(server)


def test_infer_never_saves_a_label_over_an_annotators_work(server):
    url = server["url"]
    final = server["studies"] / "labels" / "final" / "tile0.png"
    before = final.read_bytes()
    for params in ({"save_label": True, "label_tag": "final"}, {"save_label": "true"}):
        answer = requests.post(f"{url}/infer/gland", params={"image": "tile0", "output": "json"},
                               data={"params": json.dumps(params)}, timeout=TIMEOUT)
        assert answer.status_code == 422 and "save_label" in answer.json()["detail"]
    batch = requests.post(f"{url}/batch/infer/gland", json={"label_tag": "final"}, timeout=TIMEOUT)
    assert batch.status_code == 403
    # Replacing an image that has a final label would leave the label describing another image.
    replaced = requests.put(f"{url}/datastore/image", params={"image": "tile0"},
                            files={"file": ("tile0.png", _png(np.zeros((64, 64, 3), np.uint8)), "image/png")},
                            timeout=TIMEOUT)
    assert replaced.status_code == 409
    assert final.read_bytes() == before
    _still_up(server)


def test_a_huge_image_is_refused_from_its_header_and_the_server_stays_up(server):
    url = server["url"]
    bomb = _declared_png(13000, 13000)
    assert len(bomb) < 200_000
    infer = requests.post(f"{url}/infer/gland", params={"output": "json"},
                          files={"file": ("bomb.png", bomb, "image/png")}, timeout=TIMEOUT)
    assert infer.status_code == 413 and "169000000 pixels" in infer.json()["detail"]
    assert "max_image_pixels" in infer.json()["detail"]
    added = requests.put(f"{url}/datastore/image", params={"image": "bomb"},
                         files={"file": ("bomb.png", bomb, "image/png")}, timeout=TIMEOUT)
    assert added.status_code == 413 and not (server["studies"] / "bomb.png").exists()
    label = requests.put(f"{url}/datastore/label", params={"image": "tile2", "tag": "final"},
                         files={"label": ("tile2.png", bomb, "image/png")}, timeout=TIMEOUT)
    assert label.status_code == 413 and "169000000 pixels" in label.json()["detail"]
    # A request body over --conf max_upload_mb (1 MiB here) is refused from its length, and nothing is stored.
    big = requests.put(f"{url}/datastore/image", params={"image": "big"},
                       files={"file": ("big.png", b"\0" * (2 * 2**20), "image/png")}, timeout=TIMEOUT)
    assert big.status_code == 413 and "max_upload_mb" in big.json()["detail"]
    assert not (server["studies"] / "big.png").exists()
    assert not list(_upload_dir(server).iterdir())
    _still_up(server)


def test_scores_info_and_xml_labels_are_checked(server):
    url, studies = server["url"], server["studies"]
    bad_score = requests.put(f"{url}/datastore/image/info", params={"image": "tile1"},
                             data={"info": json.dumps({"gland_entropy": "high"})}, timeout=TIMEOUT)
    assert bad_score.status_code == 422 and "gland_entropy" in bad_score.json()["detail"]
    reserved = requests.put(f"{url}/datastore/image/info", params={"image": "tile1"},
                            data={"info": json.dumps({"name": "../../secret.png"})}, timeout=TIMEOUT)
    assert reserved.status_code == 422
    info = requests.get(f"{url}/datastore/image/info", params={"image": "tile1"}, timeout=TIMEOUT).json()
    assert "gland_entropy" not in info and info["name"] == "tile1.png"
    nan = ('<ASAP_Annotations><Annotations><Annotation Name="g" PartOfGroup="gland"><Coordinates>'
           '<Coordinate Order="0" X="nan" Y="1"/><Coordinate Order="1" X="10" Y="1"/>'
           '<Coordinate Order="2" X="10" Y="10"/></Coordinates></Annotation></Annotations></ASAP_Annotations>')
    laughs = ('<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
              ']><ASAP_Annotations>&b;</ASAP_Annotations>')
    for name, text in (("nan.xml", nan), ("laughs.xml", laughs)):
        answer = requests.put(f"{url}/datastore/label", params={"image": "tile2", "tag": "final"},
                              files={"label": (name, text.encode(), "application/xml")}, timeout=TIMEOUT)
        assert answer.status_code == 422, answer.text
    assert not (studies / "labels" / "final" / "tile2.xml").exists()
    assert requests.post(f"{url}/activelearning/random", timeout=TIMEOUT).status_code == 200
    for verb, path in (("put", "/model/gland"), ("delete", "/model/gland"), ("put", "/session/"),
                       ("get", "/proxy/dicom/qido/studies")):
        answer = getattr(requests, verb)(f"{url}{path}", timeout=TIMEOUT)
        assert answer.status_code in (403, 404) and answer.json()["detail"], (path, answer.text)
    _still_up(server)


# --------------------------------------------------------------------------------------- in-process pieces
def test_names_and_training_options_are_checked_before_use():
    for good in ("tile0", "TCGA-A6-2671-01Z-00-DX1.d460f7b8", "case 12 (HE)", "Schnitt_ä"):
        assert guard.check_name(good, "image") == good
    for bad in ("", ".hidden", "../x", "a/b", "a\\b", "..", "x" * 201, None, 3, "a\nb"):
        with pytest.raises(guard.RequestRefused) as refused:
            guard.check_name(bad, "image")
        assert refused.value.status_code == 422 and "'image'" in refused.value.detail
    checked = guard.checked_train_request({"model": "gland", "method": "unimatch", "seed": "3", "finetune": "false",
                                           "num_epochs": 2.0, "validation_fraction": 0.25, "gpus": "all"})
    assert checked == {"model": "gland", "method": "unimatch", "seed": 3, "finetune": False, "num_epochs": 2,
                       "validation_fraction": 0.25, "gpus": "all"}
    for bad in ({"method": "$print(1)"}, {"seed": "$x"}, {"seed": 1.5}, {"num_iterations": float("nan")},
                {"finetune": "maybe"}, {"validation_fraction": 2}, {"learning_rate": 1}, {"seed": True},
                {"gpus": "0; rm -rf /"}):
        with pytest.raises(guard.RequestRefused):
            guard.checked_train_request(bad)


def test_a_second_training_request_is_answered_409_while_one_runs(monkeypatch):
    calls = []

    async def app(scope, receive, send):
        calls.append(await receive())

    async def post(body: bytes, query: bytes = b""):
        sent = []
        scope = {"type": "http", "method": "POST", "path": "/train/gland", "query_string": query,
                 "headers": [(b"content-length", str(len(body)).encode())]}

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        await guard.RequestGuard(app, max_body_bytes=10_000)(scope, receive, send)
        return sent

    monkeypatch.setattr(guard, "_training_running", lambda: False)
    assert asyncio.run(post(b'{"num_epochs": 1}')) == [] and calls[-1]["body"] == b'{"num_epochs": 1}'
    monkeypatch.setattr(guard, "_training_running", lambda: True)
    sent = asyncio.run(post(b'{"num_epochs": 1}'))
    assert sent[0]["status"] == 409 and b"already running" in sent[1]["body"]
    assert asyncio.run(post(b"x" * 20_000))[0]["status"] == 413
    assert len(calls) == 1


def test_training_runs_get_unique_folders_and_only_the_newest_are_kept(tmp_path):
    task = GlandTrainTask(REPO / "bundle", tmp_path / "model.pt", work_dir=tmp_path / "work", keep_runs=2)
    (tmp_path / "work").mkdir()
    runs = []
    for index in range(4):
        run = Path(tempfile.mkdtemp(prefix="run_20260101_000000_", dir=tmp_path / "work"))
        os.utime(run, (1000 + index, 1000 + index))
        runs.append(run)
    assert len(set(runs)) == 4  # the same second, four folders
    task._remove_old_runs(keep=runs[0])
    assert sorted(p for p in (tmp_path / "work").iterdir()) == sorted([runs[0], runs[3]])


def test_label_files_are_read_within_their_caps(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(_declared_png(13000, 13000))
    with pytest.raises(LabelError, match="13000 x 13000"):
        read_label_mask(huge, 64, 64)  # compared from the header: never decoded
    with pytest.raises(LabelError, match="more than"):
        read_label_mask(huge, 13000, 13000, max_pixels=8192 * 8192)
    entities = tmp_path / "entities.xml"
    entities.write_text('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>')
    with pytest.raises(LabelError, match="not readable ASAP XML"):
        read_asap_polygons(entities)
    assert _stored_score("high") is None and _stored_score(float("nan")) is None and _stored_score("0.5") == 0.5
