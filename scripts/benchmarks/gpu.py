"""One prepared run of the GPU checks: bf16 MPAMatch training steps, inference throughput, whole-slide throughput.

    python -m scripts.benchmarks.gpu --out results/            # on a CUDA machine
    python -m scripts.benchmarks.gpu --out /tmp/g --smoke true  # the same plumbing on a CPU, tiny sizes

The checks run one after the other within ``--budget`` seconds (450 by default: with start-up, the run ends within
8 minutes), each as its own command with its own time cap, its log written to ``--out``; ``gpu_report.md`` and
``gpu_report.json`` are rewritten after each, so a check that fails or runs out of time, or a run stopped from
outside, leaves the results of those that finished. The most wanted figures come first:

1. ``trainer``: ``scripts.benchmarks.training`` with bf16 and the UNI-size encoder (ViT-L/16, random weights, 8 + 8
   images of 256 per step): seconds per MPAMatch step, the trainer against a bare loop over the same steps, peak
   GPU memory and the model FLOPs utilisation against the GPU's dense bf16 peak (looked up from its name,
   ``scripts.benchmarks.training.BF16_PEAK_TFLOPS``);
2. ``inference_uni``: ``scripts.benchmarks.inference`` with bf16 for ``uni``: tiles per second in PyTorch on the GPU
   and in ONNX Runtime with its CUDA provider where onnxruntime-gpu has one (else the provider it names);
3. ``wsi``: ``scripts.benchmarks.wsi`` on a generated 8192 x 8192 slide: tissue megapixels per second, end to end;
4. ``training``: the README's training command for 8 iterations with the method's network in bf16 on the demo
   data (seconds per step, validation Dice, peak GPU memory from its log), if the budget leaves time for it.

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
from scripts.paths import REPO

__all__ = ["main"]


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


def _trainer_rows(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("|") or "peak_memory_gb" in line
            or "gflops_per_it" in line]


def checks(out_dir: Path, smoke: bool) -> list[dict]:
    """The checks in the order they run (most wanted figures first), each with its command and its own time cap.

    Args:
        out_dir: where the checks write.
        smoke: CPU sizes that test the plumbing in minutes; their figures mean nothing.
    """
    python = sys.executable
    if smoke:
        train_net = ["--encoder_name", "vit_tiny", "--roi_size", "[64,64]", "--labeled_batch_size", "2",
                     "--unlabeled_batch_size", "2", "--text_cfg", "{'layers': 1, 'width': 64, 'heads': 2}"]
        trainer = ["--encoder_name", "vit_tiny", "--iterations", "2", "--warmup", "1"]
        inference = ["--encoder_name", "vit_tiny", "--tiles", "8", "--repeats", "1"]
        wsi = ["--sizes", "[2048]", "--encoder_name", "vit_tiny", "--tissue_tiles", "1"]
    else:
        train_net = ["--encoder_name", "uni", "--roi_size", "[256,256]", "--labeled_batch_size", "8",
                     "--unlabeled_batch_size", "8", "--skip_channels", "[512,256,64]",
                     "--decoder_channels", "[256,128,64,16]"]
        trainer = ["--encoder_name", "uni", "--iterations", "6", "--warmup", "2", "--labeled_batch_size", "8",
                   "--unlabeled_batch_size", "8", "--amp", "true"]
        inference = ["--encoder_name", "uni", "--amp", "true", "--tiles", "128", "--repeats", "2"]
        wsi = ["--sizes", "[8192]", "--encoder_name", "vit_small", "--tissue_tiles", "12"]
    caps = (180, 150, 90, 120) if not smoke else (10**6,) * 4  # the plumbing check is bounded by the budget alone
    return [
        # s/it, trainer overhead, peak memory and MFU of UNI ViT-L bf16 MPAMatch steps
        {"name": "trainer", "cap": caps[0], "rows": _trainer_rows,
         "command": [python, "-m", "scripts.benchmarks.training", *trainer]},
        # tiles/s of UNI in PyTorch (bf16) and in ONNX Runtime (CUDA provider where it has one)
        {"name": "inference_uni" if not smoke else "inference", "cap": caps[1], "rows": _table_rows,
         "command": [python, "-m", "scripts.benchmarks.inference", *inference]},
        # tissue Mpx/s of whole-slide inference, end to end
        {"name": "wsi", "cap": caps[2], "rows": _table_rows,
         "command": [python, "-m", "scripts.benchmarks.wsi", "--workdir", str(out_dir / "wsi"), *wsi]},
        # the README's training command on a GPU: a few iterations, validation, the model written
        {"name": "training", "cap": caps[3], "rows": lambda log: [],
         "command": [python, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.json",
                     "--bundle_root", str(out_dir / "bundle"), "--num_iterations", "8", "--val_interval", "1",
                     *train_net]},
    ]


def run_checks(planned: list[dict], out_dir: Path, budget: float, record, minimum: float = 30.0) -> list[dict]:
    """Runs ``planned`` in order, each limited by its cap and by what is left of ``budget`` seconds.

    A check that would get less than ``minimum`` seconds is not started and is recorded as skipped, so the whole run
    ends within the budget (plus the moments between checks). ``record`` receives each result as it ends.
    """
    deadline = time.perf_counter() + float(budget)
    results = []
    for check in planned:
        left = deadline - time.perf_counter()
        if left < minimum:
            entry = {"check": check["name"], "status": f"skipped: {max(left, 0):.0f} s of the budget left",
                     "seconds": 0.0, "log": ""}
        else:
            entry = _run(check["name"], check["command"], out_dir, int(min(check["cap"], left)))
            entry["table"] = check["rows"](entry["log"])
            if check["name"] == "training":
                entry |= _training_figures(entry["log"])
        record(entry)
        results.append(entry)
    return results


def main(out: str = "gpu_results", smoke: bool = False, budget: float = 450.0) -> str:
    """Runs the checks within ``budget`` seconds and writes ``<out>/gpu_report.md``; returns its path."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = _environment()
    print(json.dumps(env), flush=True)
    smoke = as_bool(smoke, "smoke")
    records: list[dict] = []
    report = out_dir / "gpu_report.md"

    def record(entry: dict) -> None:
        """Keeps ``entry`` and rewrites the reports, so a run stopped from outside keeps what finished."""
        records.append(entry)
        lines = ["# GPU checks", "", "```json", json.dumps(env, indent=2), "```", ""]
        for item in records:
            lines.append(f"## {item['check']}: {item['status']} ({item['seconds']} s)")
            lines.append("")
            if item["check"] == "training" and "s_per_step" in item:
                lines.append(f"seconds per step (validation included) {item['s_per_step']}, validation Dice "
                             f"{item['val_dice']}, peak GPU memory {item['peak_gpu_mb']} MB")
            lines.extend(item.get("table", []))
            lines.append("")
        report.write_text("\n".join(lines))
        kept = [{key: value for key, value in r.items() if key != "log"} for r in records]
        (out_dir / "gpu_report.json").write_text(json.dumps({"environment": env, "checks": kept}, indent=2))

    start = time.perf_counter()
    run_checks(checks(out_dir, smoke), out_dir, budget, record)
    print(report.read_text(), flush=True)
    print(f"GPU checks finished in {time.perf_counter() - start:.0f} s (budget {budget:.0f} s)", flush=True)
    return str(report)


if __name__ == "__main__":
    from scripts.errors import install_excepthook

    install_excepthook()
    fire.Fire(main)
