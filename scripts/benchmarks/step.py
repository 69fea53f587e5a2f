"""One MPAMatch training step against UniMatch's, and what each part that MPAMatch adds costs.

    python -m scripts.benchmarks.step [--recipe bundle/configs/recipes/cpu.json] [--repeats 9] [--warmup 2] \\
        [--threads N]

Both trainers are built from ``train.json`` and the recipe (the CPU recipe by default) in one process, on the demo
data, from the same seed, and their step function (``_iteration``: forward passes, losses, backward, optimizer step,
prototype-bank update) is called on the same recorded batches, alternating which method goes first. The ratio is the
median of the per-pair ratios, so a change of load on shared cores moves both steps of a pair alike. Each step is
measured in wall-clock seconds and in CPU seconds of the process (all its threads); with ``--threads 1`` the CPU
seconds hardly depend on what else runs on the machine.

The MPAMatch parts are then timed alone, each on the tensors of a real MPAMatch step, in turn; every figure is
forward plus backward where the step takes a gradient:

- **text tower**: the CoOp prompts through the frozen text tower to the text prototypes (``text_prototypes()``,
  called once per step for every class and view), over the prompt positions the pooled features depend on
  (``scripts.networks.pooled_positions``); beside it, not part of the step, the same tower over every position of
  its context (the tower's own forward, what the step ran before) and the token embeddings with the context vectors,
  the only part of the tower that caching frozen tensors could spare;
- **projection head hidden maps**: conv - BN - ReLU of the head on the decoder features of both forward passes;
- **contrast**: sampling pixels per class, the head's last layer on the sampled pixels, L_img and L_txt (InfoNCE)
  against given prototypes;
- **prototype bank**: the head's last layer on every labeled pixel (no gradient), the batch means and the EMA update.

``rest`` is the MPAMatch - UniMatch difference less the parts in the step: bookkeeping, the larger graph's backward
and timing noise. The load average is printed before and after: on shared cores, trust a run whose load stayed below
the number of cores.
"""

from __future__ import annotations

import collections
import os
import statistics
import tempfile
import time

import fire

from scripts.benchmarks.training import TRAIN, _sync, _trainer

__all__ = ["main"]

CPU_RECIPE = TRAIN.parent / "recipes" / "cpu.json"
NAMES = ("labeled", "unlabeled", "mix")  # the order in which ``_iteration`` draws its batches
TEXT = "text tower"
EVERY_POSITION = "text tower over every position (not in the step)"
EMBEDDINGS = "token embeddings with the context (not in the step)"
OUTSIDE_STEP = (EVERY_POSITION, EMBEDDINGS)


def _timed(function, device) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all of this process's threads) of one call."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _load() -> str:
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _record_batches(trainer, count: int) -> list[dict]:
    """``count`` iterations' batches drawn from the trainer's own streams, as ``_iteration`` draws them."""
    import torch

    trainer.state.epoch = 1
    trainer._start_epoch(trainer)
    return [{name: {k: v.clone() if torch.is_tensor(v) else v for k, v in trainer._next(name).items()}
             for name in NAMES} for _ in range(count)]


def _replaying(trainer, batches: list[dict]):
    """Makes ``trainer._next`` hand out the recorded batches; returns a function that times step ``i`` on them."""
    trainer.state.epoch = 1
    current = {}
    trainer._next = lambda name: current[name]

    def step(i: int) -> tuple[float, float]:
        current.update(batches[i])
        trainer.state.iteration = i + 1
        return _timed(lambda: trainer._iteration(trainer, None), trainer.state.device)

    return step


def _capture_step(trainer, step, i: int) -> dict:
    """The projection head's inputs and the ``_contrast`` arguments of one MPAMatch step."""
    head = trainer.network.projection_head
    captured = {"features": []}
    hook = head.layers[0].register_forward_hook(lambda m, args, out: captured["features"].append(args[0].detach()))
    contrast = trainer._contrast

    def recording(hidden, targets, keeps, num_classes, losses):
        captured["contrast"] = ([h.detach() for h in hidden], targets, keeps, num_classes)
        return contrast(hidden, targets, keeps, num_classes, losses)

    trainer._contrast = recording
    try:
        step(i)
    finally:
        hook.remove()
        del trainer._contrast
    return captured


