"""Training speed: the bundle's trainer against a plain loop over the same step, on the same batches.

    python -m scripts.benchmarks.training [--method mpamatch] [--encoder_name NAME] [--iterations 12] \\
        [--warmup 2] [--recipe bundle/configs/recipes/cpu.json] [--amp true] [--compile true] [--peak_tflops TFLOPS]

Two runs of ``train.json`` on the demo data, measured after ``--warmup`` iterations:

1. **trainer**: ``SemiSupervisedTrainer.run()`` as a user runs it (Ignite run loop, events, the config's handlers:
   learning-rate schedule, loss log, prototype log; no validation, which is measured by the evaluation benchmarks),
   drawing its batches from the data loaders. The time spent waiting for batches is reported on its own.
2. **plain loop**: a fresh trainer built from the same config, whose step function (``_iteration``: forward passes,
   losses, backward, optimizer step, prototype-bank update) is called in a ``for`` loop over the batches the first
   run drew, recorded in memory: no run loop, events, handlers or data loading.

The overhead is ``trainer - plain loop - data wait``: what the engine and handlers add to each step. The figures
are seconds per iteration (median), images per second (labeled + unlabeled images of one iteration), the FLOPs of
one step (``torch.utils.flop_counter``) and, on a GPU, peak memory and the model FLOPs utilisation against
``--peak_tflops`` (the device's dense bf16 peak; by default looked up from the GPU's name in ``BF16_PEAK_TFLOPS``,
and no utilisation is reported for a GPU not listed there).
"""

from __future__ import annotations

import collections
import statistics
import tempfile
import time

import fire

from scripts.paths import config_path

__all__ = ["main", "BF16_PEAK_TFLOPS", "bf16_peak_tflops"]

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets, by a part of the GPU's name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H200 NVL": 835.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``device_name`` (``torch.cuda.get_device_name()``), or None if unknown."""
    import re

    for part, peak in sorted(BF16_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):  # longest name first
        if re.search(rf"\b{re.escape(part)}\b", device_name):  # whole words: "A10" is not "A10G", "L4" not "L40"
            return peak
    return None

TRAIN = config_path("train.json")


