"""What users run, measured: network windows per second and whole-slide tissue megapixels per second, against a
matrix product on the same cores.

    python -m scripts.benchmarks.throughput --recipe bundle/configs/recipes/cpu.json
    python -m scripts.benchmarks.throughput --recipe bundle/configs/recipes/cpu.json --ckpt models/model.pt \\
        --onnx models/model.onnx --int8_onnx models/model.int8.onnx

Prints, one JSON line each as it goes, then as a Markdown table:

1. ``matmul``: a 2048 x 2048 float32 matrix product in PyTorch, GFLOP/s (2 n^3 per product), at the start and the
   end of the run (a drift between the two means something else used the cores).
2. ``windows``: the network alone on batches of ``sw_batch_size`` windows of the inference window (``roi_size``):
   windows per second, GFLOP/s (``torch.utils.flop_counter`` count per window) and that rate's ratio to the
   matrix product, for PyTorch (default memory order and channels-last; ``pytorch-bf16``: channels-last under
   bfloat16 autocast, on a CPU that computes it natively) and ONNX Runtime float32 and int8 (CPU).
3. ``slide``: ``inference.json`` + ``inference_wsi.json`` (+ ``--recipe``) end to end on the generated demo slide
   (3072 x 4096, ten 1024 x 1024 tissue tiles; ``--slide`` names another), each run in a fresh ``monai.bundle run``
   process: seconds for
   the slide (reading, tissue detection, windows, TIFF pyramid and GeoJSON; the process's start and the model's
   load are in ``command_s``), tissue megapixels per second (segmented tiles' area / slide seconds), the shares of
   reading (waited for; reads run on a thread beside the network), segmenting and writing, windows computed,
   Mpx/s per matmul-GFLOP/s, and the peak resident memory of the process. Per backend, with TTA off and on,
   with the shared window grid and tile by tile (``wsi_shared_windows``); ``pytorch-bf16`` is inference's
   ``--amp true``.

Without ``--ckpt`` the network is the recipe's (or ``inference.json``'s default) with random weights, which run
as fast as trained ones; without ``--onnx`` it is exported here, and without ``--int8_onnx`` quantised here on
windows of the demo slide (speed only: ``export-onnx --int8`` measures an int8 model's accuracy).

``--datalist FILE --ckpt model.pt [--preset bundle/configs/datasets/glas.json]`` adds ``accuracy``: the labelled
``test`` images of the datalist, each written as a one-level TIFF and segmented through the whole-slide path tile
by tile, on the shared window grid, on it with overlap 0.125, and on it in bfloat16 (``amp``, where the CPU computes
it natively): mean Dice of the gland class and pixel agreement with the tile-by-tile masks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import fire

from scripts.benchmarks.inference import network_config
from scripts.paths import REPO, config_path

__all__ = ["main"]


def _matmul_gflops(seconds: float = 3.0) -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * 2048 ** 3 * count / (time.perf_counter() - start) / 1e9


def _window_rate(run, batch, seconds: float) -> float:
    import torch

    with torch.no_grad():
        run(batch)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run(batch)
            count += batch.shape[0]
    return count / (time.perf_counter() - start)


def _measure_slide(configs, bundle_root, slide, workdir, name, overrides, tile, matmul) -> dict:
    """One ``monai.bundle run`` of the whole-slide config in a fresh process; its own peak memory comes from wait4."""
    out = os.path.join(workdir, name)
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
            "--bundle_root", bundle_root, "--slides", slide, "--wsi_output_dir", out, "--wsi_overwrite", "true"]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        process = subprocess.Popen(args, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        command_s = time.perf_counter() - start
        if status != 0:
            log.seek(0)
            raise SystemExit(f"slide run {name} failed:\n{log.read()[-3000:]}")
    with open(os.path.join(out, f"{os.path.splitext(os.path.basename(slide))[0]}_summary.json")) as handle:
        summary = json.load(handle)
    timing, seconds = summary["timing"], summary["seconds"]
    # area of the segmented tiles (edge tiles of a slide whose size is not a multiple of the tile are smaller)
    tissue_mpx = min(summary["tiles_segmented"] * tile * tile, math.prod(summary["mask_shape"])) / 1e6
    writing = seconds - timing["tissue_detection"] - timing["read_wait"] - timing["segment"]
    return {
        "kind": "slide", "name": name, "tiles": summary["tiles_segmented"], "windows": summary.get("windows"),
        "slide_s": seconds, "command_s": round(command_s, 1),
        "tissue_mpx_per_s": round(tissue_mpx / seconds, 3),
        "mpx_per_s_per_matmul_gflops": round(tissue_mpx / seconds / matmul, 5),
        "share_read_wait": round(timing["read_wait"] / seconds, 3),
        "share_segment": round(timing["segment"] / seconds, 3),
        "share_tissue_detection": round(timing["tissue_detection"] / seconds, 3),
        "share_write": round(writing / seconds, 3), "read_s_on_thread": timing["read"],
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
    }


def accuracy(datalist: str, ckpt: str, recipe: str, workdir: str, settings: list[dict], section: str = "test",
             preset: str = "") -> list[dict]:
    """Dice and pixel agreement of the whole-slide path on a datalist's labelled images, each written as a one-level
    tiled TIFF and segmented as a slide: one row per entry of ``settings`` (config keys such as ``wsi_tile_size``,
    ``sw_overlap``, ``wsi_shared_windows``, ``tta``); agreement is with the first entry's masks."""
    import numpy as np
    import tifffile
    from monai.bundle import ConfigParser
    from PIL import Image

    from scripts.data import load_datalist
    from scripts.deploy.quantize import mask_agreement, mean_dice

    items = load_datalist(datalist, key=section, require_label=True)
    slides = os.path.join(workdir, "accuracy_slides")
    os.makedirs(slides, exist_ok=True)
    labels = []
    for index, item in enumerate(items):
        rgb = np.asarray(Image.open(item["image"]).convert("RGB"))
        tifffile.imwrite(os.path.join(slides, f"image_{index:03d}.tif"), rgb, tile=(128, 128), photometric="rgb")
        labels.append((np.asarray(Image.open(item["label"])) > 0).astype(np.uint8))
    bundle_root = os.path.join(workdir, "accuracy_bundle")
    os.makedirs(os.path.join(bundle_root, "models"), exist_ok=True)
    shutil.copyfile(ckpt, os.path.join(bundle_root, "models", "model.pt"))
    configs = [str(config_path("inference.json")), str(config_path("inference_wsi.json"))]
    configs += [p for p in (preset, recipe) if p]
    rows, first = [], None
    for setting in settings:
        parser = ConfigParser()
        parser.read_config(configs)
        out = os.path.join(workdir, "accuracy_out")
        shutil.rmtree(out, ignore_errors=True)
        for key, value in {"bundle_root": bundle_root, "slides": slides, "wsi_output_dir": out,
                           "tissue_detection": False, "wsi_geojson": False, "wsi_overwrite": True, **setting}.items():
            parser[key] = value
        segmenter = parser.get_parsed_content("slide_segmenter")
        segmenter.progress = False
        summaries = segmenter.run(slides)
        masks = [(tifffile.imread(s["outputs"]["mask"], level=0) > 0).astype(np.uint8) for s in summaries]
        first = first or masks
        rows.append({"kind": "accuracy", **setting, "images": len(masks), "dice": round(mean_dice(masks, labels, 2), 4),
                     "agreement_with_first": round(mask_agreement(masks, first), 5),
                     "windows": sum(s.get("windows") or 0 for s in summaries) or None,
                     "seconds": round(sum(s["seconds"] for s in summaries), 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(recipe: str = "bundle/configs/recipes/cpu.json", ckpt: str = "", onnx: str = "", int8_onnx: str = "",
         seconds: float = 5.0, workdir: str = "", backends: str = "pytorch,pytorch-bf16,onnx,onnx-int8",
         slides: bool = True, datalist: str = "", preset: str = "", slide: str = "") -> None:
    """Prints the figures as JSON lines, then a Markdown table (see the module's docstring)."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from scripts.deploy import OnnxSegmenter, export_onnx
    from scripts.inference import precision
    from scripts.networks import load_trained_weights, model_record, network_from_record, stored_record
    from scripts.wsi import demo_slide

    from scripts.config import as_bool

    slides = as_bool(slides, "slides")
    if datalist and not ckpt:
        raise SystemExit("--datalist measures the Dice of a trained model: give --ckpt models/model.pt too.")
    workdir = workdir or tempfile.mkdtemp(prefix="mpamatch_throughput_")
    recipe = str(REPO / recipe) if recipe and not os.path.isabs(recipe) else recipe
    rows = []

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)

    start_matmul = _matmul_gflops()
    emit({"kind": "matmul", "name": "start", "gflops": round(start_matmul, 1),
          "torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count()})

    parser = network_config(None, recipe)
    record = stored_record(ckpt, "--ckpt") if ckpt else None
    record = record or parser.get_parsed_content("model_settings")
    network = network_from_record(record).eval()
    bundle_root = os.path.join(workdir, "bundle")
    os.makedirs(os.path.join(bundle_root, "models"), exist_ok=True)
    model_pt = os.path.join(bundle_root, "models", "model.pt")
    if ckpt:
        load_trained_weights(network, ckpt, key="--ckpt")
        shutil.copyfile(ckpt, model_pt)
    else:
        torch.manual_seed(0)
        torch.save({"model": network.state_dict(), "config": model_record(**record)}, model_pt)
    roi = [int(v) for v in record["roi_size"]]
    batch_size = int(parser.get_parsed_content("sw_batch_size"))
    batch = torch.randn(batch_size, 3, *roi)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(batch[:1])
    gflop = counter.get_total_flops() / 1e9

    wanted = [b.strip() for b in (backends.split(",") if isinstance(backends, str) else backends)]
    bf16 = precision.cpu_computes_bfloat16()
    if "pytorch-bf16" in wanted and not bf16:
        print("pytorch-bf16 left out: this CPU has neither AVX512-BF16 nor AMX.", flush=True)
        wanted.remove("pytorch-bf16")
    onnx_files = {}
    if "onnx" in wanted or "onnx-int8" in wanted:
        onnx_files["onnx"] = onnx or str(export_onnx(network, os.path.join(bundle_root, "models", "model.onnx"),
                                                     (2, 3, *roi), record=model_record(**record)))
    if "onnx-int8" in wanted:
        if int8_onnx:
            onnx_files["onnx-int8"] = int8_onnx
        else:
            from scripts.deploy.quantize import quantize_onnx

            generator = np.random.default_rng(0)
            calibration = [generator.standard_normal((3, *roi)).astype(np.float32) for _ in range(16)]
            onnx_files["onnx-int8"] = str(quantize_onnx(onnx_files["onnx"], os.path.join(
                bundle_root, "models", "model.int8.onnx"), calibration))
    num_classes = int(record["num_classes"])
    models = {}
    if "pytorch" in wanted:
        models["pytorch"] = network
        models["pytorch-channels-last"] = network
    if "pytorch-bf16" in wanted:
        models["pytorch-bf16"] = network
    for name in ("onnx", "onnx-int8"):
        if name in onnx_files:
            models[name] = OnnxSegmenter(onnx_files[name], num_classes, providers=["CPUExecutionProvider"])
    for name, model in models.items():
        x = batch
        if name in ("pytorch-channels-last", "pytorch-bf16"):
            model = model.to(memory_format=torch.channels_last)
            x = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "pytorch-bf16"):
            rate = _window_rate(model, x, seconds)
        network.to(memory_format=torch.contiguous_format)
        emit({"kind": "windows", "name": name, "roi": roi, "batch": batch_size, "windows_per_s": round(rate, 1),
              "gflop_per_window": round(gflop, 3), "gflops": round(rate * gflop, 1),
              "ratio_to_matmul": round(rate * gflop / start_matmul, 3)})

    if slides:
        slide = slide or demo_slide(os.path.join(workdir, "slides"))
        configs = [str(config_path("inference.json")), str(config_path("inference_wsi.json"))]
        configs += [recipe] if recipe else []
        with open(config_path("inference_wsi.json")) as handle:
            tile = int(json.load(handle)["wsi_tile_size"])
        runs = []
        for backend in wanted:
            for tta in (False, True):
                for shared in (True, False):
                    overrides = {"backend": "onnx" if backend.startswith("onnx") else "pytorch",
                                 "tta": str(tta).lower(), "wsi_shared_windows": str(shared).lower()}
                    if backend == "pytorch-bf16":
                        overrides["amp"] = "true"
                    if backend.startswith("onnx"):
                        overrides["onnx_path"] = onnx_files[backend]
                    runs.append((f"{backend}{'-tta' if tta else ''}{'' if shared else '-per-tile'}", overrides))
        for name, overrides in runs:
            emit(_measure_slide(configs, bundle_root, slide, workdir, name, overrides, tile, start_matmul))

    if datalist:
        settings = [{"wsi_shared_windows": False}, {"wsi_shared_windows": True},
                    {"wsi_shared_windows": True, "sw_overlap": 0.125}]
        settings += [{"wsi_shared_windows": True, "amp": True}] if bf16 else []
        for row in accuracy(datalist, ckpt, recipe, workdir, settings, preset=preset):
            rows.append(row)

    end_matmul = _matmul_gflops()
    emit({"kind": "matmul", "name": "end", "gflops": round(end_matmul, 1)})
    for kind in ("windows", "slide", "accuracy"):
        chosen = [row for row in rows if row["kind"] == kind]
        if not chosen:
            continue
        keys = [key for key in chosen[0] if key != "kind"]
        print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for row in chosen:
            print("| " + " | ".join(str(row.get(key, "")) for key in keys) + " |")


if __name__ == "__main__":
    from scripts.errors import install_excepthook

    install_excepthook()
    fire.Fire(main)
