"""Memory savers: what ``freeze_blocks`` and ``grad_checkpointing`` save in training, and what they cost in speed.

    python -m scripts.benchmarks.memory [--encoder_name vit_small] [--roi 224] [--batch 4] [--iterations 3] \\
        [--settings "['plain', 'freeze_blocks=6', 'grad_checkpointing', 'freeze_blocks=6,grad_checkpointing']"]

Each setting trains ``train.json``'s MPAMatch on the demo data for ``--warmup`` + ``--iterations`` steps in a
process of its own (so one setting's memory cannot hide in another's), with ``--batch`` labeled and ``--batch``
unlabeled crops of ``--roi`` pixels, and reports:

- **peak memory of training**: on CUDA the peak of ``torch.cuda.max_memory_allocated`` during the steps above what
  was allocated before them; on a CPU the highest resident memory of the process during the steps (sampled every
  5 ms) above its resident memory just before them: the activations, gradients and optimizer state the steps
  add to the weights and data already loaded;
- **seconds per step** (median of the steps after the warm-up) and the trainable parameters.

A setting is ``plain`` or comma-separated ``key=value`` train.json keys (``grad_checkpointing`` alone means true).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time

import fire

from scripts.paths import REPO, config_path

__all__ = ["main", "measure"]

TRAIN = config_path("train.json")
DEFAULT_SETTINGS = ("plain", "freeze_blocks=6", "grad_checkpointing", "freeze_blocks=6,grad_checkpointing")


def _keys(setting: str) -> dict:
    """``"freeze_blocks=6,grad_checkpointing"`` -> ``{"freeze_blocks": 6, "grad_checkpointing": True}``."""
    keys = {}
    for part in filter(None, (p.strip() for p in setting.split(","))):
        if part == "plain":
            continue
        name, _, value = part.partition("=")
        keys[name] = json.loads(value) if value else True
    return keys


class _ResidentPeak:
    """Samples the process's resident memory (Linux ``/proc/self/statm``) in a thread; ``peak`` in MiB."""

    def __init__(self, interval: float = 0.005):
        import os
        import threading

        self.page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20
        self.interval, self.peak, self._stop = interval, self.now(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page_mib

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def measure(setting: str = "plain", encoder_name: str = "vit_small", roi: int = 224, batch: int = 4,
            iterations: int = 3, warmup: int = 1) -> dict:
    """Trains one setting in this process and returns its figures (``main`` calls it in a fresh process each)."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    from scripts.data import demo_cache_dir, ensure_demo_dataset

    total = warmup + iterations
    with tempfile.TemporaryDirectory() as scratch:
        parser = ConfigParser()
        parser.read_config(str(TRAIN))
        settings = {"datalist": str(ensure_demo_dataset(demo_cache_dir())), "ckpt_dir": f"{scratch}/models",
                    "output_dir": f"{scratch}/runs", "resume": False, "method": "mpamatch",
                    "encoder_name": encoder_name, "roi_size": [roi, roi], "labeled_batch_size": batch,
                    "unlabeled_batch_size": batch, "num_iterations": total, "epoch_iterations": total,
                    "val_interval": 10**6, "log_interval": 10**6, **_keys(setting)}
        for key, value in settings.items():
            parser[key] = value
        set_determinism(seed=0)
        trainer = parser.get_parsed_content("train#trainer")
        network = parser.get_parsed_content("network")
        device = torch.device(parser.get_parsed_content("device"))
        trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
        stamps = {}

        def stamp(engine):
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps[engine.state.iteration] = time.perf_counter()

        trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
        trainer.add_event_handler(Events.STARTED, lambda e: stamps.setdefault(0, time.perf_counter()))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
            trainer.run()
            peak = torch.cuda.max_memory_allocated() / 2**20 - before
        else:
            with _ResidentPeak() as resident:
                before = resident.now()
                trainer.run()
            peak = resident.peak - before
    steps = [stamps[i] - stamps[i - 1] for i in range(warmup + 1, total + 1)]
    return {"setting": setting, "device": device.type, "trainable_parameters": trainable,
            "peak_training_memory_mib": round(peak, 1), "s_per_step": round(statistics.median(steps), 3)}


def main(encoder_name: str = "vit_small", roi: int = 224, batch: int = 4, iterations: int = 3, warmup: int = 1,
         settings: list[str] | tuple[str, ...] | str = DEFAULT_SETTINGS) -> list[dict]:
    """Prints one row per setting (each measured in a fresh process) and returns the rows."""
    if isinstance(settings, str):
        settings = [settings]
    rows = []
    for setting in settings:
        code = ("import json, sys; from scripts.benchmarks.memory import measure; "
                f"print('RESULT ' + json.dumps(measure({setting!r}, {encoder_name!r}, {roi}, {batch}, {iterations}, "
                f"{warmup})))")
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"setting '{setting}' failed (exit code {done.returncode}):\n{done.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"{setting}: {rows[-1]}", flush=True)
    base = rows[0]
    print(f"\nMPAMatch, {encoder_name}, {batch} + {batch} crops of {roi} x {roi}, {rows[0]['device']}; peak training "
          f"memory relative to '{base['setting']}'")
    print("| setting | trainable parameters (M) | peak training memory (MiB) | vs first | s / step | vs first |\n"
          "|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['trainable_parameters'] / 1e6:.1f} | {row['peak_training_memory_mib']:.0f} | "
              f"{row['peak_training_memory_mib'] / base['peak_training_memory_mib']:.2f} | {row['s_per_step']} | "
              f"{row['s_per_step'] / base['s_per_step']:.2f} |")
    return rows


if __name__ == "__main__":
    from scripts.errors import install_excepthook

    install_excepthook()
    fire.Fire(main)
