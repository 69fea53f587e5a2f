"""The semi-supervised trainer: UniMatch weak-to-strong consistency plus image- and text-prototype contrast.

One iteration, top to bottom (docs/method.md, "The losses"):

1. the CutMix source u' is predicted in eval mode without gradient; its strong views are pasted into u's inside
   the CutMix boxes;
2. one forward of [x, u_w] with the feature-perturbation stream gives labeled logits, weak logits, FP logits and
   the projection head's hidden maps; one forward of [u_s1, u_s2] gives the strong logits and hidden maps;
3. pseudo-labels and confidences of u_w, replaced inside each box by those of u';
4. L_x (CE + Dice), L_s1, L_s2, L_fp (masked CE over all valid pixels), L_img and L_txt (pixel-to-prototype
   InfoNCE on labeled and confident strong-view pixels), one weighted sum, one optimiser step. Only the pixels
   the contrastive terms use go through the projection head's last layer (``ProjectionHead.project``): the same
   embeddings as projecting the whole map, without its cost.

An epoch is ``epoch_length`` iterations (by default one pass over the unlabeled set, or over the labeled set for
``supervised``; a fixed count when the config gives an iteration budget, so every preset trains the same number
of steps). The trainer draws every batch itself from three cycling streams (unlabeled, labeled, CutMix source),
so an epoch need not be a whole pass. At the start of every epoch all random state (torch, numpy, python, the
transforms, the samplers) is re-seeded from ``(seed, epoch)``, so a run resumed from an end-of-epoch checkpoint
repeats exactly what an uninterrupted run would have done. Under torchrun the augmentations also depend on the
process rank, the samplers do not (docs/scale.md).

The contrastive terms (pixel-to-prototype logits and the text tower) always run in float32, also inside a
bfloat16 / float16 autocast step: at temperature 0.07 a bfloat16 logit is off by several hundredths.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.engines.workflow import Workflow

from scripts.config import as_bool
from scripts.engines.averaging import WeightAverage
from scripts.engines.distributed import (all_processes_agree, all_reduce_sum_, average_gradients_, broadcast_state_,
                                         process_rank, unwrap_network)
from scripts.engines.presets import METHOD_PRESETS, MethodConfig
from scripts.errors import ConfigError, RunError
from scripts.losses import cutmix_targets, masked_cross_entropy, prototype_infonce, sample_pixels_per_class, supervised_loss
from scripts.networks import TransUNetOutput
from scripts.prototypes import PrototypeBank, TextPrototypes

__all__ = ["SemiSupervisedTrainer", "TrainingDivergedError", "epoch_seed", "gather_contrast_pixels",
           "training_schedule"]

logger = logging.getLogger(__name__)

class TrainingDivergedError(RunError):
    """Too many consecutive iterations had a non-finite loss or gradient."""


def epoch_seed(seed: int, epoch: int, stream: int = 0, rank: int = 0) -> int:
    """A 32-bit seed derived from the run seed, the epoch, a stream id and the process rank (independent streams).

    Rank 0 draws the seeds of a single process, so one process of a multi-process run repeats a one-process run's
    augmentations; the other ranks get their own.
    """
    return int(np.random.SeedSequence([seed, epoch, stream, *([rank] if rank else [])]).generate_state(1)[0])


def training_schedule(num_epochs: int, num_iterations: int | None, epoch_iterations: int | None,
                      natural_length: int) -> tuple[int, int]:
    """``(max_epochs, epoch_length)`` of a run from its config keys.

    Args:
        num_epochs: epochs to train when no iteration budget is given (config key ``num_epochs``).
        num_iterations: total optimiser steps, or None (config key ``num_iterations``). When given it replaces
            ``num_epochs``, rounded up to whole epochs.
        epoch_iterations: iterations per epoch (validation and checkpoint unit), or None for ``natural_length``
            (config key ``epoch_iterations``).
        natural_length: batches in one pass of the loader that drives the epoch.

    A budget with a fixed ``epoch_iterations`` gives every method preset the same number of steps.
    """
    length = natural_length if epoch_iterations is None else int(epoch_iterations)
    if length <= 0:
        raise ConfigError(
            f"An epoch would have {length} iterations ('epoch_iterations' {epoch_iterations}, {natural_length} batches "
            "in one pass); give a positive 'epoch_iterations', or more images than one batch."
        )
    if num_iterations is None:
        if int(num_epochs) <= 0:
            raise ConfigError(f"num_epochs={num_epochs} must be positive, e.g. 6.")
        return int(num_epochs), length
    if int(num_iterations) <= 0:
        raise ConfigError(f"num_iterations={num_iterations} must be positive (or null to train 'num_epochs'), e.g. 600.")
    epochs = -(-int(num_iterations) // length)
    if epochs * length != int(num_iterations):
        logger.warning("num_iterations %d is rounded up to %d epochs of %d iterations: %d iterations.",
                       num_iterations, epochs, length, epochs * length)
    return epochs, length


def _to_device(batch: dict, device: torch.device, non_blocking: bool) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.as_tensor() if hasattr(value, "as_tensor") else value
            out[key] = value.to(device, non_blocking=non_blocking)
    return out


def _gather_pixels(maps: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Rows of the B x D x h x w map at flat pixel indices (over B*h*w), without copying the whole map."""
    batch, dim, height, width = maps.shape
    image, pixel = flat_index // (height * width), flat_index % (height * width)
    return maps.flatten(2)[image, :, pixel]


