"""Networks: the UNI-TransUNet segmentation model, its ViT encoder presets, the frozen text towers and the one
module that reads every weights file (``weights.py``)."""

from .weights import (TRAIN_FIRST, describe_state, initialised, load_trained_weights, nonfinite_keys, read_checkpoint,
                      read_state_dict, state_misfit, strip_prefix)
from .record import (DEFAULT_RECORD, LABEL_KEYS, NETWORK_KEYS, RECORD_FIELDS, RECORD_KEYS, WINDOW_KEYS, RecordField,
                     checked_overrides, config_settings, model_record, network_from_record, stored_record,
                     trained_settings)
from .encoders import ENCODER_PRESETS, build_encoder, check_encoder_weights, encoder_patch_size, load_encoder_weights
from .transunet import CascadedDecoder, ProjectionHead, SkipStem, TransUNetOutput, UNITransUNet
from .conch import CONCH_FILES, ConchTokenizer, build_conch_text_tower, check_conch_weights, conch_file
from .text_towers import build_text_tower, encode_text_features

__all__ = [
    "ENCODER_PRESETS",
    "build_encoder",
    "encoder_patch_size",
    "load_encoder_weights",
    "check_encoder_weights",
    "read_state_dict",
    "strip_prefix",
    "state_misfit",
    "nonfinite_keys",
    "describe_state",
    "load_trained_weights",
    "initialised",
    "read_checkpoint",
    "TRAIN_FIRST",
    "NETWORK_KEYS",
    "WINDOW_KEYS",
    "LABEL_KEYS",
    "RECORD_KEYS",
    "RECORD_FIELDS",
    "RecordField",
    "DEFAULT_RECORD",
    "model_record",
    "config_settings",
    "checked_overrides",
    "network_from_record",
    "trained_settings",
    "stored_record",
    "UNITransUNet",
    "TransUNetOutput",
    "SkipStem",
    "CascadedDecoder",
    "ProjectionHead",
    "build_text_tower",
    "encode_text_features",
    "build_conch_text_tower",
    "ConchTokenizer",
    "CONCH_FILES",
    "check_conch_weights",
    "conch_file",
]