def prompt_positions(text) -> dict:
    """How many positions of the tower's sequence the prompts run through, and of how many (prompt source only)."""
    from scripts.prototypes import PromptTextPrototypes

    if not isinstance(text, PromptTextPrototypes):
        return {}
    has_class_embedding = getattr(getattr(text.model, "text", None), "cls_emb", None) is not None
    sequence = int(text.token_ids.shape[1]) + int(has_class_embedding)
    kept = sequence if text.encoded_positions is None else int(text.encoded_positions.numel())
    return {"text_positions": kept, "text_sequence": sequence}


def _part_timers(trainer, captured: dict) -> dict:
    """One callable per MPAMatch part: runs it once (forward and backward) and returns wall-clock and CPU seconds."""
    import torch
    import torch.nn.functional as F

    from scripts.engines import gather_contrast_pixels
    from scripts.losses import prototype_infonce
    from scripts.networks import encode_text_features
    from scripts.prototypes import PromptTextPrototypes

    head, device = trainer.network.projection_head, trainer.state.device
    text, bank = trainer.text_prototypes, trainer.prototype_bank
    hidden, targets, keeps, num_classes = captured["contrast"]
    generator = torch.Generator().manual_seed(0)
    prototypes = F.normalize(torch.randn(bank.prototypes.shape, generator=generator), dim=1).to(device)

    def backward_from(output):
        output.backward(torch.randn(output.shape, generator=generator).to(output))

    def text_tower():
        backward_from(text())

    def every_position():
        backward_from(F.normalize(text.projection(
            encode_text_features(text.model, text.custom_text, text.token_ids).float()), dim=-1))

    def embeddings():
        tower = text.model.text if text.custom_text else text.model
        backward_from(tower.token_embedding(text.token_ids))

    def hidden_maps():
        for feature in captured["features"]:
            backward_from(head.features(feature.requires_grad_()))

    def contrast():
        maps = [h.requires_grad_() for h in hidden]
        rows, target, _ = gather_contrast_pixels(maps, targets, keeps, num_classes, trainer.pixels_per_class)
        pixels = head.project(rows)
        loss = prototype_infonce(pixels, target, prototypes, trainer.image_temperature)
        (loss + prototype_infonce(pixels, target, prototypes, text.temperature())).backward()

    def prototype_bank():
        with torch.no_grad():
            keep = keeps[0].reshape(-1)
            kept = hidden[0].permute(0, 2, 3, 1).reshape(-1, hidden[0].shape[1])[keep]
            means, present = bank.batch_prototypes(head.project(kept), targets[0].reshape(-1)[keep],
                                                   torch.ones(kept.shape[0], dtype=torch.bool, device=kept.device))
            bank.update(means, present)

    parts = {TEXT: text_tower}
    if isinstance(text, PromptTextPrototypes):
        parts.update({EVERY_POSITION: every_position, EMBEDDINGS: embeddings})
    parts.update({"projection head hidden maps": hidden_maps, "contrast (sampling, projection, InfoNCE)": contrast,
                  "prototype bank": prototype_bank})
    return {name: (lambda part=part: _timed(part, device)) for name, part in parts.items()}


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return tuple(statistics.median(run[k] for run in runs) for k in range(2))