def gather_contrast_pixels(maps: list[torch.Tensor], targets: list[torch.Tensor], keeps: list[torch.Tensor],
                           num_classes: int, max_per_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples at most ``max_per_class`` kept pixels per class over several B x D x h x w maps.

    The maps are pixel embeddings or the projection head's hidden maps (the trainer's case: it projects only the
    sampled rows). Returns the N x D rows, their N targets and the N indices of the map each came from (0 for the
    first map, the labeled one), all in the same order.
    """
    counts = [m.shape[0] * m.shape[2] * m.shape[3] for m in maps]
    offsets = np.cumsum([0, *counts])
    target = torch.cat([t.reshape(-1) for t in targets])
    keep = torch.cat([k.reshape(-1) for k in keeps])
    index = sample_pixels_per_class(target, keep, num_classes, max_per_class).sort().values
    pixels = torch.cat([
        _gather_pixels(m, index[(index >= lo) & (index < hi)] - lo)
        for m, lo, hi in zip(maps, offsets[:-1], offsets[1:])
    ]).float()
    block = torch.bucketize(index, torch.as_tensor(offsets[1:-1], device=index.device), right=True)
    return pixels, target[index], block


def _forward(network: torch.nn.Module, images: torch.Tensor, need_fp: bool = False,
             need_embed_features: bool = False) -> TransUNetOutput:
    """The network's training outputs, always as a ``TransUNetOutput`` (a plain call returns bare logits)."""
    out = network(images, need_fp=need_fp, need_embed_features=need_embed_features)
    return out if isinstance(out, TransUNetOutput) else TransUNetOutput(out, None, None)


def _resize_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0]


