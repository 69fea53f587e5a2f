"""Bad inputs, tried in bulk: a generated corpus of broken and unusual files through every entry point that reads
images — ``prepare folder``, the datalist check before training, evaluation, folder inference and the ONNX
application. Each broken file must get a named error (the file, what is wrong, what to do; on the command line one
``ERROR:`` message and no traceback) and each unusual mode a documented conversion, and the valid images beside
them must still get their output wherever the entry point skips bad files.

docs/reliability.md ("Bad inputs") quotes ``CORPUS`` and ``KINDS_PER_ENTRY_POINT``.
"""

import csv
import io
import json
import logging
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.data import checked_datalist
from scripts.data.adapters import folder_datalist
from scripts.errors import ConfigError
from tests.helpers import NET_ARGS, run_python, save_tiny_model, tiny_network, tiny_record, without_root_file_access

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "bundle" / "configs"
EVALUATE = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']"
TINY_NET = [*NET_ARGS, "--roi_size", "[32,32]"]
SIZE = (40, 48)  # rows, columns of every image
# File permissions apply to this module's code and subprocesses even under root (CI runs as root): a file of mode
# 000 is unreadable everywhere but where capabilities cannot be lowered (not Linux), where that case is skipped.
with without_root_file_access() as PERMISSIONS_APPLY:
    pass

# (kind, file name, outcome): the outcome is the fragment every entry point's error names the file with, or
# "converted" for a mode that is converted to RGB. Mask kinds put a sound image beside a broken mask.
CORPUS = [
    ("truncated PNG", "truncated_png.png", "truncated or damaged"),
    ("truncated JPEG", "truncated_jpeg.jpg", "truncated or damaged"),
    ("truncated TIFF", "truncated_tiff.tif", "truncated or damaged"),
    ("zero-byte file", "empty.png", "the file is empty (0 bytes)"),
    ("text saved as .png", "text.png", "not an image in a format PIL knows"),
    ("PNG declaring 100000 x 100000 pixels", "bomb.png", "decompression bomb"),
    ("unreadable file (mode 000)", "unreadable.png", "permission denied"),
    ("symbolic link to itself", "loop.png", "symbolic link loop"),
    ("32-bit float TIFF", "float32.tif", "PIL mode 'F'"),
    ("16-bit grey PNG", "grey16.png", "converted"),
    ("CMYK JPEG", "cmyk.jpg", "converted"),
    ("palette PNG", "palette.png", "converted"),
    ("RGBA PNG", "rgba.png", "converted"),
    ("grey + alpha PNG", "grey_alpha.png", "converted"),
    ("mask of another size than its image", "mask_size.png", "a mask must have its image's size"),
    ("mask values outside the classes", "mask_values.png", "outside the class indices"),
]
MASK_KINDS = ("mask_size.png", "mask_values.png")
VALID = ("valid_a.png", "valid_b.jpg")
# Sound images read as these (RGB) have the masks of their converted originals.
TWINS = {name: f"{Path(name).stem}_rgb.png" for _, name, outcome in CORPUS if outcome == "converted"}

BROKEN_IMAGES = [c for c in CORPUS if c[2] != "converted" and c[1] not in MASK_KINDS]
CONVERTED = [c for c in CORPUS if c[2] == "converted"]
MASKS = [c for c in CORPUS if c[1] in MASK_KINDS]
# Masks are not read by inference; binary tasks take any value > 0 as foreground, so "mask values outside the
# classes" is an error only for multi-class tasks (the datalist check and evaluation are tried with 3 classes).
KINDS_PER_ENTRY_POINT = {
    "prepare folder": BROKEN_IMAGES + CONVERTED + MASKS,
    "datalist check": BROKEN_IMAGES + CONVERTED + MASKS,
    "evaluation": BROKEN_IMAGES + CONVERTED + MASKS,
    "folder inference": BROKEN_IMAGES + CONVERTED,
    "ONNX application": BROKEN_IMAGES + CONVERTED,
}


