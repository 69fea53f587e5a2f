"""Command-line tools of the bundle: ``python -m scripts.cli <command> --help``.

Commands:
    demo-data         write the generated demo data set (what the main job uses) to a folder
    check-weights     check downloaded UNI / UNI2-h / CONCH weights against the network before training
    text-prototypes   compute fixed text prototypes once from a local text encoder, for ``text_source: file``
    export-onnx       export a trained checkpoint to ONNX (dynamic batch, height, width) and check it against PyTorch
    pack              assemble dist/<bundle_name>/ (configs, scripts, models, docs, LICENSE) for MONAI's tools
    prepare glas      write a datalist for GlaS (official layout, BMP or PNG) with a labeled ratio and a seed
    prepare ebhi      write a datalist for EBHI-SEG (--preset ebhi_gland or ebhi_cancer)
    prepare kpi       convert KPI patches (downsample or tile) and write their datalist
    prepare folder    write a datalist for images/ + masks/ (+ unlabeled/) folders
    prepare csv       write a datalist from a CSV of image, label, split
    study             train and test methods x labeled ratios x seeds on one fixed test set (``study --help``)
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Sequence

import fire
import torch
import torch.nn.functional as F

from scripts.config import as_bool
from scripts.data import ensure_demo_dataset
from scripts.deploy import EXTERNAL_DATA_THRESHOLD
from scripts.errors import ConfigError
from scripts.networks import build_text_tower, encode_text_features
from scripts.paths import config_path

__all__ = ["demo_data", "check_weights", "text_prototypes", "export_onnx", "study", "commands"]

REPO_CONFIG = config_path("inference.json")


def demo_data(root: str, seed: int = 0, n_labeled: int = 8, n_unlabeled: int = 72, n_validation: int = 8,
              n_test: int = 8, image_size: Sequence[int] = (256, 256)) -> str:
    """Writes the demo data set under ``root`` (or reuses a matching copy) and prints its datalist path."""
    path = ensure_demo_dataset(root, seed=seed, n_labeled=n_labeled, n_unlabeled=n_unlabeled,
                               n_validation=n_validation, n_test=n_test, image_size=tuple(image_size))
    return str(path)


def check_weights(encoder_weights: str | None = None, encoder_name: str = "uni", conch_dir: str | None = None,
                  text_weights: str | None = None, text_tokenizer: str | None = None) -> str:
    """Checks downloaded weights before a run: each file is read and loaded strictly into its network (built without
    allocating it), and what was found is printed; a file that does not fit stops with its missing, unexpected and
    mis-shaped keys (exit status 1).

    Examples::

        python -m scripts.cli check-weights --encoder_name uni --encoder_weights /models/uni/pytorch_model.bin
        python -m scripts.cli check-weights --encoder_name uni2-h --encoder_weights /models/uni2-h/pytorch_model.bin
        python -m scripts.cli check-weights --conch_dir /models/conch

    Args:
        encoder_weights: the encoder's weights file (config key ``encoder_weights``).
        encoder_name: the encoder preset or timm ViT name it must fit (``encoder_name``). Defaults to ``uni``.
        conch_dir: a folder with CONCH's ``pytorch_model.bin`` and ``conch_byte_level_bpe_uncased.json``
            (``conch_dir`` of the foundation-model recipes).
        text_weights: CONCH's weights file, when it is not in a ``conch_dir`` (``text_weights``).
        text_tokenizer: CONCH's tokenizer file beside ``text_weights`` (``text_tokenizer``).
    """
    from scripts.networks import check_conch_weights, check_encoder_weights, conch_file

    if conch_dir and (text_weights or text_tokenizer):
        raise ConfigError("Give either --conch_dir or --text_weights / --text_tokenizer, not both.")
    if conch_dir:
        text_weights, text_tokenizer = conch_file(conch_dir, "weights"), conch_file(conch_dir, "tokenizer")
    if not (encoder_weights or text_weights):
        raise ConfigError("check-weights needs a file to check: --encoder_weights FILE (with --encoder_name), "
                          "--conch_dir FOLDER, or --text_weights FILE [--text_tokenizer FILE].")
    if text_tokenizer and not text_weights:
        raise ConfigError("--text_tokenizer is checked with CONCH's weights: add --text_weights FILE.")
    reports = [check_encoder_weights(encoder_weights, encoder_name)] if encoder_weights else []
    if text_weights:
        reports.append(check_conch_weights(text_weights, text_tokenizer))
    return "\n".join(reports)


def text_prototypes(out: str, class_descriptions: Sequence[str], arch: str = "ViT-B-16", weights: str | None = None,
                    template: str = "a histopathology image of {}.", allow_random: bool = False,
                    tokenizer_file: str | None = None) -> str:
    """Encodes one prompt per class with a frozen text tower and saves the C x D prototypes.

    Args:
        out: output ``.pt`` file, then given to training as ``text_prototype_file``.
        class_descriptions: one description per class, e.g. ``"['background stroma','colon gland']"``.
        arch: ``conch`` or an open_clip architecture of the text tower. Defaults to ``ViT-B-16``.
        weights: local weights file of that architecture.
        template: prompt template; ``{}`` is replaced by each description.
        allow_random: permit a random tower (for testing the pipeline only). Defaults to False.
        tokenizer_file: CONCH's ``conch_byte_level_bpe_uncased.json``, for ``--arch conch`` only.
    """
    if isinstance(class_descriptions, str):
        class_descriptions = [class_descriptions]
    if not weights and not allow_random:
        raise ConfigError(
            "text-prototypes needs --weights (a local text encoder file); prototypes from a random tower carry no "
            "language prior. Pass --allow_random true only to test the pipeline."
        )
    model, tokenizer = build_text_tower(arch, weights, tokenizer_file=tokenizer_file)
    custom = getattr(model, "text", None) is not None
    prompts = [template.format(d) for d in class_descriptions]
    with torch.no_grad():
        vectors = F.normalize(encode_text_features(model, custom, tokenizer(prompts)).float(), dim=-1)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"prototypes": vectors, "class_descriptions": list(class_descriptions), "prompts": prompts,
                "arch": arch}, path)
    logging.getLogger(__name__).info("Saved %d text prototypes of width %d to %s", *vectors.shape, path)
    return str(path)


def export_onnx(ckpt: str = "models/model.pt", out: str = "models/model.onnx", config_file: str = str(REPO_CONFIG),
                example_size: Sequence[int] = (2, 3, 256, 256),
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, int8: bool = False, int8_out: str | None = None,
                datalist: str | None = None, dataset_dir: str | None = None,
                int8_calibration_sections: str = "training,unlabeled", int8_calibration_windows: int = 64,
                int8_eval_section: str | None = None, int8_max_dice_loss: float = 0.005, label_threshold: float = 0,
                **overrides) -> str:
    """Builds the network ``ckpt`` records (or, for an older file, that of ``config_file`` with ``--key value``
    overrides, as for training), loads ``ckpt`` strictly and exports it to ``out`` with dynamic batch, height and
    width and the model's record (if it has one) in the file's metadata; fails if ONNX Runtime and PyTorch differ by
    more than 1e-4. Weights over ``external_data_threshold`` bytes (default 1.5 GiB; 0: always) go to
    ``<out>.data`` beside ``out``.

    Example: ``python -m scripts.cli export-onnx --ckpt models/model.pt --out models/model.onnx``

    ``--int8 true --datalist FILE`` also writes an int8 model for CPU servers (``scripts.deploy.quantize``) to
    ``--int8_out`` (default ``<out>`` with ``.int8.onnx``), calibrated on ``--int8_calibration_windows`` windows of
    the ``--int8_calibration_sections`` images, with the Dice of both models on ``--int8_eval_section`` (default
    ``test``, else ``validation``; foreground above ``--label_threshold``) and their mask agreement in its record;
    it is refused, with those figures, when it loses more than ``--int8_max_dice_loss`` Dice.
    """
    from monai.bundle import ConfigParser

    from scripts.deploy import export_onnx as export
    from scripts.networks import (RECORD_KEYS, load_trained_weights, network_from_record, stored_record,
                                  trained_settings)

    int8 = as_bool(int8, "int8")
    if int8 and not datalist:
        raise ConfigError("--int8 true calibrates on your training images: add --datalist FILE (its training and "
                          "unlabeled sections calibrate, its test or validation section measures the Dice).")
    parser = ConfigParser()
    parser.read_config(config_file)
    for key, value in overrides.items():
        parser[key] = value
    # the record keys the config sets (a config of its own may set some); the others are a new training's defaults
    settings = trained_settings(ckpt, {key: parser.get_parsed_content(key) for key in RECORD_KEYS
                                       if parser.get(key) is not None}, key="--ckpt")
    network = network_from_record(settings)
    load_trained_weights(network, ckpt, key="--ckpt")
    # A file without a record (written before records existed) exports without one: its window is not known.
    record = settings if stored_record(ckpt, "--ckpt") is not None else None
    exported = export(network, out, tuple(example_size), record=record,
                      external_data_threshold=int(external_data_threshold))
    if not int8:
        return str(exported)
    from scripts.deploy.quantize import describe_int8, export_int8

    quantized, figures = export_int8(exported, int8_out or exported.with_suffix(".int8.onnx"), datalist, dataset_dir,
                                     int8_calibration_sections, int(int8_calibration_windows), int8_eval_section,
                                     float(int8_max_dice_loss), config_file, overrides, float(label_threshold))
    return f"{exported}\n{quantized}: {describe_int8(figures)}"


def _path_of(function):
    """Wraps an adapter so the CLI prints the written datalist's path."""

    @functools.wraps(function)
    def run(*args, **kwargs) -> str:
        return str(function(*args, **kwargs))

    return run