class SemiSupervisedTrainer(Trainer):
    """Ignite trainer for every method preset (``supervised``, ``fixmatch``, ``unimatch``, ``mpamatch_img``,
    ``mpamatch_txt``, ``mpamatch``).

    Args:
        device: device to train on.
        max_epochs: number of epochs (passes over the unlabeled set).
        unlabeled_loader: yields ``image`` (weak view), ``image_s1``, ``image_s2``, ``valid``, ``box1``, ``box2``;
            cycled, re-seeded on each pass. For ``supervised`` it only sets the default epoch length.
        labeled_loader: yields ``image``, ``label``, ``valid``; cycled, re-seeded on each pass.
        network: a ``UNITransUNet``, or one wrapped in ``DistributedDataParallel`` (``distributed_network``).
        optimizer: optimizer over the network and the text-prototype parameters.
        mix_loader: second unlabeled stream, the CutMix source; defaults to ``unlabeled_loader`` iterated separately.
        method: the resolved method (``resolve_method``; ``train.json`` passes its ``train#method_config``, so the
            method and its ``lambda_img`` / ``lambda_txt`` are resolved once). Defaults to the ``mpamatch`` preset.
        confidence_threshold: tau for pseudo-labels. Defaults to 0.95.
        prototype_bank: the image-prototype bank; required when lambda_img > 0.
        text_prototypes: the text-prototype module; required when lambda_txt > 0.
        image_temperature: tau_img. Defaults to 0.1.
        pixels_per_class: at most this many pixels per class per batch in the contrastive losses. Defaults to 256.
        contrast_warmup: fraction of all iterations over which the contrastive weights ramp up linearly. Defaults to 0.1.
        prototype_from_pseudo: also pool confident strong-view pixels into the image prototypes. Defaults to False.
        max_skipped_steps: stop after this many consecutive non-finite iterations. Defaults to 10.
        grad_clip_norm: clip the gradient norm to this value, or None for no clipping. Defaults to None.
        seed: run seed for the per-epoch re-seeding. Defaults to 0.
        epoch_length: iterations per epoch. Defaults to ``len(unlabeled_loader)`` (see ``training_schedule``).
        handlers: Ignite handlers. Defaults to None.
        amp: mixed precision (CUDA only). Defaults to False.
        amp_dtype: ``"bfloat16"`` (no loss scaling) or ``"float16"`` (with a GradScaler). Defaults to ``"bfloat16"``.
        non_blocking: non-blocking host-to-device copies. Defaults to False.
        weight_average: a ``WeightAverage`` of ``network`` that the trainer updates after every counted step (the
            weights validation scores and ``model.pt`` stores). Defaults to None (no averaging).
        compile: run the training forward passes through ``torch.compile(network)`` (config key ``compile``). Where
            compilation fails (no C++ compiler for the CPU backend, an unsupported operation) the trainer logs a
            warning and goes on with the eager network. Checkpoints and validation always use the eager module, so
            files do not depend on it. Defaults to False.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        unlabeled_loader: Iterable,
        labeled_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        mix_loader: Iterable | None = None,
        method: MethodConfig = METHOD_PRESETS["mpamatch"],
        confidence_threshold: float = 0.95,
        prototype_bank: PrototypeBank | None = None,
        text_prototypes: TextPrototypes | None = None,
        image_temperature: float = 0.1,
        pixels_per_class: int = 256,
        contrast_warmup: float = 0.1,
        prototype_from_pseudo: bool = False,
        max_skipped_steps: int = 10,
        grad_clip_norm: float | None = None,
        seed: int = 0,
        epoch_length: int | None = None,
        handlers: list | None = None,
        amp: bool = False,
        amp_dtype: str = "bfloat16",
        non_blocking: bool = False,
        weight_average: WeightAverage | None = None,
        compile: bool = False,
    ):
        if not isinstance(method, MethodConfig):
            raise ConfigError(f"SemiSupervisedTrainer 'method' is {method!r}; pass a resolved method "
                              "(scripts.engines.resolve_method, train.json's train#method_config).")
        self.method = method
        method = self.method.name
        if self.method.lambda_img > 0 and prototype_bank is None:
            raise ConfigError(f"method '{method}' uses image prototypes (lambda_img > 0) but no 'prototype_bank' is given.")
        if self.method.lambda_txt > 0 and text_prototypes is None:
            raise ConfigError(
                f"method '{method}' uses text prototypes (lambda_txt > 0) but 'text_source' gives none; set text_source "
                "to 'prompt', 'file' or 'random', or choose a method without text (e.g. 'mpamatch_img')."
            )
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ConfigError(f"confidence_threshold={confidence_threshold} must be in [0, 1].")
        for name, loader in (("unlabeled", unlabeled_loader), ("labeled", labeled_loader)):
            if name == "unlabeled" and not self.method.unsupervised and epoch_length is not None:
                continue
            if hasattr(loader, "__len__") and len(loader) == 0:
                dataset = getattr(loader, "dataset", [])
                raise ConfigError(
                    f"The {name} set has {len(dataset)} images, fewer than one batch ('{name}_batch_size' "
                    f"{getattr(loader, 'batch_size', '?')}); add {name} images or lower the batch size."
                )
        epoch_length = len(unlabeled_loader) if epoch_length is None else int(epoch_length)
        if amp_dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"amp_dtype='{amp_dtype}' must be 'bfloat16' or 'float16'.")
        # Ignite iterates placeholders; the trainer draws its batches from its own streams.
        super().__init__(
            device=device, max_epochs=max_epochs, data_loader=range(epoch_length), epoch_length=epoch_length,
            non_blocking=non_blocking, handlers=None, amp=as_bool(amp, "amp"), decollate=False,
        )
        self.network = network
        self.optimizer = optimizer
        self.unlabeled_loader = unlabeled_loader
        self.labeled_loader = labeled_loader
        self.mix_loader = mix_loader if mix_loader is not None else unlabeled_loader
        self.threshold = confidence_threshold
        self.prototype_bank = prototype_bank
        self.text_prototypes = text_prototypes
        self.image_temperature = image_temperature
        self.pixels_per_class = pixels_per_class
        self.contrast_warmup = contrast_warmup
        self.prototype_from_pseudo = as_bool(prototype_from_pseudo, "prototype_from_pseudo")
        self.max_skipped_steps = max_skipped_steps
        self.grad_clip_norm = grad_clip_norm
        self.seed = seed
        self.weight_average = weight_average
        self._compiled = torch.compile(network) if as_bool(compile, "compile") else None
        self.amp_dtype = getattr(torch, amp_dtype)
        self.state.skipped_steps = 0
        self.state.consecutive_skips = 0
        self.state.prototype_batch = None
        # bfloat16 autocast needs no loss scaling; a GradScaler is only made for float16. Its scale and the skip
        # counters travel in the checkpoint with the trainer's counters (``state_dict``), so a resumed run goes on
        # with the same scale instead of overflowing again from the initial one.
        device_type = torch.device(self.state.device).type
        self.scaler = torch.amp.GradScaler(device_type) if self.amp and self.amp_dtype == torch.float16 else None
        self._streams: dict[str, Any] = {}
        self._passes: dict[str, int] = {}
        # Parameters that DDP does not reach (the text prompts): their gradients are averaged by the trainer.
        network_params = {id(p) for p in network.parameters()}
        self._outside_params = [p for group in optimizer.param_groups for p in group["params"]
                                if id(p) not in network_params]
        # Registered before the user's handlers, so that every handler sees an epoch with its seeds already set,
        # and validation and checkpoints see the same BatchNorm statistics on every process.
        self.add_event_handler(Events.EPOCH_STARTED, self._start_epoch)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._end_epoch)
        if handlers is not None:
            self._register_handlers(handlers)
        logger.info("Method '%s': %s", method, self.method)

    def state_dict(self) -> dict:
        state = dict(super().state_dict())
        state["skipped_steps"], state["consecutive_skips"] = self.state.skipped_steps, self.state.consecutive_skips
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        extras = {key: state.pop(key) for key in ("skipped_steps", "consecutive_skips", "grad_scaler") if key in state}
        super().load_state_dict(state)
        self.state.skipped_steps = int(extras.get("skipped_steps", 0))
        self.state.consecutive_skips = int(extras.get("consecutive_skips", 0))
        if self.scaler is not None and "grad_scaler" in extras:
            self.scaler.load_state_dict(extras["grad_scaler"])

    def run(self) -> None:
        # Under torchrun every process starts from rank 0's state (DDP does the same for the network).
        broadcast_state_(self.text_prototypes)
        broadcast_state_(self.prototype_bank)
        Workflow.run(self)

    # ---------------------------------------------------------------------------------------------- epochs
    def _loaders(self) -> dict[str, Iterable]:
        return {"unlabeled": self.unlabeled_loader, "labeled": self.labeled_loader, "mix": self.mix_loader}

    def _start_epoch(self, engine: Engine) -> None:
        epoch, rank = engine.state.epoch, process_rank()
        seed = epoch_seed(self.seed, epoch, rank=rank)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        for stream, (name, loader) in enumerate(self._loaders().items()):
            transform = getattr(getattr(loader, "dataset", None), "transform", None)
            if hasattr(transform, "set_random_state"):
                transform.set_random_state(seed=epoch_seed(self.seed, epoch, stream + 1, rank=rank))
            self._passes[name] = 0
            self._streams.pop(name, None)

    def _end_epoch(self, engine: Engine) -> None:
        # Without SyncBatchNorm (CPU) each process's running statistics drift from rank 0's after DDP's last
        # broadcast; rank 0's are the ones checkpointed.
        broadcast_state_(unwrap_network(self.network), buffers_only=True)

    def _next(self, name: str) -> dict:
        """The next batch of a cycling stream; a finished pass starts a new one with a new sampler seed."""
        iterator = self._streams.get(name)
        if iterator is not None:
            try:
                return next(iterator)
            except StopIteration:
                pass
        loader = self._loaders()[name]
        if hasattr(loader, "__len__") and len(loader) == 0:
            raise ConfigError(f"The {name} stream yields no batch: fewer images than its batch size.")
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            # each stream and pass gets its own order: streams of equal length must not draw in lockstep
            stream = list(self._loaders()).index(name)
            sampler.set_epoch(epoch_seed(self.seed, self.state.epoch, 1000 * (stream + 1) + self._passes[name]))
        self._passes[name] += 1
        self._streams[name] = iter(loader)
        return next(self._streams[name])

    # ---------------------------------------------------------------------------------------------- iteration
    def _run_network(self, images: torch.Tensor, **kwargs) -> TransUNetOutput:
        if self._compiled is not None:
            try:
                return _forward(self._compiled, images, **kwargs)
            except Exception as err:  # dynamo / inductor raise many types; the eager call below re-raises real errors
                logger.warning("torch.compile cannot run this network here (%s: %s); training goes on with the eager "
                               "network. Set 'compile' to false to skip the attempt.", type(err).__name__,
                               str(err).strip().splitlines()[0][:300] if str(err).strip() else "")
                self._compiled = None
        return _forward(self.network, images, **kwargs)

    def _contrast_ramp(self) -> float:
        total = max(1, self.state.max_epochs * self.state.epoch_length)
        warmup = self.contrast_warmup * total
        return 1.0 if warmup <= 0 else min(1.0, self.state.iteration / warmup)

    def _iteration(self, engine: Engine, batchdata: dict) -> list[dict[str, float]]:
        """One training step; ``engine.state.output`` becomes a one-item list holding the step's losses.

        The list follows MONAI's trainers, whose output is decollated with the loss in every item: handlers written
        for them (``from_engine(["loss"], first=True)``, as ``--tracking mlflow`` adds, or the stats handlers'
        default ``output[0]``) read this trainer's output unchanged.
        """
        method, tau, device = self.method, self.threshold, engine.state.device
        num_classes = unwrap_network(self.network).out_channels
        lab = _to_device(self._next("labeled"), device, self.non_blocking)
        x, y = lab["image"], lab["label"][:, 0].long()
        valid_x = lab.get("valid", torch.ones_like(lab["label"]))[:, 0] > 0
        autocast = torch.autocast(device_type=device.type, dtype=self.amp_dtype, enabled=self.amp)
        zero = torch.zeros((), device=device)
        losses = {key: zero for key in ("loss_s1", "loss_s2", "loss_fp", "loss_img", "loss_txt")}
        mask_ratio = zero

        if method.unsupervised:
            unl = _to_device(self._next("unlabeled"), device, self.non_blocking)
            mix = _to_device(self._next("mix"), device, self.non_blocking)
            u_w, valid_u = unl["image"], unl["valid"][:, 0] > 0
            with torch.no_grad(), autocast:
                self.network.eval()
                mix_probs = self.network(mix["image"]).float().softmax(dim=1)
            mix_conf, mix_target = mix_probs.max(dim=1)
            valid_mix = mix["valid"][:, 0] > 0
            boxes = [unl["box1"][:, 0] > 0, unl["box2"][:, 0] > 0]
            strong = [torch.where(box[:, None], mix[f"image_s{i + 1}"], unl[f"image_s{i + 1}"])
                      for i, box in enumerate(boxes[: method.strong_views])]

        self.network.train()
        with autocast:
            if method.unsupervised:
                out = self._run_network(torch.cat([x, u_w]), need_fp=method.weight_fp > 0,
                                        need_embed_features=method.contrast)
                logits_x, logits_w = out.logits.float().split([x.shape[0], u_w.shape[0]])
                strong_out = self._run_network(torch.cat(strong), need_embed_features=method.contrast)
                logits_strong = strong_out.logits.float().chunk(len(strong))
            else:
                out = self._run_network(x, need_embed_features=method.contrast)
                logits_x = out.logits.float()

            losses["loss_x"] = supervised_loss(logits_x, y, valid=valid_x)
            contrast_emb, contrast_target, contrast_keep = [], [], []
            if method.contrast:
                emb_x = out.embed_features[: x.shape[0]]
                size = tuple(emb_x.shape[-2:])
                contrast_emb.append(emb_x)
                contrast_target.append(_resize_nearest(y, size).long())
                contrast_keep.append(_resize_nearest(valid_x, size) > 0)

            if method.unsupervised:
                probs_w = logits_w.detach().softmax(dim=1)
                conf_w, target_w = probs_w.max(dim=1)
                mask_ratio = ((conf_w >= tau) & valid_u).sum() / valid_u.sum().clamp_min(1)
                weights = (method.weight_s1, method.weight_s2)
                strong_emb = (strong_out.embed_features.chunk(len(strong)) if method.contrast
                              else [None] * len(strong))
                for i, (box, logits_s, emb_s) in enumerate(zip(boxes, logits_strong, strong_emb)):
                    target, conf, valid = cutmix_targets(box, target_w, conf_w, valid_u, mix_target, mix_conf, valid_mix)
                    losses[f"loss_s{i + 1}"] = masked_cross_entropy(logits_s, target, conf, valid, tau)
                    if emb_s is not None:
                        size = tuple(emb_s.shape[-2:])
                        contrast_emb.append(emb_s)
                        contrast_target.append(_resize_nearest(target, size).long())
                        contrast_keep.append(_resize_nearest((conf >= tau) & valid, size) > 0)
                if method.weight_fp > 0:
                    logits_fp = out.logits_fp.float()[x.shape[0]:]
                    losses["loss_fp"] = masked_cross_entropy(logits_fp, target_w, conf_w, valid_u, tau)
                loss_u = sum(w * losses[f"loss_s{i + 1}"] for i, w in enumerate(weights)) + method.weight_fp * losses["loss_fp"]
                loss = (losses["loss_x"] + loss_u) / 2.0
            else:
                loss = losses["loss_x"]

            if method.contrast:
                loss = loss + self._contrast(contrast_emb, contrast_target, contrast_keep, num_classes, losses)

        return [self._step(engine, loss, losses, mask_ratio)]

    def _contrast(self, hidden: list, targets: list, keeps: list, num_classes: int, losses: dict) -> torch.Tensor:
        """L_img and L_txt on sampled labeled and confident strong-view pixels; stores the bank's batch prototypes.

        ``hidden`` are the projection head's hidden maps (labeled first, then the strong views): only the pixels
        sampled for InfoNCE are projected with gradient, and the labeled pixels that the batch prototypes average
        are projected without it. Runs in float32 even inside an autocast step: bf16 logits at temperature 0.07
        are off by several hundredths.
        """
        device_type = hidden[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._contrast_float32([h.float() for h in hidden], targets, keeps, num_classes, losses)

    def _contrast_float32(self, hidden: list, targets: list, keeps: list, num_classes: int,
                          losses: dict) -> torch.Tensor:
        head = unwrap_network(self.network).projection_head
        rows, pixel_target, _ = gather_contrast_pixels(hidden, targets, keeps, num_classes, self.pixels_per_class)
        pixels = head.project(rows)
        ramp = self._contrast_ramp()
        total = pixels.sum() * 0.0
        if self.method.lambda_img > 0:
            if self.prototype_bank.ready:
                losses["loss_img"] = prototype_infonce(pixels, pixel_target, self.prototype_bank.prototypes.detach(),
                                                       self.image_temperature)
                total = total + ramp * self.method.lambda_img * losses["loss_img"]
            # The batch prototypes are means over every valid labeled pixel (the first map), and optionally every
            # confident strong-view pixel, not over the per-class sample drawn for InfoNCE.
            pooled = len(hidden) if self.prototype_from_pseudo else 1
            keep = torch.cat([k.reshape(-1) for k in keeps[:pooled]])
            with torch.no_grad():
                kept = torch.cat([h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]) for h in hidden[:pooled]])[keep]
                # Under torchrun the sums and counts of every process's batch are added up first, so the bank stays
                # the same on every process.
                self.state.prototype_batch = self.prototype_bank.batch_prototypes(
                    head.project(kept),
                    torch.cat([t.reshape(-1) for t in targets[:pooled]])[keep],
                    torch.ones(kept.shape[0], dtype=torch.bool, device=kept.device),
                    reduce=all_reduce_sum_,
                )
        if self.method.lambda_txt > 0:
            text = self.text_prototypes().float()
            losses["loss_txt"] = prototype_infonce(pixels, pixel_target, text, self.text_prototypes.temperature())
            total = total + ramp * self.method.lambda_txt * losses["loss_txt"]
        return total

    def _count_divergent_step(self, engine: Engine, losses: dict, loss_finite: bool) -> None:
        """Logs a step skipped for a non-finite loss or gradient; stops after ``max_skipped_steps`` in a row."""
        engine.state.consecutive_skips += 1
        bad = {k: float(v.detach()) for k, v in losses.items() if not math.isfinite(float(v.detach()))}
        where = bad or ("on another process" if not loss_finite else "gradient")
        logger.warning("Iteration %d: non-finite loss or gradient %s; step skipped (%d skipped in all).",
                       engine.state.iteration, bad or f"({where})", engine.state.skipped_steps)
        if engine.state.consecutive_skips >= self.max_skipped_steps:
            raise TrainingDivergedError(
                f"{engine.state.consecutive_skips} consecutive iterations had a non-finite loss or gradient "
                f"(last: {where}); training stopped and the last checkpoint was left as it was. "
                "Lower 'learning_rate', enable 'grad_clip_norm', or check the data; 'max_skipped_steps' sets "
                "how many skips are tolerated."
            )

    def _step(self, engine: Engine, loss: torch.Tensor, losses: dict, mask_ratio: torch.Tensor) -> dict[str, float]:
        """Backward and update, or skip the step when the loss or the gradient is not finite.

        Under float16 the GradScaler steps and updates on every iteration with a finite loss: a gradient that
        overflows at a loss scale above 1 is an overflow, not divergence; the scaler skips that step and lowers
        its scale, and only the ``skipped_steps`` count records it. At a scale of 1 or less the gradient itself is
        not finite, which counts towards ``max_skipped_steps`` like any non-finite loss.

        Under torchrun a step is skipped on every process when the loss is not finite on one (DDP's backward is a
        collective); the averaged gradients are then the same everywhere, and so is every later decision.
        """
        self.optimizer.zero_grad(set_to_none=True)
        finite = loss_finite = all_processes_agree(bool(torch.isfinite(loss)), loss.device)
        overflow = False
        if loss_finite:
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            average_gradients_(self._outside_params)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm or math.inf)
            finite = bool(torch.isfinite(norm))
            if self.scaler is not None:
                scale = float(self.scaler.get_scale())
                self.scaler.step(self.optimizer)  # skips the update itself when the gradients hold inf / nan
                self.scaler.update()
                overflow = not finite and scale > 1.0
            elif finite:
                self.optimizer.step()
        if finite:
            engine.state.consecutive_skips = 0
            # The step counted, so its batch prototypes join the image-prototype bank (EMA); the trainer does this
            # itself so that no config can leave the bank unfed and the image loss at zero.
            if engine.state.prototype_batch is not None:
                self.prototype_bank.update(*engine.state.prototype_batch)
                engine.state.prototype_batch = None
            if self.weight_average is not None:
                self.weight_average.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            engine.state.prototype_batch = None
            engine.state.skipped_steps += 1
            if overflow:
                logger.info("Iteration %d: float16 gradient overflow at loss scale %.0f; step skipped, scale lowered "
                            "to %.0f.", engine.state.iteration, scale, self.scaler.get_scale())
            else:
                self._count_divergent_step(engine, losses, loss_finite)
        output = {"loss": float(loss.detach()), "mask_ratio": float(mask_ratio), "skipped": 0.0 if finite else 1.0}
        output.update({k: float(v.detach()) for k, v in losses.items()})
        return output