def _params(cases):
    return [pytest.param(name, outcome, id=name) for _, name, outcome in cases]


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels and holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def write_corpus(root: Path) -> Path:
    """Writes ``root/images`` (the corpus, the valid images and the RGB twins of the converted ones) and
    ``root/masks`` (a 0 / 1 mask per image, same stem); the same files every time. The unreadable file is left out
    when running as root, who can read it anyway."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(0)

    def rgb() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8))

    for name in VALID + MASK_KINDS:
        rgb().save(images / name)
    source = rgb()
    for fmt, name in (("PNG", "truncated_png.png"), ("JPEG", "truncated_jpeg.jpg"), ("TIFF", "truncated_tiff.tif")):
        data = _encoded(source, fmt)
        (images / name).write_bytes(data[: len(data) // 2])
    (images / "empty.png").write_bytes(b"")
    (images / "text.png").write_text("sample id,stain\n1,H&E\n")
    (images / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    if PERMISSIONS_APPLY:
        rgb().save(images / "unreadable.png")
        os.chmod(images / "unreadable.png", 0)
    os.symlink("loop.png", images / "loop.png")
    Image.fromarray(rng.random(SIZE, dtype=np.float32)).save(images / "float32.tif")

    grey16 = rng.integers(0, 65536, SIZE, dtype=np.uint16)
    Image.fromarray(grey16).save(images / "grey16.png")
    rgb().convert("CMYK").save(images / "cmyk.jpg")
    rgb().quantize(16).save(images / "palette.png")
    Image.fromarray(rng.integers(0, 256, (*SIZE, 4), dtype=np.uint8)).save(images / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (*SIZE, 2), dtype=np.uint8), "LA").save(images / "grey_alpha.png")
    # the RGB each converted image must reach the network as, computed here without the product's code
    twins = {
        "grey16.png": np.repeat(np.round(grey16 / 257.0).astype(np.uint8)[..., None], 3, axis=2),
        "cmyk.jpg": np.asarray(Image.open(images / "cmyk.jpg").convert("RGB")),
        "palette.png": np.asarray(Image.open(images / "palette.png").convert("RGB")),
        "rgba.png": np.asarray(Image.open(images / "rgba.png"))[..., :3],
        "grey_alpha.png": np.repeat(np.asarray(Image.open(images / "grey_alpha.png"))[..., :1], 3, axis=2),
    }
    for name, array in twins.items():
        Image.fromarray(array).save(images / TWINS[name])

    mask = np.zeros(SIZE, np.uint8)
    mask[8:24, 10:30] = 1
    for path in images.iterdir():
        Image.fromarray(mask).save(masks / f"{path.stem}.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "mask_size.png")
    Image.fromarray(np.where(mask > 0, 7, 0).astype(np.uint8)).save(masks / "mask_values.png")
    return root


def present(cases):
    """The corpus names this run made (all of them, less the unreadable file where permissions cannot apply)."""
    return [name for _, name, _ in cases if PERMISSIONS_APPLY or name != "unreadable.png"]


def skip_if_absent(name: str) -> None:
    if not PERMISSIONS_APPLY and name == "unreadable.png":
        pytest.skip("running as root where capabilities cannot be lowered: root reads a file with mode 000")


def named(message: str, path: Path, fragment: str) -> bool:
    """Whether one line of ``message`` names ``path`` and says ``fragment``."""
    return any(str(path) in line and fragment in line for line in message.splitlines())


def run(args) -> subprocess.CompletedProcess:
    return run_python(args, file_permissions=True)


@pytest.fixture(scope="module", autouse=True)
def file_permissions_apply():
    with without_root_file_access():
        yield


def test_the_unreadable_file_cannot_be_read_here(corpus):
    """The mechanism the unreadable case relies on: in this process and in a subprocess, root included."""
    path = corpus / "images" / "unreadable.png"
    if not PERMISSIONS_APPLY:
        pytest.skip("running as root where capabilities cannot be lowered")
    with pytest.raises(PermissionError):
        path.read_bytes()
    result = run(["-c", f"open({str(path)!r}, 'rb').read()"])
    assert result.returncode != 0 and "PermissionError" in result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("bad_inputs") / "lab")


@pytest.fixture(scope="module")
def datalist(corpus) -> Path:
    """Every image with its mask in the 'training' and 'test' sections (paths relative to the datalist)."""
    entries = [{"image": f"images/{p.name}", "label": f"masks/{p.stem}.png"} for p in sorted((corpus / "images").iterdir())]
    path = corpus / "datalist.json"
    path.write_text(json.dumps({"training": entries, "test": entries}))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny network (2 classes) saved as model.pt with its record, as training saves it."""
    network = tiny_network()
    folder = tmp_path_factory.mktemp("model")
    save_tiny_model(folder / "model.pt", network=network)
    return network, folder


# ---------------------------------------------------------------- prepare folder: stops, naming every bad file


@pytest.fixture(scope="module")
def prepared(corpus):
    out = corpus / "prepared.json"
    return run(["-m", "scripts.cli", "prepare", "folder", corpus, out]), out


@pytest.mark.parametrize("name, outcome", _params(KINDS_PER_ENTRY_POINT["prepare folder"]))
def test_prepare_folder(prepared, corpus, name, outcome):
    skip_if_absent(name)
    result, out = prepared
    assert result.returncode != 0 and not out.exists()
    assert f"ERROR: Folder '{corpus}' has {len(present(BROKEN_IMAGES)) + 1} file(s) that cannot be used" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    image = corpus / "images" / name
    if outcome == "converted" or name == "mask_values.png":  # binary masks: any value > 0 is foreground
        assert str(image) not in result.stderr
    elif name in MASK_KINDS:
        assert named(result.stderr, corpus / "masks" / name, outcome)
    else:
        assert named(result.stderr, image, outcome), result.stderr[-3000:]