def _prepare_commands() -> dict:
    """``prepare <name>`` for every data set of the adapter registry (scripts/data/adapters/registry.py)."""
    from scripts.data.adapters import ADAPTERS

    return {name: _path_of(adapter.datalist) for name, adapter in ADAPTERS.items()}


def pack(out_dir: str = "dist", model: str | None = None) -> str:
    """Assembles ``<out_dir>/mpamatch_gland_segmentation/`` and prints its path.

    Check it with MONAI's tools from inside the folder::

        python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath scripts/deploy/meta_schema.json
        python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json
    """
    from scripts.deploy import pack_bundle

    return str(pack_bundle(out_dir, model=model))


def study(argv: Sequence[str] | None = None) -> int:
    """Trains and tests every method x labeled ratio x seed on one fixed test set and compares them.

    Usage::

        python -m scripts.cli study --data glas --root /data/GlaS [--test_root /data/GlaS] \
            --methods supervised,unimatch,mpamatch --labeled_ratios 0.1,0.2 --seeds 0,1,2 \
            --recipe bundle/configs/recipes/cpu.json [--override '{"num_iterations": 300}'] --out studies/glas

    ``--data`` is ``glas``, ``ebhi_gland``, ``ebhi_cancer``, ``kpi``, ``folder`` or ``demo`` (the generated demo set;
    ``--root`` optional). Every run tests on the same images: those of ``--test_root`` (GlaS: its testA_ / testB_
    images; KPI: its test split), or else ``--test_count`` (20) annotated training images held out with seed 0,
    stratified by grade / class / disease model (demo: its own test section); they are never trained on or used
    for model selection. Validation and the labeled / unlabeled split of the rest come from the data set's
    adapter with ``--split_seed`` (0), the same for every run, so runs differ only in method, ratio and seed.
    ``--adapter_args`` passes extra adapter arguments (e.g. ``'{"validation_ratio": 0.2}'``, KPI's ``rule``).

    Each run trains with ``train.json`` + ``datasets/<data>.json`` (when it exists) + ``--recipe`` + the
    ``--override`` keys, in ``OUT/runs/<method>_r<ratio>_s<seed>/`` (``train.log``, ``eval.log``, ``models/``,
    ``eval/``, ``masks/<image>.png``), then is evaluated on the test set. Outputs: ``OUT/results.csv`` (a row per
    run), ``OUT/results.md`` (mean +- std, paired differences to ``supervised`` with bootstrap intervals, the
    all-foreground baseline), ``OUT/label_efficiency.png``, ``OUT/study.json`` and ``OUT/datalists/``. Calling it
    again with the same ``--out`` skips finished runs and restarts unfinished ones; other data, test or training
    settings in the same ``--out`` are refused. A failed run is reported and the others go on; the command then
    exits with status 1 naming it. ``python -m scripts.cli study --help`` lists every option.

    Args:
        argv: the arguments after ``study``; None reads the command line.
    """
    from scripts.study import main as study_main

    return study_main(argv)


def main() -> None:
    from scripts.errors import install_excepthook

    install_excepthook()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    if len(sys.argv) > 1 and sys.argv[1] == "study":  # its own parser: fire would turn JSON false / null into strings
        sys.exit(study(sys.argv[2:]))
    fire.Fire(commands())


def commands() -> dict:
    """The commands of ``python -m scripts.cli`` other than ``study`` (which has its own parser), by name."""
    return {"pack": pack, "demo-data": demo_data, "check-weights": check_weights, "text-prototypes": text_prototypes,
            "export-onnx": export_onnx, "prepare": _prepare_commands()}


if __name__ == "__main__":
    main()
