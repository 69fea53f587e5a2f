"""One prepared run of the GPU checks: bf16 MPAMatch training steps, inference throughput, whole-slide throughput.

    python -m scripts.benchmarks.gpu --out results/            # on a CUDA machine
    python -m scripts.benchmarks.gpu --out /tmp/g --smoke true  # the same plumbing on a CPU, tiny sizes

Each check runs as its own command with a time limit (five commands: inference runs once per encoder), its log
written to ``--out``; ``gpu_report.md`` and ``gpu_report.json`` are rewritten after each, so a check that fails
or runs out of time, or a run stopped from outside, leaves the results of those that finished:

1. ``training``: the README's training command for one epoch with the method's recipe (UNI-size ViT-L/16 with
   random weights, 256 crops, 8 + 8 images per step, wide decoder) in bf16 autocast (train.json's ``amp`` and
   ``amp_dtype``) on the demo data; seconds per step, validation Dice and peak GPU memory from the log;
2. ``inference``: ``scripts.benchmarks.inference`` with bf16 for ``vit_small`` and ``uni`` (PyTorch on the GPU;
   ONNX Runtime with its CUDA provider where onnxruntime-gpu has one, else the provider it names);
3. ``wsi``: ``scripts.benchmarks.wsi`` on a generated 16384 x 16384 slide with the GPU;
4. ``trainer``: ``scripts.benchmarks.training`` with bf16 and the UNI-size encoder: the trainer against a bare
   loop over the same steps, peak GPU memory and the model FLOPs utilisation against the GPU's dense bf16 peak
   (looked up from its name, ``scripts.benchmarks.training.BF16_PEAK_TFLOPS``).

``docs/benchmarks.md`` ("GPU checks") describes the checks and their options.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fire

from scripts.config import as_bool

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[2]


def _environment() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                    gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    try:
        import onnxruntime

        info.update(onnxruntime=onnxruntime.__version__, ort_providers=onnxruntime.get_available_providers())
    except ImportError:
        info.update(onnxruntime=None)
    return info


def _run(name: str, command: list[str], out: Path, timeout: int) -> dict:
    """Runs one check; its combined output goes to ``<out>/<name>.log``."""
    print(f"[{name}] {' '.join(command)}", flush=True)
    start = time.perf_counter()
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep packages already on PYTHONPATH
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    # a session of its own, so that a check out of time is stopped with every process it started
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        log, _ = process.communicate(timeout=timeout)
        status = "ok" if process.returncode == 0 else f"exit {process.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        status = f"timed out after {timeout} s"
    (out / f"{name}.log").write_text(log)
    record = {"check": name, "status": status, "seconds": round(time.perf_counter() - start, 1)}
    print(f"[{name}] {status} in {record['seconds']} s", flush=True)
    return record | {"log": log}


def _training_figures(log: str) -> dict:
    steps = [float(v) for v in re.findall(r"Training speed: (\d+\.\d+) s/it", log)]
    dice = re.findall(r"val_mean_dice: (\d+\.\d+)", log)
    gpu = re.findall(r"peak GPU memory (\d+) MB", log)
    return {"s_per_step": steps[-1] if steps else None, "val_dice": float(dice[-1]) if dice else None,
            "peak_gpu_mb": int(gpu[-1]) if gpu else None}


def _table_rows(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("|")]


def main(out: str = "gpu_results", smoke: bool = False, timeout: int = 240) -> str:
    """Runs the four checks and writes ``<out>/gpu_report.md``; returns its path."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = _environment()
    print(json.dumps(env), flush=True)
    python = sys.executable
    smoke = as_bool(smoke, "smoke")
    if smoke:  # the same commands at sizes a CPU finishes in minutes
        train_net = ["--encoder_name", "vit_tiny", "--roi_size", "[64,64]", "--labeled_batch_size", "2",
                     "--unlabeled_batch_size", "2", "--text_cfg", "{'layers': 1, 'width': 64, 'heads': 2}"]
        encoders, wsi = ["vit_tiny"], ["--sizes", "[2048]", "--encoder_name", "vit_tiny", "--tissue_tiles", "1"]
        bench = ["--tiles", "8", "--repeats", "1"]
        trainer = ["--encoder_name", "vit_tiny", "--iterations", "2", "--warmup", "1"]
    else:
        train_net = ["--encoder_name", "uni", "--roi_size", "[256,256]", "--labeled_batch_size", "8",
                     "--unlabeled_batch_size", "8", "--skip_channels", "[512,256,64]",
                     "--decoder_channels", "[256,128,64,16]"]
        encoders, wsi = ["vit_small", "uni"], ["--sizes", "[16384]", "--encoder_name", "vit_small"]
        bench = ["--tiles", "256", "--repeats", "3"]
        trainer = ["--encoder_name", "uni", "--iterations", "8", "--warmup", "2", "--labeled_batch_size", "8",
                   "--unlabeled_batch_size", "8", "--amp", "true"]
    records: list[dict] = []
    report = out_dir / "gpu_report.md"

    def record(entry: dict) -> None:
        """Keeps ``entry`` and rewrites the reports, so a run stopped from outside keeps what finished."""
        records.append(entry)
        lines = ["# GPU checks", "", "```json", json.dumps(env, indent=2), "```", ""]
        for item in records:
            lines.append(f"## {item['check']}: {item['status']} ({item['seconds']} s)")
            lines.append("")
            if item["check"] == "training":
                lines.append(f"seconds per step (validation included) {item['s_per_step']}, validation Dice "
                             f"{item['val_dice']}, peak GPU memory {item['peak_gpu_mb']} MB")
            lines.extend(item.get("table", []))
            lines.append("")
        report.write_text("\n".join(lines))
        checks = [{key: value for key, value in r.items() if key != "log"} for r in records]
        (out_dir / "gpu_report.json").write_text(json.dumps({"environment": env, "checks": checks}, indent=2))

    training = _run("training", [python, "-m", "monai.bundle", "run", "training", "--config_file",
                                 "bundle/configs/train.json", "--bundle_root", str(out_dir / "bundle"),
                                 "--num_epochs", "1", *train_net], out_dir, timeout)
    record(training | _training_figures(training["log"]))
    for encoder in encoders:
        result = _run(f"inference_{encoder}", [python, "-m", "scripts.benchmarks.inference", "--encoder_name",
                                               encoder, "--amp", "true", *bench], out_dir, timeout)
        record(result | {"table": _table_rows(result["log"])})
    result = _run("wsi", [python, "-m", "scripts.benchmarks.wsi", "--workdir", str(out_dir / "wsi"), *wsi],
                  out_dir, timeout)
    record(result | {"table": _table_rows(result["log"])})
    result = _run("trainer", [python, "-m", "scripts.benchmarks.training", *trainer], out_dir, timeout)
    record(result | {"table": [line for line in result["log"].splitlines()
                               if line.startswith("|") or "peak_memory_gb" in line or "gflops_per_it" in line]})
    print(report.read_text(), flush=True)
    return str(report)


if __name__ == "__main__":
    from scripts.errors import install_excepthook

    install_excepthook()
    fire.Fire(main)