def test_prepare_folder_lists_the_converted_images(corpus, tmp_path):
    """Without the broken files, prepare lists every sound, converted and twin image: none is dropped."""
    lab = tmp_path / "lab"
    (lab / "images").mkdir(parents=True)
    (lab / "masks").mkdir()
    kept = [*VALID, *present(CONVERTED), *TWINS.values(), "mask_values.png"]
    for name in kept:
        (lab / "images" / name).write_bytes((corpus / "images" / name).read_bytes())
        stem = Path(name).stem
        (lab / "masks" / f"{stem}.png").write_bytes((corpus / "masks" / f"{stem}.png").read_bytes())
    content = json.loads(folder_datalist(lab, tmp_path / "d.json", validation_ratio=0.2).read_text())
    listed = [Path(e["image"]).name for section in ("training", "unlabeled", "validation", "test") for e in content[section]]
    assert sorted(listed) == sorted(kept)


# ---------------------------------------------------------------- the datalist check before training


@pytest.fixture(scope="module")
def check_report(datalist):
    with pytest.raises(ConfigError) as err:
        checked_datalist(datalist, sections=["training"], num_classes=3, require_unlabeled=False)
    return str(err.value)


@pytest.mark.parametrize("name, outcome", _params(KINDS_PER_ENTRY_POINT["datalist check"]))
def test_datalist_check_stops_naming_each_file(check_report, corpus, datalist, name, outcome):
    skip_if_absent(name)
    broken = len(present(BROKEN_IMAGES)) + len(MASKS)
    assert check_report.startswith(f"Datalist '{datalist}' has {broken} invalid entries")
    assert check_report.rstrip().endswith("Fix them, or set 'drop_invalid' to true to train without them.")
    if outcome == "converted":
        assert str(corpus / "images" / name) not in check_report
    else:
        folder = "masks" if name in MASK_KINDS else "images"
        assert named(check_report, corpus / folder / name, outcome), check_report


def test_datalist_check_drop_invalid_keeps_every_usable_image(datalist, caplog):
    with caplog.at_level(logging.WARNING):
        kept = checked_datalist(datalist, sections=["training"], require_unlabeled=False, drop_invalid=True)["training"]
    usable = [*VALID, *present(CONVERTED), *TWINS.values(), "mask_values.png"]  # binary: values > 0 are foreground
    assert sorted(Path(e["image"]).name for e in kept) == sorted(usable)
    dropped = present(BROKEN_IMAGES) + ["mask_size.png"]
    assert f"Dropped {len(dropped)} invalid entries" in caplog.text
    assert all(name in caplog.text for name in dropped)


# ---------------------------------------------------------------- evaluation: stops, or drops with drop_invalid


@pytest.fixture(scope="module")
def evaluated(datalist, checkpoint, tmp_path_factory):
    """Two runs of evaluate.json: a 3-class one that must stop, and a binary one with drop_invalid."""
    _, models = checkpoint
    out = tmp_path_factory.mktemp("evaluation")
    common = ["-m", "monai.bundle", "run", "evaluating", "--config_file", EVALUATE, "--datalist", datalist,
              "--output_dir", out / "runs"]
    # 3 classes contradict the model's record, so this one reads a file without a record, with the network keys
    legacy = out / "legacy"
    legacy.mkdir()
    torch.save({"model": checkpoint[0].state_dict()}, legacy / "model.pt")
    stopped = run([*common, *TINY_NET, "--ckpt_dir", legacy, "--eval_dir", out / "stopped", "--num_classes", 3])
    # the network and window from the model's record: no network key repeated
    dropped = run([*common, "--ckpt_dir", models, "--eval_dir", out / "dropped", "--drop_invalid", "true"])
    assert dropped.returncode == 0, dropped.stderr[-3000:]
    with open(out / "dropped" / "per_image.csv") as handle:
        rows = {Path(row["image"]).name: row for row in csv.DictReader(handle)}
    return stopped, dropped.stdout + dropped.stderr, rows, out


