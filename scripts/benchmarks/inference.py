"""Inference speed and peak memory of the PyTorch and ONNX Runtime paths, on 256 x 256 tiles and one 2048 image.

    python -m scripts.benchmarks.inference [--encoder_name vit_small] [--tiles 32] [--repeats 3] [--amp true]

Each measurement runs in a fresh process so that its peak resident memory (ru_maxrss) is its own. The network
is the demo configuration of inference.json with random weights (speed does not depend on the weights); the
2048 x 2048 image goes through the sliding window of inference.json (window 96, overlap 0.25, Gaussian). With
CUDA, the PyTorch network runs on the GPU (``--amp true``: bf16 autocast) and ONNX Runtime uses its CUDA provider
when onnxruntime-gpu finds CUDA; the table names the provider each row used.
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

__all__ = ["main"]


def _measure(backend: str, kind: str, encoder_name: str, tiles: int, repeats: int, onnx_path: str,
             amp: bool = False) -> dict:
    import torch
    from monai.bundle import ConfigParser

    from scripts.deploy import OnnxSegmenter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parser = ConfigParser()
    parser.read_config(os.path.join(os.path.dirname(__file__), "..", "..", "bundle", "configs", "inference.json"))
    parser["encoder_name"] = encoder_name
    network = parser.get_parsed_content("network_def").eval().to(device)
    # ONNX Runtime: its CUDA provider when CUDA is there (onnxruntime-gpu), else the CPU one
    model = network if backend == "pytorch" else OnnxSegmenter(onnx_path, network.out_channels)
    provider = "torch" if backend == "pytorch" else model.session.get_providers()[0]
    inferer = parser.get_parsed_content("inferer#inferer")
    if kind == "tiles":
        batch, count = torch.randn(8, 3, 256, 256, device=device), tiles
        run = lambda: model(batch)  # noqa: E731
    else:
        batch, count = torch.randn(1, 3, 2048, 2048, device=device), 1
        run = lambda: inferer(batch, model)  # noqa: E731
    amp = amp and backend == "pytorch" and device.type == "cuda"  # CPU bf16 autocast is slower, not faster
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
            "input": "256x256 tiles (batch 8)" if kind == "tiles" else "one 2048x2048 image",
            "images_per_s": round(done / seconds, 3), "seconds_per_image": round(seconds / done, 4),
            "peak_rss_mb": round(peak_mb), "peak_gpu_mb": round(gpu_mb)}


def main(encoder_name: str = "vit_small", tiles: int = 32, repeats: int = 2, amp: bool = False, child: str = "") -> None:
    """Prints one JSON line per measurement and a Markdown table."""
    if child:
        backend, kind, onnx_path = child.split(",")
        print(json.dumps(_measure(backend, kind, encoder_name, tiles, repeats, onnx_path, amp)))
        return
    import torch
    from monai.bundle import ConfigParser

    from scripts.deploy import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        parser = ConfigParser()
        parser.read_config(os.path.join(os.path.dirname(__file__), "..", "..", "bundle", "configs", "inference.json"))
        parser["encoder_name"] = encoder_name
        onnx_path = os.path.join(tmp, "model.onnx")
        export_onnx(parser.get_parsed_content("network_def"), onnx_path, example_size=(2, 3, 256, 256))
        rows = []
        for backend in ("pytorch", "onnx"):
            for kind in ("tiles", "large"):
                cmd = [sys.executable, "-m", "scripts.benchmarks.inference", "--encoder_name", encoder_name,
                       "--tiles", str(tiles), "--repeats", str(repeats), "--amp", str(amp),
                       "--child", f"{backend},{kind},{onnx_path}"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                rows.append(json.loads(out))
                print(out, flush=True)
    device = "CUDA" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    print(f"\n{encoder_name}, {device}\n")
    print("| backend | provider | bf16 | input | images / s | s / image | peak RSS (MB) | peak GPU (MB) |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['provider']} | {r['bf16']} | {r['input']} | {r['images_per_s']} | "
              f"{r['seconds_per_image']} | {r['peak_rss_mb']} | {r['peak_gpu_mb']} |")


if __name__ == "__main__":
    from scripts.errors import install_excepthook

    install_excepthook()
    fire.Fire(main)
