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
from typing import Sequence

import fire

from scripts.data import ensure_demo_dataset
from scripts.deploy.onnx import export_trained_model
from scripts.errors import ConfigError
from scripts.prototypes.text import save_text_prototypes

__all__ = ["demo_data", "check_weights", "study", "commands"]



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
    fire.Fire(commands(), command=fire_arguments(sys.argv[1:]))


def fire_arguments(args: list[str]) -> list[str]:
    """``args`` for fire, with ``--help`` / ``-h`` moved behind ``--`` where fire reads its own flags: a command that
    takes ``**overrides`` (export-onnx) would otherwise receive ``help=True`` as a config key and run."""
    wanted = [arg for arg in args if arg not in ("--help", "-h")]
    if len(wanted) == len(args) or "--" in wanted:
        return list(args)
    return [*wanted, "--", "--help"]


def commands() -> dict:
    """The commands of ``python -m scripts.cli`` other than ``study`` (which has its own parser), by name."""
    return {"pack": pack, "demo-data": demo_data, "check-weights": check_weights, "text-prototypes": save_text_prototypes,
            "export-onnx": export_trained_model, "prepare": _prepare_commands()}


if __name__ == "__main__":
    main()