@pytest.mark.parametrize("name, outcome", _params(KINDS_PER_ENTRY_POINT["evaluation"]))
def test_evaluation(evaluated, corpus, datalist, name, outcome):
    skip_if_absent(name)
    stopped, log, rows, out = evaluated
    image = corpus / "images" / name
    # without drop_invalid: one named error before any image is evaluated
    assert stopped.returncode != 0 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert f"ERROR: Datalist '{datalist}' has {len(present(BROKEN_IMAGES)) + len(MASKS)} invalid entries" in stopped.stderr
    assert not (out / "stopped").exists()
    # with drop_invalid: the bad entries are listed and left out, every other image is evaluated
    assert sorted(rows) == sorted([*VALID, *present(CONVERTED), *TWINS.values(), "mask_values.png"])
    if outcome == "converted":
        assert str(image) not in stopped.stderr
        assert rows[name] == {**rows[TWINS[name]], "image": rows[name]["image"]}  # the same metrics as its RGB twin
        assert f"has PIL mode {Image.open(image).mode}:" in log
    else:
        folder = "masks" if name in MASK_KINDS else "images"
        assert named(stopped.stderr, corpus / folder / name, outcome), stopped.stderr[-3000:]
        if name == "mask_values.png":
            assert name in rows  # a binary task takes its values > 0 as foreground
        else:
            assert named(log, corpus / folder / name, outcome) and name not in rows


# ---------------------------------------------------------------- folder inference: skips, reports at the end


@pytest.fixture(scope="module")
def inferred(corpus, checkpoint, tmp_path_factory):
    _, models = checkpoint
    out = tmp_path_factory.mktemp("inference")
    result = run(["-m", "monai.bundle", "run", "inference", "--config_file", CONFIGS / "inference.json",
                  "--input_dir", corpus / "images", "--ckpt_path", models / "model.pt", "--output_dir", out])
    return result, out


@pytest.mark.parametrize("name, outcome", _params(KINDS_PER_ENTRY_POINT["folder inference"]))
def test_folder_inference(inferred, corpus, name, outcome):
    skip_if_absent(name)
    result, out = inferred
    images = corpus / "images"
    total = len(list(images.iterdir()))
    failed = len(present(BROKEN_IMAGES))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"ERROR: {failed} of {total} images in '{images}' could not be read and were skipped" in result.stderr
    sound = [*VALID, *MASK_KINDS, *present(CONVERTED), *TWINS.values()]
    assert sorted(p.name for p in out.glob("*_mask.png")) == sorted(f"{Path(n).stem}_mask.png" for n in sound)
    stem = Path(name).stem
    if outcome == "converted":
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == SIZE
        assert np.array_equal(mask, np.asarray(Image.open(out / f"{Path(TWINS[name]).stem}_mask.png")))
        assert f"has PIL mode {Image.open(images / name).mode}:" in result.stdout + result.stderr
    else:
        assert named(result.stderr, images / name, outcome), result.stderr[-3000:]


# ---------------------------------------------------------------- the ONNX application: skips, reports at the end


@pytest.fixture(scope="module")
def onnx_app(corpus, checkpoint, tmp_path_factory):
    """The MONAI Deploy application's steps (as its operators run them) over the corpus folder."""
    from scripts.deploy import export_onnx
    from scripts.deploy.app import ImageFolderLoader, MaskWriter, TiledOnnxSegmenter

    network, _ = checkpoint
    folder = tmp_path_factory.mktemp("onnx")
    model = export_onnx(network, folder / "model.onnx", example_size=(2, 3, 32, 32), check_sizes=[(1, 3, 32, 48)],
                        record=tiny_record())
    loader = ImageFolderLoader(corpus / "images")
    segmenter = TiledOnnxSegmenter(model)
    writer = MaskWriter(folder / "masks")
    loaded = {Path(path).name: loader.load(path) for path in loader.paths}
    for image in loaded.values():
        writer(image, segmenter(image))
    with pytest.raises(ConfigError) as err:
        loader.report()
    return loaded, str(err.value), folder / "masks"


@pytest.mark.parametrize("name, outcome", _params(KINDS_PER_ENTRY_POINT["ONNX application"]))
def test_onnx_application(onnx_app, corpus, name, outcome):
    skip_if_absent(name)
    loaded, report, masks = onnx_app
    images = corpus / "images"
    assert sorted(loaded) == sorted([*VALID, *MASK_KINDS, *present(CONVERTED), *TWINS.values()])
    assert report.startswith(f"{len(present(BROKEN_IMAGES))} of {len(list(images.iterdir()))} images in '{images}'")
    if outcome == "converted":
        image = loaded[name]
        assert tuple(image.shape) == (3, *SIZE)
        assert torch.equal(image.as_tensor(), loaded[TWINS[name]].as_tensor())  # the documented conversion
        stem = Path(name).stem
        assert np.array_equal(np.asarray(Image.open(masks / f"{stem}_mask.png")),
                              np.asarray(Image.open(masks / f"{Path(TWINS[name]).stem}_mask.png")))
    else:
        assert named(report, images / name, outcome), report