def _trainer(settings: dict, config_files: list[str]):
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    parser = ConfigParser()
    parser.read_config(config_files)
    for key, value in settings.items():
        parser[key] = value
    set_determinism(seed=int(settings.get("seed", 0)))
    trainer = parser.get_parsed_content("train#trainer")
    return parser, trainer


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(method: str = "mpamatch", encoder_name: str | None = None, iterations: int = 12, warmup: int = 2,
         recipe: str | None = None, amp: bool | None = None, peak_tflops: float | None = None,
         compile: bool | None = None,
         labeled_batch_size: int | None = None, unlabeled_batch_size: int | None = None) -> dict:
    """Prints the trainer's and the plain loop's seconds per iteration and the overhead; returns the figures."""
    import torch
    from ignite.engine import Events
    from torch.utils.flop_counter import FlopCounterMode

    from scripts.config import as_bool
    from scripts.data import demo_cache_dir, ensure_demo_dataset

    if warmup < 1 or iterations < 2:
        raise SystemExit("--warmup must be >= 1 and --iterations >= 2.")
    total = warmup + iterations
    config_files = [str(TRAIN)] + ([recipe] if recipe else [])
    with tempfile.TemporaryDirectory() as scratch:
        settings = {"datalist": str(ensure_demo_dataset(demo_cache_dir())), "ckpt_dir": f"{scratch}/models",
                    "output_dir": f"{scratch}/runs", "resume": False, "method": method,
                    "num_iterations": total, "epoch_iterations": total, "val_interval": 10**6, "log_interval": 5}
        if encoder_name:
            settings["encoder_name"] = encoder_name
        if amp is not None:
            settings["amp"] = as_bool(amp, "amp")
        if compile is not None:  # torch.compile of the forward passes (train.json's key); compiling happens in the warm-up
            settings["compile"] = as_bool(compile, "compile")
        if labeled_batch_size:
            settings["labeled_batch_size"] = int(labeled_batch_size)
        if unlabeled_batch_size:
            settings["unlabeled_batch_size"] = int(unlabeled_batch_size)

        # 1. The trainer as a user runs it, recording the batches it draws and the time it waits for them.
        parser, trainer = _trainer(settings, config_files)
        device = parser.get_parsed_content("device")
        encoder_name = parser.get_parsed_content("encoder_name")
        recorded, data_wait = [], collections.defaultdict(float)
        draw = trainer._next

        def recording_next(name):
            start = time.perf_counter()
            batch = draw(name)
            data_wait[trainer.state.iteration] += time.perf_counter() - start
            recorded.append((name, {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}))
            return batch

        trainer._next = recording_next
        stamps = {}
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (_sync(device), stamps.setdefault(
            e.state.iteration, time.perf_counter())))
        trainer.run()
        measured = range(warmup + 1, total + 1)
        # from the end of one iteration to the end of the next: everything the engine does per step
        trainer_times = [stamps[i] - stamps[i - 1] for i in measured]
        wait_times = [data_wait[i] for i in measured]
        images = settings.get("labeled_batch_size") or parser.get_parsed_content("labeled_batch_size")
        if trainer.method.unsupervised:
            images += settings.get("unlabeled_batch_size") or parser.get_parsed_content("unlabeled_batch_size")

        # 2. The same step function in a plain loop over the recorded batches.
        _, plain = _trainer(settings, config_files)
        queue = collections.deque(recorded)

        def replay(name):
            recorded_name, batch = queue.popleft()
            assert recorded_name == name, f"batch order differs: {recorded_name} != {name}"
            return batch

        plain._next = replay
        plain.state.epoch = 1
        plain_times, flops = [], None
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(1, total + 1):
            plain.state.iteration = i
            _sync(device)
            start = time.perf_counter()
            if i == total:  # count the FLOPs of one step (after the timed ones: counting slows it down)
                with FlopCounterMode(display=False) as counter:
                    plain._iteration(plain, None)
                flops = counter.get_total_flops()
            else:
                plain._iteration(plain, None)
            _sync(device)
            if i > warmup and i != total:
                plain_times.append(time.perf_counter() - start)

    trainer_s, plain_s, wait_s = (statistics.median(t) for t in (trainer_times, plain_times, wait_times))
    overhead = trainer_s - plain_s - wait_s
    result = {"method": method, "encoder_name": encoder_name, "device": str(device), "images_per_iteration": images,
              "trainer_s_per_it": trainer_s, "plain_s_per_it": plain_s, "data_wait_s_per_it": wait_s,
              "overhead_s_per_it": overhead, "overhead_fraction": overhead / plain_s,
              "trainer_images_per_s": images / trainer_s, "plain_images_per_s": images / plain_s,
              "gflops_per_it": flops / 1e9 if flops else None}
    if torch.device(device).type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if not peak_tflops and as_bool(parser.get_parsed_content("amp"), "amp") \
                and parser.get_parsed_content("amp_dtype") == "bfloat16":  # the table holds bf16 peaks only
            peak_tflops = bf16_peak_tflops(torch.cuda.get_device_name(torch.device(device)))
        if peak_tflops:
            result["peak_tflops"] = peak_tflops
            result["mfu"] = (flops / plain_s) / (peak_tflops * 1e12)
    print(f"| {method} | {encoder_name} | {device} | trainer {trainer_s:.3f} s/it ({images / trainer_s:.1f} img/s) | "
          f"plain loop {plain_s:.3f} s/it ({images / plain_s:.1f} img/s) | data wait {wait_s:.3f} s/it | "
          f"engine + handler overhead {overhead:+.3f} s/it ({100 * overhead / plain_s:+.1f} %) |")
    extra = {k: v for k, v in result.items() if k in ("gflops_per_it", "peak_memory_gb", "mfu") and v is not None}
    print("  " + ", ".join(f"{k} {v:.3g}" for k, v in extra.items()))
    return result


if __name__ == "__main__":
    fire.Fire(main)
