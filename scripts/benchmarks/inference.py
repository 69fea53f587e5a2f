"""Inference speed and peak memory of the PyTorch and ONNX Runtime paths, on 256 x 256 tiles and one 2048 image.

    python -m scripts.benchmarks.inference [--encoder_name vit_small] [--tiles 32] [--repeats 3] [--amp true]
    python -m scripts.benchmarks.inference --recipe bundle/configs/recipes/cpu.json --tile_size 128 --int8 true

Each measurement runs in a fresh process so that its peak resident memory (ru_maxrss) is its own. The network
is the demo configuration of inference.json with random weights (speed does not depend on the weights); the
2048 x 2048 image goes through the sliding window of inference.json (window 96, overlap 0.25, Gaussian). With
CUDA, the PyTorch network runs on the GPU (``--amp true``: bf16 autocast; on a CPU with AVX512-BF16 or AMX it
takes effect there too) and ONNX Runtime uses its CUDA provider
when onnxruntime-gpu finds CUDA; the table names the provider each row used.

``--recipe`` merges a recipe over inference.json (its network; ``--encoder_name`` is then ignored), ``--tile_size``
sets the tiles' side (the CPU recipe's window is 128), and ``--int8 true`` adds a row for the int8 model
(``scripts.deploy.quantize``, calibrated here on random windows: the weights are random too) on the CPU provider.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import fire

from scripts.paths import config_path

__all__ = ["main", "network_config"]


def network_config(encoder_name: str | None, recipe: str = ""):
    """inference.json, with ``recipe`` merged over it when given, else with ``encoder_name`` (None: the config's)."""
    from monai.bundle import ConfigParser

    from scripts.networks import config_settings, model_record

    parser = ConfigParser()
    config = str(config_path("inference.json"))
    parser.read_config([config, recipe] if recipe else config)
    # the network asked for, with random weights: never the record of a trained models/model.pt
    parser["model_settings"] = model_record(**config_settings(parser, {"encoder_name": None if recipe else encoder_name}))
    return parser


def _measure(backend: str, kind: str, encoder_name: str, tiles: int, repeats: int, onnx_path: str,
             amp: bool = False, recipe: str = "", tile_size: int = 256) -> dict:
    import torch

    from scripts.deploy import OnnxSegmenter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parser = network_config(encoder_name, recipe)
    network = parser.get_parsed_content("network_def").eval().to(device)
    # ONNX Runtime: its CUDA provider when CUDA is there (onnxruntime-gpu), else the CPU one; int8 runs on the CPU
    providers = ["CPUExecutionProvider"] if backend == "onnx-int8" else None
    model = network if backend == "pytorch" else OnnxSegmenter(onnx_path, network.out_channels, providers)
    provider = "torch" if backend == "pytorch" else model.session.get_providers()[0]
    inferer = parser.get_parsed_content("inferer#inferer")
    if kind == "tiles":
        batch, count = torch.randn(8, 3, tile_size, tile_size, device=device), tiles
        run = lambda: model(batch)  # noqa: E731
    else:
        batch, count = torch.randn(1, 3, 2048, 2048, device=device), 1
        run = lambda: inferer(batch, model)  # noqa: E731
    from scripts.inference import cpu_computes_bfloat16

    # on a CPU, bfloat16 only where it is computed natively (elsewhere emulated, and slower than float32)
    amp = amp and backend == "pytorch" and (device.type == "cuda" or cpu_computes_bfloat16())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    with torch.no_grad(), autocast:
        run()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        done = 0
        for _ in range(repeats):
            for _ in range(max(1, count // batch.shape[0]) if kind == "tiles" else 1):
                run()
                done += batch.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    return {"backend": backend, "device": device.type, "provider": provider, "bf16": amp,
            "input": f"{tile_size}x{tile_size} tiles (batch 8)" if kind == "tiles" else "one 2048x2048 image",
            "images_per_s": round(done / seconds, 3), "seconds_per_image": round(seconds / done, 4),
            "peak_rss_mb": round(peak_mb), "peak_gpu_mb": round(gpu_mb)}


def main(encoder_name: str = "vit_small", tiles: int = 32, repeats: int = 2, amp: bool = False, recipe: str = "",
         tile_size: int = 256, int8: bool = False, large: bool = True, child: str = "") -> None:
    """Prints one JSON line per measurement and a Markdown table (``--large false``: tiles only)."""
    from scripts.config import as_bool

    if child:
        backend, kind, onnx_path = child.split(",")
        print(json.dumps(_measure(backend, kind, encoder_name, tiles, repeats, onnx_path, amp, recipe, tile_size)))
        return
    import numpy as np
    import torch

    from scripts.deploy import export_onnx
    from scripts.deploy.quantize import quantize_onnx

    with tempfile.TemporaryDirectory() as tmp:
        parser = network_config(encoder_name, recipe)
        onnx_path = os.path.join(tmp, "model.onnx")
        export_onnx(parser.get_parsed_content("network_def"), onnx_path, example_size=(2, 3, tile_size, tile_size))
        paths = {"pytorch": onnx_path, "onnx": onnx_path}
        if as_bool(int8, "int8"):
            generator = np.random.default_rng(0)
            windows = [generator.standard_normal((3, tile_size, tile_size)).astype(np.float32) for _ in range(16)]
            paths["onnx-int8"] = str(quantize_onnx(onnx_path, os.path.join(tmp, "model.int8.onnx"), windows))
        rows = []
        for backend, path in paths.items():
            for kind in ("tiles", "large") if as_bool(large, "large") else ("tiles",):
                cmd = [sys.executable, "-m", "scripts.benchmarks.inference", "--encoder_name", encoder_name,
                       "--tiles", str(tiles), "--repeats", str(repeats), "--amp", str(amp),
                       *(["--recipe", recipe] if recipe else []), "--tile_size", str(tile_size),
                       "--child", f"{backend},{kind},{path}"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                rows.append(json.loads(out))
                print(out, flush=True)
    device = "CUDA" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    print(f"\n{recipe or encoder_name}, {device}\n")
    print("| backend | provider | bf16 | input | images / s | s / image | peak RSS (MB) | peak GPU (MB) |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['provider']} | {r['bf16']} | {r['input']} | {r['images_per_s']} | "
              f"{r['seconds_per_image']} | {r['peak_rss_mb']} | {r['peak_gpu_mb']} |")


if __name__ == "__main__":
    from scripts.errors import install_excepthook

    install_excepthook()
    fire.Fire(main)
