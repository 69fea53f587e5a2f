"""Comparison studies: every method x labeled ratio x seed trained and tested on one fixed test set
(``python -m scripts.cli study``), with results.csv, results.md and label_efficiency.png."""

from .datasets import data_names, TEST_SEED, build_datalists
from .masks import SaveMaskd, write_mask_config
from .report import paired_bootstrap_interval, trivial_baseline
from .runner import StudyOptions, encode_override, main, parse_args, run_study, shown_folder

__all__ = ["data_names", "TEST_SEED", "build_datalists", "SaveMaskd", "write_mask_config", "paired_bootstrap_interval",
           "trivial_baseline", "StudyOptions", "encode_override", "main", "parse_args", "run_study", "shown_folder"]