def main(recipe: str | None = str(CPU_RECIPE), repeats: int = 9, warmup: int = 2, threads: int | None = None) -> dict:
    """Prints the MPAMatch / UniMatch step ratio and the MPAMatch parts' times; returns the figures."""
    import torch

    from scripts.data import demo_cache_dir, ensure_demo_dataset

    if warmup < 1 or repeats < 3:
        raise SystemExit("--warmup must be >= 1 and --repeats >= 3.")
    threads = int(threads or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    config_files = [str(TRAIN)] + ([recipe] if recipe else [])
    total = warmup + repeats
    load_before = _load()
    with tempfile.TemporaryDirectory() as scratch:
        settings = {"datalist": str(ensure_demo_dataset(demo_cache_dir())), "ckpt_dir": f"{scratch}/models",
                    "output_dir": f"{scratch}/runs", "resume": False, "val_interval": 10**6}
        trainers = {method: _trainer({**settings, "method": method}, config_files)[1]
                    for method in ("unimatch", "mpamatch")}
        mpamatch = trainers["mpamatch"]
        batches = _record_batches(mpamatch, total + 1)
        steps = {method: _replaying(trainer, batches) for method, trainer in trainers.items()}
        times = {method: [] for method in steps}
        for i in range(total):
            for method in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
                seconds = steps[method](i)
                if i >= warmup:
                    times[method].append(seconds)

        timers = _part_timers(mpamatch, _capture_step(mpamatch, steps["mpamatch"], total))
        names = list(timers)
        for timer in timers.values():
            timer()  # warm-up
        parts = {name: [] for name in names}
        for i in range(repeats):
            for name in names[i % len(names):] + names[:i % len(names)]:
                parts[name].append(timers[name]())
        positions = prompt_positions(mpamatch.text_prototypes)
    load_after = _load()

    step_s = {method: _median(runs) for method, runs in times.items()}
    ratios = [tuple(m[k] / u[k] for k in range(2)) for m, u in zip(times["mpamatch"], times["unimatch"])]
    ratio = _median(ratios)
    added = tuple(step_s["mpamatch"][k] - step_s["unimatch"][k] for k in range(2))
    part_s = {name: _median(runs) for name, runs in parts.items()}
    in_step = [s for name, s in part_s.items() if name not in OUTSIDE_STEP]
    part_s["rest (bookkeeping, the larger backward, noise)"] = tuple(
        added[k] - sum(s[k] for s in in_step) for k in range(2))

    print(f"recipe {recipe}, {threads} threads on {mpamatch.state.device}, {repeats} pairs of steps after {warmup} "
          f"warm-up, alternating; load average (1, 5, 15 min) before {load_before}, after {load_after}\n")
    print("| step | wall s | CPU s |\n|---|---|---|")
    for method, (wall, cpu) in step_s.items():
        print(f"| {method} | {wall:.3f} | {cpu:.3f} |")
    print("| MPAMatch / UniMatch, median of the pairs (range) | " + " | ".join(
        f"{ratio[k]:.3f} ({min(r[k] for r in ratios):.2f} - {max(r[k] for r in ratios):.2f})" for k in range(2)) + " |")
    print(f"\n| MPAMatch part, forward + backward | wall ms | CPU ms | share of what MPAMatch adds "
          f"({1000 * added[0]:.0f} ms wall, {1000 * added[1]:.0f} ms CPU) |\n|---|---|---|---|")
    for name, (wall, cpu) in part_s.items():
        label = f"{name} ({positions['text_positions']} of {positions['text_sequence']} positions)" \
            if name == TEXT and positions else name
        share = "-" if name in OUTSIDE_STEP or min(added) <= 0 else \
            f"{100 * wall / added[0]:.0f} % / {100 * cpu / added[1]:.0f} %"
        print(f"| {label} | {1000 * wall:.1f} | {1000 * cpu:.1f} | {share} |")
    return {"recipe": recipe, "threads": threads, "device": str(mpamatch.state.device), "repeats": repeats,
            "load_before": load_before, "load_after": load_after, **positions,  # [wall, CPU] pairs below
            "unimatch_s": list(step_s["unimatch"]), "mpamatch_s": list(step_s["mpamatch"]), "ratio": list(ratio),
            "parts_s": {name: list(seconds) for name, seconds in part_s.items()}}


if __name__ == "__main__":
    fire.Fire(main)
