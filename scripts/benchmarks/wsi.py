"""Peak memory and speed of whole-slide inference at two slide sizes: memory must not grow with the slide.

    python -m scripts.benchmarks.wsi [--sizes "[4096,16384]"] [--encoder_name vit_tiny] [--backend tifffile]

Each size is a generated pyramidal TIFF (``scripts.wsi.write_synthetic_slide``, written tile by tile) holding
one tissue region of about ``tissue_tiles`` output tiles, so the slides differ in size but not in the work of
segmenting their tissue. Each is segmented in a fresh process, so that the peak resident memory (ru_maxrss) printed is that run's own. The network is the
demo configuration of inference.json with random weights and the encoder given (speed does not depend on the
weights; ``vit_tiny`` keeps a CPU run short), through inference.json's sliding window and inference_wsi.json's
tile settings.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import fire

from scripts.paths import CONFIG_DIR

__all__ = ["main"]

CONFIGS = str(CONFIG_DIR)


def _measure(slide: str, out_dir: str, encoder_name: str, backend: str, tile_size: int) -> dict:
    import torch
    from monai.bundle import ConfigParser

    from scripts.networks import config_settings, model_record
    from scripts.wsi import SlideSegmenter

    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, "inference.json"), os.path.join(CONFIGS, "inference_wsi.json")])
    # the network asked for, with random weights: never the record of a trained models/model.pt
    parser["model_settings"] = model_record(**config_settings(parser, {"encoder_name": encoder_name}))
    torch.manual_seed(0)
    device = parser.get_parsed_content("device")  # CUDA when there, with bf16 autocast (inference.json's amp)
    network = parser.get_parsed_content("network_def").eval().to(device)
    segmenter = SlideSegmenter(network, parser.get_parsed_content("inferer"), out_dir, num_classes=2,
                               tile_size=tile_size, halo=parser.get_parsed_content("wsi_halo"), mask_scale=255,
                               backend=backend, progress=False, overwrite=True, device=device,
                               amp=parser.get_parsed_content("amp"))
    with torch.no_grad():  # one window through the network first: the baseline holds the model's own memory
        segmenter.inferer(torch.zeros(1, 3, 256, 256, device=device), network)
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    summary = segmenter.segment(slide)
    seconds = time.perf_counter() - start
    return {
        "slide": "x".join(str(v) for v in summary["slide_levels"][0]),
        "reader": summary["reader"],
        "tiles_segmented": summary["tiles_segmented"],
        "tiles_background": summary["tiles_skipped_background"],
        "seconds": round(seconds, 1),
        "s_per_segmented_tile": round(seconds / max(summary["tiles_segmented"], 1), 2),
        "polygons": sum(summary["polygons"].values()),
        "rss_before_slide_mb": round(baseline_mb),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "device": str(device),
    }


def main(sizes=(4096, 16384), encoder_name: str = "vit_tiny", backend: str = "auto", tile_size: int = 1024,
         tissue_tiles: float = 6.0, workdir: str = "", child: str = "") -> None:
    """Prints one JSON line per slide size and a Markdown table."""
    if child:
        slide, out_dir = child.split(",")
        print(json.dumps(_measure(slide, out_dir, encoder_name, backend, tile_size)))
        return
    from scripts.wsi import write_synthetic_slide

    workdir = workdir or tempfile.mkdtemp(prefix="mpamatch_wsi_bench_")
    rows = []
    for size in sizes:
        slide = os.path.join(workdir, f"slide_{size}.tif")
        if not os.path.isfile(slide):
            start = time.perf_counter()
            # one tissue region of about the same area on every slide, so that the slides differ in size only
            radius = math.sqrt(tissue_tiles / math.pi) * tile_size / size
            write_synthetic_slide(slide, size, size, seed=1, tissue_regions=1, tissue_radius=(radius, radius))
            print(f"wrote {slide} ({os.path.getsize(slide) / 2**20:.0f} MB) in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-m", "scripts.benchmarks.wsi", "--child", f"{slide},{os.path.join(workdir, 'out')}",
             "--encoder_name", encoder_name, "--backend", backend, "--tile_size", str(tile_size)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise SystemExit(f"benchmark of {slide} failed:\n{result.stderr[-3000:]}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    from scripts.errors import install_excepthook

    install_excepthook()
    fire.Fire(main)
